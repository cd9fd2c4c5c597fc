"""The OpenAI HTTP API's shapes, sans-IO: parse requests strictly, build responses.

Covers what the gateway serves: ``GET /v1/models``, ``POST /v1/embeddings``
(float or base64 encodings: the official client asks for base64) and
``POST /v1/chat/completions`` (whole, or streamed as server-sent events).
``usage`` carries the job's cost in nanoton and the worker that ran it, beside
the token counts OpenAI clients expect.

One extension field, ``cocoon``, an object, may ride in any POST body (the
official ``openai`` Python client sends it with ``extra_body``)::

    client.chat.completions.create(..., extra_body={"cocoon": {"require_tee": True}})

``require_tee`` (bool, default false): run the request only on a worker whose TEE
evidence passes the gateway's policy; when none does, the answer is 503 with
``error.code`` ``"no-attested-workers"``. An attested job's ``usage`` has an
``attestation`` object (tee, status, measurement, image). Unknown keys in
``cocoon`` are refused (400), so a misspelt option never passes silently.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_INPUTS = 256  # texts in one embeddings request
MAX_TEXT = 32_768  # characters in one text or message
MAX_MESSAGES = 256
MAX_TOKENS_CAP = 2048
# How deeply a request body's arrays and objects may nest. OpenAI's requests need a
# handful of levels; Python's parser recurses once per level, so a body of a million
# '[' overflowed the stack (a 500 RecursionError) before this bound was checked first.
MAX_JSON_DEPTH = 32


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


COCOON_OPTIONS = frozenset({"require_tee"})


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    texts: tuple[str, ...]
    encoding_format: str  # "float" | "base64"
    require_tee: bool = False  # cocoon.require_tee


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    stream: bool
    include_usage: bool
    require_tee: bool = False  # cocoon.require_tee


def nesting_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in the JSON text ``body``, found without parsing
    it: linear, vectorised (no Python loop over its bytes). Brackets inside strings, from
    an unescaped quote to the next, are not counted. Exact for JSON; for text that is
    not, an estimate the parser then refuses anyway."""
    text = np.frombuffer(body, np.uint8)
    if text.size == 0:
        return 0
    quotes = text == ord('"')
    backslash = text == ord("\\")
    if backslash.any():  # a quote after an odd run of backslashes is escaped
        at = np.arange(text.size, dtype=np.int64)
        last_other = np.maximum.accumulate(np.where(backslash, -1, at))
        odd_run = np.zeros(text.size, bool)
        odd_run[1:] = (at[:-1] - last_other[:-1]) & 1
        quotes &= ~odd_run
    in_string = np.logical_xor.accumulate(quotes)
    step = (text == ord("[")).view(np.int8) + (text == ord("{")).view(np.int8)
    step -= (text == ord("]")).view(np.int8) + (text == ord("}")).view(np.int8)
    step[in_string] = 0
    return max(0, int(np.cumsum(step, dtype=np.int64).max()))


def parse_json(body: bytes) -> Any:
    """A request body's JSON. APIError 400 if it is not JSON, or nests deeper than
    :data:`MAX_JSON_DEPTH` (checked before parsing; the body's size is the HTTP layer's)."""
    # Fewer brackets than the bound cannot nest past it: the common case costs two counts.
    enough = body.count(b"[") + body.count(b"{") > MAX_JSON_DEPTH
    depth = nesting_depth(body) if enough else 0
    if depth > MAX_JSON_DEPTH:
        raise APIError(
            400, f"the JSON body nests {depth} levels deep, more than {MAX_JSON_DEPTH}", code="json_too_deep"
        )
    try:
        return json.loads(body or b"null")
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"the body is not JSON: {exc}") from exc


def _obj(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model")
    return model


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise APIError(400, f"{what} must be a string", param=what)
    if len(value) > MAX_TEXT:
        raise APIError(400, f"{what} is longer than {MAX_TEXT} characters", param=what)
    return value


def _require_tee(body: dict[str, Any]) -> bool:
    """``cocoon.require_tee`` of a request body (the extension field; see the module doc)."""
    options = body.get("cocoon")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError(400, "'cocoon' must be an object", param="cocoon")
    unknown = sorted(set(options) - COCOON_OPTIONS)
    if unknown:
        known = ", ".join(sorted(COCOON_OPTIONS))
        raise APIError(400, f"unknown option 'cocoon.{unknown[0]}' (known: {known})", param=f"cocoon.{unknown[0]}")
    required = options.get("require_tee", False)
    if not isinstance(required, bool):
        raise APIError(400, "'cocoon.require_tee' must be true or false", param="cocoon.require_tee")
    return required


def parse_embeddings(body: Any) -> EmbeddingsRequest:
    b = _obj(body)
    raw = b.get("input")
    texts: list[Any] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    if not texts:
        raise APIError(400, "'input' must be a string or a non-empty list of strings", param="input")
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
    fmt = b.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return EmbeddingsRequest(_model(b), tuple(_text(t, "input") for t in texts), fmt, _require_tee(b))


def parse_chat(body: Any) -> ChatRequest:
    b = _obj(body)
    messages = b.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise APIError(400, f"'messages' must be a list of 1 to {MAX_MESSAGES} messages", param="messages")
    parsed = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, "each message needs a role of system, user or assistant", param="messages")
        parsed.append({"role": m["role"], "content": _text(m.get("content"), "content")})
    limit = b.get("max_completion_tokens", b.get("max_tokens", 128))
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_TOKENS_CAP:
        raise APIError(400, f"'max_tokens' must be an integer from 1 to {MAX_TOKENS_CAP}", param="max_tokens")
    if b.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    options = b.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    stream = bool(b.get("stream", False))
    return ChatRequest(_model(b), tuple(parsed), limit, stream, include_usage, _require_tee(b))


def usage(
    units: int, cost: int, price: int, worker: str, *, completion: int = 0, attestation: dict[str, Any] | None = None
) -> dict[str, Any]:
    """OpenAI's token counts, the job's cost and worker, and (a TEE job) the worker's attestation."""
    prompt = units - completion
    out = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_nanoton": cost,
        "price_nanoton": price,
        "worker": worker,
    }
    if attestation is not None:
        out["attestation"] = attestation
    return out


def embeddings_response(
    model: str, vectors: np.ndarray[Any, Any], encoding_format: str, usage_: dict[str, Any]
) -> dict[str, Any]:
    data = []
    for i, row in enumerate(np.asarray(vectors, dtype=np.float32)):
        if encoding_format == "base64":
            emb: Any = base64.b64encode(row.astype("<f4").tobytes()).decode()
        else:
            emb = [float(x) for x in row]
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model, "usage": usage_}


def chat_response(
    completion_id: str, created: int, model: str, text: str, finish: str, usage_: dict[str, Any]
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
        ],
        "usage": usage_,
    }


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    *,
    delta: dict[str, str] | None = None,
    finish: str | None = None,
    usage_: dict[str, Any] | None = None,
) -> bytes:
    """One server-sent event of a streamed completion (a usage-only chunk has no choices)."""
    chunk: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
    chunk["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage_ is not None:
        chunk["usage"] = usage_
    return sse_event(chunk)


def sse_event(obj: Any) -> bytes:
    """``obj`` as one server-sent event, the framing OpenAI's streams use."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def finish_reason(completion_tokens: int, max_tokens: int) -> str:
    """The finish reason: "length" when generation stopped at ``max_tokens``, else "stop"."""
    return "length" if completion_tokens >= max_tokens else "stop"


SSE_DONE = b"data: [DONE]\n\n"


def models_response(models: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": [{"object": "model", "created": 0, "owned_by": "cocoon", **m} for m in models]}
