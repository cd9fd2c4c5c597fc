"""Greedy text generation with a KV-cache decoder exported to ONNX (see :mod:`.export`).

The decoder takes ``input_ids``, ``attention_mask``, ``position_ids`` and the flat
``past.{i}.key/value`` tensors, and returns last-position ``logits`` and the
``present.*`` tensors, which become the next step's past. One prefill runs the
whole prompt; each further token is one step over a single position.

No trio here: the worker calls :meth:`TokenStream.__next__` in a thread and
checks for cancellation between tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

Run = Callable[[dict[str, np.ndarray[Any, Any]]], dict[str, np.ndarray[Any, Any]]]


def chatml_prompt(messages: Sequence[dict[str, str]], *, system: str = DEFAULT_SYSTEM) -> str:
    """SmolLM2's chat template (ChatML), ready for the assistant's reply."""
    parts = []
    if not messages or messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def greedy_tokens(
    run: Any,
    prompt_ids: Sequence[int],
    max_new: int,
    *,
    eos: Sequence[int],
    layers: int,
    kv_heads: int,
    head_dim: int,
) -> Iterator[int]:
    """Generated token ids, one at a time, stopping after an EOS or ``max_new``.

    ``run`` is a Backend's ``run`` or an onnxruntime InferenceSession.
    """
    if hasattr(run, "get_outputs"):  # a bare onnxruntime session (the export check)
        session = run
        names = [o.name for o in session.get_outputs()]

        def run(feeds: dict[str, Any]) -> dict[str, Any]:
            return dict(zip(names, session.run(None, feeds), strict=True))

    past = {
        f"past.{i}.{kv}": np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        for i in range(layers)
        for kv in ("key", "value")
    }
    ids = np.array([list(prompt_ids)], dtype=np.int64)
    pos = 0
    for _ in range(max_new):
        n = ids.shape[1]
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, pos + n), dtype=np.int64),
            "position_ids": np.arange(pos, pos + n, dtype=np.int64)[None, :],
            **past,
        }
        out = run(feeds)
        token = int(np.argmax(out["logits"][0]))
        yield token
        if token in eos:
            return
        past = {f"past.{k[len('present.') :]}": v for k, v in out.items() if k.startswith("present.")}
        pos += n
        ids = np.array([[token]], dtype=np.int64)


class TokenStream:
    """Iterates (token id, new text) pairs of one generation job; ``text`` is the
    decoded text added by this token (empty while a multi-byte character is incomplete)."""

    def __init__(self, tokenizer: Any, tokens: Iterator[int], *, eos: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.eos = set(eos)
        self.ids: list[int] = []
        self.text = ""

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> tuple[int, str]:
        token = next(self.tokens)
        self.ids.append(token)
        shown = [t for t in self.ids if t not in self.eos]
        text = self.tokenizer.decode(shown, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return token, ""
        new, self.text = text[len(self.text) :], text
        return token, new

    def next_or_none(self) -> tuple[int, str] | None:
        """``next(self)`` or None at the end (for ``trio.to_thread.run_sync``)."""
        return next(self, None)


def teacher_forced_agreement(
    run: Any,
    prompt_ids: Sequence[int],
    reference: Sequence[int],
    *,
    layers: int,
    kv_heads: int,
    head_dim: int,
) -> float:
    """Share of positions where ``run``'s greedy choice equals ``reference``'s token
    when both continue the same prefix (the reference tokens are fed back in).
    Compares a quantized decoder with the fp32 one without compounding divergence."""
    past = {
        f"past.{i}.{kv}": np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
        for i in range(layers)
        for kv in ("key", "value")
    }
    ids = np.array([list(prompt_ids)], dtype=np.int64)
    pos = agree = 0
    for want in reference:
        n = ids.shape[1]
        out = run(
            {
                "input_ids": ids,
                "attention_mask": np.ones((1, pos + n), dtype=np.int64),
                "position_ids": np.arange(pos, pos + n, dtype=np.int64)[None, :],
                **past,
            }
        )
        agree += int(np.argmax(out["logits"][0])) == want
        past = {f"past.{k[len('present.') :]}": v for k, v in out.items() if k.startswith("present.")}
        pos += n
        ids = np.array([[want]], dtype=np.int64)
    return agree / max(1, len(reference))
