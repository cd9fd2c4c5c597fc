"""A model served by an OpenAI-compatible engine, as a worker sees it (pure).

:class:`EngineRunner` gives a worker what it needs of a model (``limits``, ``check``,
``run``, ``verify``, ``token_stream``, as :class:`~.executor.Executor` does) plus
:meth:`EngineRunner.open_generation`: a generation job becomes one streamed
``/v1/completions`` request (the prompt is the full templated text the client
built, sent as a completion prompt so the engine does not template it again), with
the job's :class:`~.sampling.Sampling` mapped onto the request (temperature 0 for
greedy, seed, stop strings, logprobs) and the usage report asked for. Health:
:meth:`EngineRunner.probe` checks the engine once; :class:`EngineHealth` turns
successive probes into up and down.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core.errors import MalformedMessage

from .engine import (
    BAD_INPUT,
    TOO_LARGE,
    EngineError,
    EngineFault,
    EngineGeneration,
    EngineKind,
    EngineTransport,
    fault_for_status,
)
from .engine_stream import error_message
from .executor import Outcome, RunRequest
from .limits import InputLimits
from .models import ModelSpec

PROBE_TIMEOUT_S = 2.0
# Samplers an engine applies by default beyond OpenAI's, switched off so a job decodes as
# OpenAI's parameters say (llama-cpp-python: repeat penalty 1.1, top-k 40, min-p 0.05;
# vLLM and SGLang take defaults from the model's generation_config.json).
_NEUTRAL = {
    EngineKind.LLAMA_CPP: {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0},
    EngineKind.VLLM: {"repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0},
    EngineKind.SGLANG: {"repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0},
}


@dataclass(frozen=True)
class ListedModel:
    """A model an engine lists in ``/v1/models``."""

    id: str
    owned_by: str = ""
    max_model_len: int | None = None  # vLLM and SGLang say; llama.cpp does not


class Probe(enum.Enum):
    """One health check's answer."""

    OK = "ok"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"  # no answer in time while jobs were running: busy, not dead


class EngineRunner:
    """A generation model (``spec``, kind ``generation``) served by the engine behind
    ``transport`` under the name ``name``; ``limits`` as for an executor (None: from the
    spec's context). It cannot verify tokens or re-run jobs for fraud proofs: an engine
    streams text, not token ids."""

    def __init__(
        self,
        spec: ModelSpec,
        transport: EngineTransport,
        *,
        name: str,
        kind: EngineKind = EngineKind.OPENAI,
        limits: InputLimits | None = None,
    ) -> None:
        if spec.kind != "generation":
            raise MalformedMessage(f"an engine model generates text, not {spec.kind}", code=BAD_INPUT)
        self.spec = spec
        self.transport = transport
        self.name = name
        self.kind = kind
        self.limits = (limits or InputLimits.for_model(spec)).check_for(spec)

    def check(self, req: RunRequest) -> object:
        """Validate a generation request against the limits (characters and tokens asked
        for: the engine's tokenizer is not here). MalformedMessage as the executor's."""
        if req.verify_tokens:
            raise MalformedMessage("an engine model streams text: it cannot verify tokens", code=BAD_INPUT)
        if req.inputs or len(req.texts) != 1 or req.max_tokens < 1:
            raise MalformedMessage("a generation job carries one prompt and max_tokens >= 1", code=BAD_INPUT)
        lim, prompt = self.limits, req.texts[0]
        if req.max_tokens > lim.max_new_tokens:
            raise MalformedMessage(f"max_tokens {req.max_tokens}: at most {lim.max_new_tokens}", code=TOO_LARGE)
        if not prompt:
            raise MalformedMessage("an empty prompt", code=BAD_INPUT)
        if len(prompt) > min(lim.max_text_chars, lim.max_total_chars):
            raise MalformedMessage(
                f"a prompt of {len(prompt)} characters: at most {lim.max_text_chars}", code=TOO_LARGE
            )
        return "prompt"

    def run(self, requests: list[RunRequest]) -> list[Outcome]:
        raise MalformedMessage("an engine model only generates", code=BAD_INPUT)

    def verify(self, req: RunRequest) -> Outcome:
        raise MalformedMessage("an engine model streams text: it cannot verify tokens", code=BAD_INPUT)

    def token_stream(self, req: RunRequest) -> tuple[Iterator[tuple[int, str]], int]:
        """Not for engines (no token ids): what a fraud proof's re-run meets."""
        raise MalformedMessage("an engine model streams text, not token ids", code=BAD_INPUT)

    def completion_body(self, req: RunRequest) -> dict[str, Any]:
        """The streamed request of a generation job: ``/v1/completions`` of its prompt, or
        ``/v1/chat/completions`` of its chat (:attr:`RunRequest.chat`: the engine applies
        its model's chat template, and honours response_format and tools)."""
        s = req.sampling
        asked = req.chat.fields() if req.chat is not None else {"prompt": req.texts[0]}
        body: dict[str, Any] = {
            "model": self.name,
            **asked,
            "max_tokens": req.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": s.temperature,
            "top_p": s.top_p,
            "presence_penalty": s.presence_penalty,
            "frequency_penalty": s.frequency_penalty,
            **_NEUTRAL.get(self.kind, {}),
        }
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.logprobs is not None and req.chat is not None:
            body |= {"logprobs": True, "top_logprobs": s.logprobs}
        elif s.logprobs is not None:
            body["logprobs"] = s.logprobs
        return body

    def open_generation(self, req: RunRequest) -> EngineGeneration:
        """A checked generation job's stream; nothing is sent until its first step."""
        counter = self.count_prompt_tokens if self.kind is EngineKind.LLAMA_CPP else None
        return EngineGeneration(
            self.transport.stream("/chat/completions" if req.chat else "/completions", self.completion_body(req)),
            prompt=req.texts[0],
            max_tokens=req.max_tokens,
            top_logprobs=req.sampling.logprobs or 0,
            count_prompt=counter,
        )

    def count_prompt_tokens(self, prompt: str) -> int | None:
        """The engine's count of ``prompt``'s tokens (llama.cpp's tokenize routes), None if
        it would not say. BLOCKING."""
        asks: list[tuple[str, dict[str, Any]]] = [
            ("/extras/tokenize/count", {"model": self.name, "input": prompt}),  # llama-cpp-python
            ("/tokenize", {"content": prompt}),  # llama-server
        ]
        for path, body in asks:
            try:
                status, reply = self.transport.request("POST", path, body, root=True, timeout_s=PROBE_TIMEOUT_S)
            except EngineError:
                return None
            if status == 200 and isinstance(reply, dict):
                if isinstance(reply.get("count"), int):
                    return int(reply["count"])
                if isinstance(reply.get("tokens"), list):
                    return len(reply["tokens"])
        return None

    def probe(self, *, busy: bool = False) -> Probe:
        """One health check: ``/health`` where the engine has one (vLLM, SGLang, TensorRT-LLM,
        llama-server). Where it has none (llama-cpp-python), its answer shows the server
        alive, and ``/v1/models`` listing our model is asked only while no job runs
        (``busy``): llama-cpp-python answers it only between generations, and would cut
        a running stream short for it. No answer in time while busy is inconclusive. BLOCKING."""
        try:
            status, _ = self.transport.request("GET", "/health", root=True, timeout_s=PROBE_TIMEOUT_S)
            if status not in (404, 405):
                return Probe.OK if 200 <= status < 300 else Probe.FAILED
            if busy:
                return Probe.OK
            listed = list_models(self.transport)
        except EngineError as exc:
            return Probe.INCONCLUSIVE if busy and exc.fault is EngineFault.TIMEOUT else Probe.FAILED
        return Probe.OK if any(m.id == self.name for m in listed) else Probe.FAILED


def list_models(transport: EngineTransport, *, timeout_s: float = PROBE_TIMEOUT_S) -> list[ListedModel]:
    """What the engine serves (``GET /v1/models``). EngineError when it cannot say."""
    status, reply = transport.request("GET", "/models", timeout_s=timeout_s)
    if status != 200 or not isinstance(reply, dict) or not isinstance(reply.get("data"), list):
        raise EngineError(fault_for_status(status) if status >= 400 else EngineFault.FAILED, error_message(reply))
    out = []
    for m in reply["data"]:
        if isinstance(m, dict) and isinstance(m.get("id"), str):
            length = m.get("max_model_len")
            out.append(ListedModel(m["id"], str(m.get("owned_by", "")), length if isinstance(length, int) else None))
    return out


class EngineHealth:
    """Whether an engine is up, from successive probes (pure). It goes down after
    ``failures`` failed probes in a row and comes back up at the first good one; an
    inconclusive probe changes nothing::

        up   --OK--> up (count 0)      up   --FAILED--> up (count+1), down at ``failures``
        down --OK--> up (count 0)      down --FAILED--> down
    """

    def __init__(self, failures: int = 3) -> None:
        if failures < 1:
            raise ValueError("an engine goes down after at least one failed probe")
        self.failures = failures
        self.up = True
        self.failed_in_row = 0

    def observe(self, probe: Probe) -> bool | None:
        """Take one probe; the new state (True: up) when it changed, else None."""
        if probe is Probe.INCONCLUSIVE:
            return None
        if probe is Probe.OK:
            self.failed_in_row = 0
            if not self.up:
                self.up = True
                return True
            return None
        self.failed_in_row += 1
        if self.up and self.failed_in_row >= self.failures:
            self.up = False
            return False
        return None
