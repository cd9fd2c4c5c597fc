"""``POST /v1/completions`` (OpenAI's legacy text completions), sans-IO: the prompt is the
model input as it is (no chat template).

``prompt`` is a string or a list of strings (one choice per prompt, ``n`` per prompt:
choice ``p * n + j`` is prompt p's j-th, as OpenAI orders them); token-id prompts are
refused (the gateway has no tokenizer). ``echo`` must be false and ``suffix`` absent (both
400 naming the parameter); ``best_of`` may only equal ``n``. ``logprobs: k`` returns, per
token, its text, log-probability, the k most likely alternatives (plus the chosen token,
so up to k + 1, as OpenAI does) and its character offset in the choice's text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.execution.sampling import TokenLogprob

from . import wire
from .chat import Choice
from .params import MAX_N, Endpoint, Params, parse_params
from .wire import APIError

MAX_PROMPTS = 16
MAX_CHOICES = 16  # prompts x n: jobs one request may start


@dataclass(frozen=True)
class CompletionRequest:
    """A parsed text completion request."""

    model: str
    prompts: tuple[str, ...]
    params: Params


def parse_completion(body: Any) -> CompletionRequest:
    """Check a completions body strictly (APIError 400 naming the field)."""
    b = wire.obj(body)
    params = parse_params(b, Endpoint.COMPLETIONS)
    raw = b.get("prompt")
    prompts = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else None
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"'prompt' must be a string or a list of 1 to {MAX_PROMPTS} strings", param="prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise wire.unsupported("prompt", "token-id prompts are not supported; send text")
    if any(not p for p in prompts):
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    if len(prompts) * params.n > MAX_CHOICES:
        raise APIError(400, f"prompts x n must be at most {MAX_CHOICES}", param="n")
    if wire.boolean(b, "echo"):
        raise wire.unsupported("echo", "the prompt is not echoed; leave 'echo' false")
    if b.get("suffix"):
        raise wire.unsupported("suffix", "insertion (suffix) is not supported by these models")
    best_of = wire.integer(b, "best_of", params.n, 1, MAX_N)
    if best_of != params.n:
        raise wire.unsupported("best_of", "only best_of equal to n (every choice generated is returned)")
    return CompletionRequest(wire.model_name(b), tuple(wire.text(p, "prompt") for p in prompts), params)


def completion_logprobs(logprobs: Sequence[TokenLogprob], start: int = 0) -> dict[str, Any]:
    """A choice's legacy ``logprobs`` object; ``start``: the text offset of its first token
    (within the choice's text: a stream continues where its last chunk ended)."""
    offsets, at = [], start
    for lp in logprobs:
        offsets.append(at)
        at += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [wire.finite_logprob(lp.logprob) for lp in logprobs],
        "top_logprobs": [{t: wire.finite_logprob(v) for t, v in (*lp.top, (lp.token, lp.logprob))} for lp in logprobs],
        "text_offset": offsets,
    }


def completion_response(
    completion_id: str,
    created: int,
    model: str,
    choices: Sequence[Choice],
    usage: dict[str, Any],
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """A whole text completion."""
    return {
        **wire.envelope("text_completion", completion_id, created, model, fingerprint),
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": None if c.logprobs is None else completion_logprobs(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage,
    }


def completion_chunk(
    completion_id: str,
    created: int,
    model: str,
    *,
    index: int = 0,
    text: str | None = None,
    finish: str | None = None,
    logprobs: Sequence[TokenLogprob] | None = None,
    offset: int = 0,
    usage: dict[str, Any] | None = None,
    with_usage: bool = False,
    fingerprint: str | None = None,
) -> bytes:
    """One server-sent event of a streamed text completion: choice ``index``'s new ``text``
    (``offset``: where it begins in the choice's text), or (``text`` None) the usage chunk."""
    chunk = wire.envelope("text_completion", completion_id, created, model, fingerprint)
    if text is None:
        chunk["choices"] = []
    else:
        lp = None if logprobs is None else completion_logprobs(logprobs, offset)
        chunk["choices"] = [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]
    if usage is not None or with_usage:
        chunk["usage"] = usage
    return wire.sse_event(chunk)
