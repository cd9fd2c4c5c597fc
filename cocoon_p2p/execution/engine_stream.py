"""The streaming format of OpenAI-compatible engines, decoded without I/O.

A streamed ``/v1/completions`` answer is a Server-Sent Events body: events of
``data:`` lines, each a JSON completion chunk, ending with ``data: [DONE]``.
:class:`SseDecoder` takes bytes and hands out events (h11's shape: ``receive_data``
buffers, ``next_event`` returns an event, :data:`NEED_DATA` or :data:`ENDED`);
:func:`parse_chunk` turns one event's data into a :class:`CompletionChunk`: the text
added, per-token log-probabilities (the completions API's legacy layout, which
llama.cpp and vLLM both stream), the finish reason, and the usage report that
``stream_options.include_usage`` asks for (vLLM, SGLang, TensorRT-LLM send it in a
last chunk with no choices; llama-cpp-python sends none).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core.errors import RemoteProtocolError

from .sampling import TokenLogprob

MAX_LINE = 1 << 20  # one SSE line (a chunk); an engine's are a few hundred bytes
MAX_PIECE = 256  # characters of one token's text in a logprobs entry (as the job protocol carries)
MIN_LOGPROB = -1e4  # as the job protocol carries: -inf and below are clamped here


class EngineStreamError(RemoteProtocolError):
    """The engine's stream is not the format it should be."""

    code = "backend"


class _Need:
    def __repr__(self) -> str:
        return "NEED_DATA"


class _Ended:
    def __repr__(self) -> str:
        return "ENDED"


NEED_DATA = _Need()  # feed more bytes
ENDED = _Ended()  # the body ended (after receive_data(b""))


@dataclass(frozen=True)
class SseEvent:
    """One event's data (its ``data:`` lines joined by newlines)."""

    data: str


class SseDecoder:
    """Bytes of an event stream in, :class:`SseEvent` out. ``receive_data(b"")`` marks the end."""

    def __init__(self, *, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._data: list[str] = []
        self._eof = False
        self._max_line = max_line

    def receive_data(self, data: bytes) -> None:
        if not data:
            self._eof = True
        self._buf += data

    def next_event(self) -> SseEvent | _Need | _Ended:
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self._max_line:
                    raise EngineStreamError(f"an event line over {self._max_line} bytes")
                if not self._eof:
                    return NEED_DATA
                if self._buf:  # a last line without its newline
                    end = len(self._buf)
                    self._buf += b"\n"
                elif self._data:  # a last event without its blank line
                    return self._dispatch()
                else:
                    return ENDED
            line = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[: end + 1]
            if not line:
                if self._data:
                    return self._dispatch()
                continue
            if line.startswith(b":"):  # a comment: keep-alive pings
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                self._data.append(value.removeprefix(b" ").decode("utf-8", "replace"))
            # other fields (event, id, retry) carry nothing a completion needs

    def _dispatch(self) -> SseEvent:
        event = SseEvent("\n".join(self._data))
        self._data = []
        return event


@dataclass(frozen=True)
class Usage:
    """The engine's own count of a request's tokens."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call (a chat chunk's ``delta.tool_calls`` entry): the
    call at ``index`` gets its id and name once, its arguments' text piece by piece."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class CompletionChunk:
    """One streamed completion chunk: ``text`` added, one :class:`TokenLogprob` per token
    when they were asked for, pieces of tool calls (a chat's), ``finish_reason`` on the
    last, ``usage`` when reported."""

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()


DONE = CompletionChunk(finish_reason="[DONE]")  # ``data: [DONE]``: the stream is over


def parse_chunk(data: str, *, top_logprobs: int = 0) -> CompletionChunk:
    """One event's data as a completion chunk (:data:`DONE` for ``[DONE]``). An error the
    engine streams is an :class:`EngineStreamError` with its message; so is anything
    that is not a completion chunk. At most ``top_logprobs`` alternatives per token."""
    if data.strip() == "[DONE]":
        return DONE
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise EngineStreamError(f"a stream event that is not JSON: {data[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise EngineStreamError("a stream event that is not a JSON object")
    if "error" in obj:
        raise EngineStreamError(f"engine: {error_message(obj)}")
    usage = _usage(obj.get("usage"))
    choices = obj.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise EngineStreamError("choices: expected a list of objects")
    choice = next((c for c in choices if c.get("index", 0) == 0), None)
    if choice is None:
        return CompletionChunk(usage=usage)
    text = choice.get("text")
    calls: tuple[ToolCallDelta, ...] = ()
    delta = choice.get("delta")
    if text is None and isinstance(delta, dict):  # a chat chunk
        text, calls = delta.get("content"), _tool_calls(delta.get("tool_calls"))
    finish = choice.get("finish_reason")
    return CompletionChunk(
        text=_clean(text) if isinstance(text, str) else "",
        logprobs=_logprobs(choice.get("logprobs"), top_logprobs),
        finish_reason=str(finish) if finish is not None else None,
        usage=usage,
        tool_calls=calls,
    )


def _tool_calls(obj: Any) -> tuple[ToolCallDelta, ...]:
    """A chat delta's ``tool_calls`` pieces; entries that are not such objects are skipped."""
    if not isinstance(obj, list):
        return ()
    out = []
    for i, call in enumerate(obj):
        if not isinstance(call, dict):
            continue
        index = call.get("index", i)
        fn = call.get("function") if isinstance(call.get("function"), dict) else {}
        assert isinstance(fn, dict)  # for mypy
        pieces = [call.get("id"), fn.get("name"), fn.get("arguments")]
        call_id, name, arguments = (_clean(p) if isinstance(p, str) else "" for p in pieces)
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            out.append(ToolCallDelta(index, call_id, name, arguments))
    return tuple(out)


def error_message(obj: Any) -> str:
    """The message of an OpenAI-style (``{"error": {"message"}}``) or FastAPI-style
    (``{"detail"}``) error body, shortened."""
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    return str(obj)[:300]


def _usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    prompt, completion = obj.get("prompt_tokens"), obj.get("completion_tokens")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (prompt, completion)):
        return None
    assert isinstance(prompt, int) and isinstance(completion, int)  # checked above; for mypy
    return Usage(prompt, completion)


def _clean(text: str) -> str:
    """Text as the job protocol can carry it: lone surrogates (from JSON escapes) replaced."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _lp(value: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return MIN_LOGPROB
    return max(MIN_LOGPROB, min(0.0, float(value)))


def _logprobs(obj: Any, top: int) -> tuple[TokenLogprob, ...]:
    """The legacy completions layout: ``{"tokens": [...], "token_logprobs": [...],
    "top_logprobs": [{token: logprob} | None, ...]}``, one entry per token; or a chat's,
    ``{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}``."""
    if not isinstance(obj, dict):
        return ()
    if isinstance(obj.get("content"), list):
        return _chat_logprobs(obj["content"], top)
    tokens, values, tops = obj.get("tokens"), obj.get("token_logprobs"), obj.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values):
        return ()
    tops = tops if isinstance(tops, list) and len(tops) == len(tokens) else [None] * len(tokens)
    out = []
    for token, value, alternatives in zip(tokens, values, tops, strict=True):
        ranked: list[tuple[str, float]] = []
        if isinstance(alternatives, dict):
            ranked = sorted(
                ((_clean(str(t))[:MAX_PIECE], _lp(v)) for t, v in alternatives.items()), key=lambda x: -x[1]
            )
        out.append(TokenLogprob(_clean(str(token))[:MAX_PIECE], _lp(value), tuple(ranked[:top])))
    return tuple(out)


def _chat_logprobs(entries: list[Any], top: int) -> tuple[TokenLogprob, ...]:
    out = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        alternatives = entry.get("top_logprobs") if isinstance(entry.get("top_logprobs"), list) else []
        assert isinstance(alternatives, list)  # for mypy
        ranked = sorted(
            ((_clean(str(a.get("token", "")))[:MAX_PIECE], _lp(a.get("logprob"))) for a in alternatives
             if isinstance(a, dict)),
            key=lambda x: -x[1],
        )  # fmt: skip
        out.append(TokenLogprob(_clean(str(entry.get("token", "")))[:MAX_PIECE], _lp(entry.get("logprob")),
                                tuple(ranked[:top])))  # fmt: skip
    return tuple(out)
