"""What every OpenAI request and response shares, sans-IO: the error shape, bounded JSON
parsing, typed field readers that answer 400 naming the field, and server-sent events.

A field whose value is JSON ``null`` reads as absent, as OpenAI treats it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from cocoon_p2p.core.errors import CocoonError

MAX_TEXT = 32_768  # characters in one text, prompt or message
# How deeply a request body's arrays and objects may nest. OpenAI's requests need a
# handful of levels; Python's parser recurses once per level, so a body of a million
# '[' overflowed the stack (a 500 RecursionError) before this bound was checked first.
MAX_JSON_DEPTH = 32
LOGPROB_FLOOR = -9999.0  # what -inf becomes in JSON (as vLLM writes it): JSON has no infinities


class APIError(CocoonError):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
    ``param`` names the request field at fault (``messages[0].content[1]``, ``stop``...)."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def unsupported(param: str, why: str) -> APIError:
    """400 for a parameter this gateway or this model cannot honour (never silently ignored)."""
    return APIError(400, f"'{param}' is not supported: {why}", param=param, code="unsupported_parameter")


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


# ---- field readers: each answers 400 naming the field -------------------------------------------


def obj(body: Any, what: str = "the request body") -> dict[str, Any]:
    """``body`` as a JSON object (400 if it is not one)."""
    if not isinstance(body, dict):
        raise APIError(400, f"{what} must be a JSON object", param=None if what == "the request body" else what)
    return body


def model_name(body: dict[str, Any]) -> str:
    """The required ``model`` field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model")
    return model


def text(value: Any, what: str) -> str:
    """A string of at most :data:`MAX_TEXT` characters."""
    if not isinstance(value, str):
        raise APIError(400, f"'{what}' must be a string", param=what)
    if len(value) > MAX_TEXT:
        raise APIError(400, f"'{what}' is longer than {MAX_TEXT} characters", param=what)
    return value


def number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    """An optional finite number within [lo, hi] (booleans are not numbers)."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise APIError(400, f"'{key}' must be a number", param=key)
    if not lo <= value <= hi:
        raise APIError(400, f"'{key}' must be between {lo:g} and {hi:g}, not {value}", param=key)
    return float(value)


def integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    """An optional integer within [lo, hi]."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{key}' must be an integer", param=key)
    if not lo <= value <= hi:
        raise APIError(400, f"'{key}' must be from {lo} to {hi}, not {value}", param=key)
    return value


def boolean(body: dict[str, Any], key: str, default: bool = False) -> bool:
    """An optional true/false."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be true or false", param=key)
    return value


def finite_logprob(value: float) -> float:
    """A log-probability JSON can carry."""
    return value if math.isfinite(value) else LOGPROB_FLOOR


# ---- server-sent events ---------------------------------------------------------------------------


def envelope(kind: str, completion_id: str, created: int, model: str, fingerprint: str | None) -> dict[str, Any]:
    """The fields every completion and completion chunk opens with (``object``: ``kind``)."""
    return {
        "id": completion_id,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
    }


def sse_event(payload: Any) -> bytes:
    """``payload`` as one server-sent event, the framing OpenAI's streams use."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
