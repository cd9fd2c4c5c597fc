"""OpenAI-compatible engines (vLLM, SGLang, TensorRT-LLM, llama.cpp): their kinds, their
errors as job errors, how bytes reach them, and one generation streamed from one.

A generation job becomes one streamed ``/v1/completions`` request
(:class:`EngineGeneration`; the request itself and the model's checks are
:mod:`.engine_runner`'s). Pure: every byte goes through an :class:`EngineTransport`
passed in (the blocking HTTP one is :mod:`.engine_http`). A generation connects
lazily, on its first :meth:`EngineGeneration.next_step` (in the worker's thread,
never on the event loop), and :meth:`EngineGeneration.close` ends it from any
thread, closing the upstream request so the engine stops generating for nobody.

Engine errors become typed job errors (:class:`EngineError`): a request the engine
refused (HTTP 4xx) is ``bad-input`` (413: ``too-large``; 429: ``busy``); a failure,
a refused connection or a timeout is ``backend``.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from cocoon_p2p.core.errors import CocoonError

from .chat_options import MAX_ARGUMENTS, MAX_CALL_ID, MAX_CALL_NAME, MAX_TOOL_CALLS, ToolCall
from .engine_stream import (
    DONE,
    NEED_DATA,
    EngineStreamError,
    SseDecoder,
    SseEvent,
    ToolCallDelta,
    Usage,
    parse_chunk,
)
from .sampling import FinishReason, TokenLogprob

BAD_INPUT, TOO_LARGE, BUSY, BACKEND = "bad-input", "too-large", "busy", "backend"  # the job protocol's codes
BACKEND_PREFIX = "engine:"  # an engine offer's backend: engine:<kind>/<variant>


class EngineKind(enum.Enum):
    """Which engine serves; it decides the few request fields that differ from OpenAI's."""

    LLAMA_CPP = "llama.cpp"
    VLLM = "vllm"
    SGLANG = "sglang"
    TRTLLM = "trtllm"
    OPENAI = "openai"  # any other OpenAI-compatible server: OpenAI's fields only

    @classmethod
    def from_owner(cls, owned_by: str) -> EngineKind:
        """The kind an engine's ``/v1/models`` ``owned_by`` names (``openai`` when unknown)."""
        return _OWNERS.get(owned_by.lower(), cls.OPENAI)


# /v1/models "owned_by" of each engine ("me": llama-cpp-python's server; "llamacpp": llama-server).
_OWNERS = {
    "me": EngineKind.LLAMA_CPP,
    "llamacpp": EngineKind.LLAMA_CPP,
    "vllm": EngineKind.VLLM,
    "sglang": EngineKind.SGLANG,
    "tensorrt_llm": EngineKind.TRTLLM,
}


def offer_backend(kind: EngineKind, variant: str) -> str:
    """The backend string an engine model is advertised with: ``engine:vllm/bf16``."""
    return f"{BACKEND_PREFIX}{kind.value}/{variant}"[:64]


class EngineFault(enum.Enum):
    """What went wrong with an engine request, and the job error it becomes."""

    REJECTED = BAD_INPUT  # 4xx: the engine refused this request
    TOO_LARGE = TOO_LARGE  # 413
    OVERLOADED = BUSY  # 429
    FAILED = BACKEND  # 5xx, or a stream that broke its format
    UNREACHABLE = "unreachable"  # refused, reset or lost connection
    TIMEOUT = "timeout"
    CLOSED = "closed"  # closed on our side (cancel, deadline)

    @property
    def code(self) -> str:
        """The job error code."""
        return self.value if self.value in (BAD_INPUT, TOO_LARGE, BUSY) else BACKEND


class EngineError(CocoonError):
    """An engine request failed; ``code`` is the job error it becomes."""

    def __init__(self, fault: EngineFault, message: str) -> None:
        super().__init__(message)
        self.fault = fault

    @property
    def code(self) -> str:
        return self.fault.code


def fault_for_status(status: int) -> EngineFault:
    """The fault an HTTP error status means."""
    if status == 413:
        return EngineFault.TOO_LARGE
    if status == 429:
        return EngineFault.OVERLOADED
    return EngineFault.REJECTED if 400 <= status < 500 else EngineFault.FAILED


class EngineStream(Protocol):
    """One streamed HTTP request. ``open`` and ``read`` block; ``close`` may be called from
    any thread at any time (a blocked ``read`` then returns or raises) and is idempotent."""

    def open(self) -> None:
        """Connect, send, and check the status (EngineError)."""

    def read(self) -> bytes:
        """The next bytes of the body (b"" at its end); EngineError on a timeout or a lost connection."""
        ...

    def close(self) -> None: ...


class EngineTransport(Protocol):
    """How requests reach the engine (paths under its ``/v1`` base, or its root with ``root``)."""

    def stream(self, path: str, body: dict[str, Any]) -> EngineStream:
        """A streamed POST, not sent yet (it connects on ``open``)."""
        ...

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, root: bool = False, timeout_s: float
    ) -> tuple[int, Any]:
        """(status, JSON body or None). EngineError when the engine cannot be reached in time."""
        ...


@dataclass(frozen=True, slots=True)
class GenerationStep:
    """One chunk a generation streams: its text, its token ids (none from an engine) and
    their log-probabilities when asked for."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


class Generation(Protocol):
    """A generation job's stream as the worker drives it (in a thread). ``interruptible``:
    ``close`` from another thread ends a blocked ``next_step``."""

    interruptible: bool

    def next_step(self) -> GenerationStep | None:
        """The next chunk, or None at the end. BLOCKING."""
        ...

    def buffered(self) -> bool:
        """Whether :meth:`next_step` would return at once (no thread needed)."""
        ...

    def close(self) -> None: ...

    def units(self, chunks: int) -> tuple[int, int]:
        """Tokens to bill once it ended, ``chunks`` chunks having been sent: (prompt
        tokens, generated tokens)."""
        ...

    def reason(self, chunks: int) -> FinishReason | None:
        """Why it ended, ``chunks`` chunks having been sent (None: not known)."""
        ...

    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The tool calls its model made (a chat with tools, on an engine), once it ended."""
        ...


class EngineGeneration:
    """One streamed completion, chunk by chunk (a :class:`Generation`).

    A delta with several tokens' log-probabilities becomes one step per token (its text
    on the first), so each step carries at most one token; a delta with neither text nor
    log-probabilities is skipped. At most ``max_tokens`` steps, whatever the engine sends.
    Usage is the engine's own report; without one, ``count_prompt`` (called once, in the
    generation's thread, after the stream) counts the prompt, and the completion is the
    steps sent."""

    interruptible = True

    def __init__(
        self,
        stream: EngineStream,
        *,
        prompt: str,
        max_tokens: int,
        top_logprobs: int = 0,
        count_prompt: Callable[[str], int | None] | None = None,
    ) -> None:
        self._stream = stream
        self._prompt = prompt
        self._max_tokens = max_tokens
        self._top = top_logprobs
        self._count_prompt = count_prompt
        self._decoder = SseDecoder()
        self._pending: deque[GenerationStep] = deque()
        self._opened = False
        self._ended = False
        self._steps = 0
        self.closed = False  # closed by close() (cancel, deadline, the end of the job)
        self.usage: Usage | None = None
        self.prompt_tokens: int | None = None  # counted when the engine reported no usage
        self.finish_reason: str | None = None
        self._calls: dict[int, list[str]] = {}  # index -> [id, name, arguments], as streamed

    def buffered(self) -> bool:
        return bool(self._pending) or self._ended

    def next_step(self) -> GenerationStep | None:
        while not self._pending:
            if self._ended:
                return None
            self._pull()
        return self._pending.popleft()

    def _pull(self) -> None:
        try:
            if not self._opened:
                self._opened = True
                self._stream.open()
            event = self._decoder.next_event()
            while event is NEED_DATA:
                self._decoder.receive_data(self._stream.read())
                event = self._decoder.next_event()
            if not isinstance(event, SseEvent):  # ENDED: the body is over
                if self.finish_reason is None:
                    raise EngineError(EngineFault.FAILED, "the engine's stream ended before its last chunk")
                return self._end()
            chunk = parse_chunk(event.data, top_logprobs=self._top)
        except EngineStreamError as exc:
            raise self._failed(EngineError(EngineFault.FAILED, str(exc))) from exc
        except EngineError as exc:
            raise self._failed(exc) from exc
        if chunk is DONE:
            if self.finish_reason is None:  # llama-cpp-python ends a stream so when a new request preempts it
                raise self._failed(EngineError(EngineFault.FAILED, "the engine ended the stream unfinished"))
            return self._end()
        self.usage = chunk.usage or self.usage
        self.finish_reason = chunk.finish_reason or self.finish_reason
        if chunk.logprobs:
            first, *rest = chunk.logprobs
            self._add(GenerationStep(chunk.text, logprobs=(first,)))
            for lp in rest:
                self._add(GenerationStep("", logprobs=(lp,)))
        elif chunk.text:
            self._add(GenerationStep(chunk.text))
        for piece in chunk.tool_calls:
            self._call_piece(piece)

    def _call_piece(self, piece: ToolCallDelta) -> None:
        """A piece of a tool call: kept for the result, and streamed as an empty step (a
        token generated: what a client counts, and what the bill may hold)."""
        if piece.index >= MAX_TOOL_CALLS or (piece.index not in self._calls and len(self._calls) >= MAX_TOOL_CALLS):
            raise self._failed(EngineError(EngineFault.FAILED, f"more than {MAX_TOOL_CALLS} tool calls"))
        call = self._calls.setdefault(piece.index, ["", "", ""])
        call[0] = call[0] or piece.id
        call[1] = call[1] or piece.name
        call[2] += piece.arguments
        if len(call[2]) > MAX_ARGUMENTS:
            raise self._failed(EngineError(EngineFault.FAILED, "a tool call's arguments beyond the limit"))
        if piece.arguments:
            self._add(GenerationStep(""))

    def _add(self, step: GenerationStep) -> None:
        if self._steps >= self._max_tokens:  # more than asked for: not ours to forward
            self._end()
            return
        self._steps += 1
        self._pending.append(step)

    def _failed(self, exc: EngineError) -> EngineError:
        self._ended = True
        self._stream.close()
        return EngineError(EngineFault.CLOSED, "closed") if self.closed else exc

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._stream.close()
        if self.usage is None and self._count_prompt is not None and not self.closed:
            self.prompt_tokens = self._count_prompt(self._prompt)

    def close(self) -> None:
        self.closed = True  # before the stream: a read it wakes sees why
        self._stream.close()

    def units(self, chunks: int) -> tuple[int, int]:
        """Prompt tokens (the engine's count, at most the prompt's UTF-8 bytes: what a client
        can check) and completion tokens (at most the chunks sent)."""
        prompt = self.usage.prompt_tokens if self.usage is not None else (self.prompt_tokens or 0)
        completion = self.usage.completion_tokens if self.usage is not None else chunks
        return min(prompt, len(self._prompt.encode("utf-8", "surrogatepass"))), min(completion, chunks)

    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The calls streamed, in index order (an id made up where the engine gave none)."""
        return tuple(
            ToolCall(call_id[:MAX_CALL_ID] or f"call_{index}", name[:MAX_CALL_NAME] or "unnamed", arguments)
            for index, (call_id, name, arguments) in sorted(self._calls.items())
        )

    def reason(self, chunks: int) -> FinishReason | None:
        """The engine's reason; ``length`` when we cut it at ``max_tokens`` ourselves."""
        said = FinishReason.parse(self.finish_reason)
        if chunks >= self._max_tokens and said is not FinishReason.STOP:
            return FinishReason.LENGTH
        return said
