"""The OpenAI HTTP API's shapes, sans-IO: parse requests strictly, build responses.

Covers what the gateway serves: ``GET /v1/models`` (and ``/v1/models/{id}``),
``POST /v1/embeddings`` (float or base64 encodings: the official client asks for base64),
``POST /v1/chat/completions`` (:mod:`.chat`) and ``POST /v1/completions``
(:mod:`.completions`), whole or streamed as server-sent events, with the parameters
:mod:`.params` lists. ``usage`` carries OpenAI's token counts and, beside them, the jobs'
cost in nanoton (``cost_nanoton``), the price per billed unit (``price_nanoton``,
``billed_unit``) and the worker that ran them (``worker``; ``workers``, one per choice,
when a request ran several jobs).

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wire
from .chat import MAX_MESSAGES, ChatRequest, Choice, Message, chat_chunk, chat_response, parse_chat
from .completions import CompletionRequest, completion_chunk, completion_response, parse_completion
from .params import COCOON_OPTIONS, MAX_TOKENS_CAP, Endpoint, Feature, Params, require_tee
from .wire import MAX_JSON_DEPTH, MAX_TEXT, SSE_DONE, APIError, nesting_depth, parse_json, sse_event

__all__ = [
    "COCOON_OPTIONS",
    "MAX_INPUTS",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGES",
    "MAX_TEXT",
    "MAX_TOKENS_CAP",
    "SSE_DONE",
    "APIError",
    "ChatRequest",
    "Choice",
    "CompletionRequest",
    "EmbeddingsRequest",
    "Endpoint",
    "Feature",
    "Message",
    "Params",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "embeddings_response",
    "finish_reason",
    "models_response",
    "nesting_depth",
    "parse_chat",
    "parse_completion",
    "parse_embeddings",
    "parse_json",
    "sse_event",
    "usage",
]

MAX_INPUTS = 256  # texts in one embeddings request
_EMBEDDING_KEYS = frozenset({"model", "input", "encoding_format", "dimensions", "user", "cocoon"})


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A parsed embeddings request."""

    model: str
    texts: tuple[str, ...]
    encoding_format: str  # "float" | "base64"
    require_tee: bool = False  # cocoon.require_tee


def parse_embeddings(body: Any) -> EmbeddingsRequest:
    """Check an embeddings body strictly (APIError 400 naming the field). ``dimensions``
    is refused: the models served here have one size (their vectors are not nested)."""
    b = wire.obj(body)
    unknown = sorted(set(b) - _EMBEDDING_KEYS)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    if b.get("dimensions") is not None:
        raise wire.unsupported("dimensions", "the models served here have a fixed size")
    raw = b.get("input")
    texts: list[Any] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    if not texts:
        raise APIError(400, "'input' must be a string or a non-empty list of strings", param="input")
    if len(texts) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input")
    fmt = b.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return EmbeddingsRequest(wire.model_name(b), tuple(wire.text(t, "input") for t in texts), fmt, require_tee(b))


def usage(
    units: int,
    cost: int,
    price: int,
    worker: str,
    *,
    completion_price: int | None = None,
    completion: int = 0,
    prompt: int | None = None,
    unit: str = "token",
    workers: Sequence[str] = (),
    attestation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """OpenAI's token counts, the jobs' cost, price and worker, and (a TEE job) the worker's
    attestation. ``units``: what the jobs billed, all together; ``prompt`` (default
    ``units - completion``): the prompt tokens to report, counted once per distinct prompt
    as OpenAI counts them when ``n`` > 1."""
    prompt = units - completion if prompt is None else prompt
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost_nanoton": cost,
        "price_nanoton": price,
        **({} if completion_price is None else {"completion_price_nanoton": completion_price}),
        "billed_unit": unit,
        "worker": worker,
    }
    if len(workers) > 1:
        out["workers"] = list(workers)
    if attestation is not None:
        out["attestation"] = attestation
    return out


def embeddings_response(
    model: str, vectors: np.ndarray[Any, Any], encoding_format: str, usage_: dict[str, Any]
) -> dict[str, Any]:
    """The embeddings list, each vector as floats or base64 little-endian float32."""
    data = []
    for i, row in enumerate(np.asarray(vectors, dtype=np.float32)):
        if encoding_format == "base64":
            emb: Any = base64.b64encode(row.astype("<f4").tobytes()).decode()
        else:
            emb = [float(x) for x in row]
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {"object": "list", "data": data, "model": model, "usage": usage_}


def finish_reason(completion_tokens: int, max_tokens: int, *, last_text: str | None = None) -> str:
    """The finish reason: "stop" when an end token or a stop string ended the generation
    (the worker stops at either), "length" when it reached ``max_tokens``. A generation
    ended by an end token on exactly its last allowed position is told apart by
    ``last_text``, the text its last token added: an end token adds none (every other
    last token does, since the worker flushes what it held back)."""
    if completion_tokens < max_tokens or last_text == "":
        return "stop"
    return "length"


def model_object(entry: dict[str, Any]) -> dict[str, Any]:
    """One model as ``/v1/models`` lists it (OpenAI's fields, then cocoon's)."""
    return {"object": "model", "created": 0, "owned_by": "cocoon", **entry}


def models_response(models: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``GET /v1/models``."""
    return {"object": "list", "data": [model_object(m) for m in models]}
