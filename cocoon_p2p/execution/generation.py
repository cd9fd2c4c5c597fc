"""Text generation, greedy or sampled (:mod:`.sampling`), with a KV-cache decoder
exported to ONNX (see :mod:`.export`).

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

from .sampling import Pick, Sampler, TokenLogprob, find_stop, stop_prefix_len

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
    """Greedy token ids, one at a time, stopping after an EOS or ``max_new``.

    ``run`` is a Backend's ``run`` or an onnxruntime InferenceSession.
    """
    picks = sample_tokens(
        run, prompt_ids, max_new, Sampler(), eos=eos, layers=layers, kv_heads=kv_heads, head_dim=head_dim
    )
    return (pick.token for pick in picks)


def sample_tokens(
    run: Any,
    prompt_ids: Sequence[int],
    max_new: int,
    sampler: Sampler,
    *,
    eos: Sequence[int],
    layers: int,
    kv_heads: int,
    head_dim: int,
) -> Iterator[Pick]:
    """Generated tokens as ``sampler`` picks them, one at a time, stopping after an EOS
    or ``max_new``. ``run`` is a Backend's ``run`` or an onnxruntime InferenceSession."""
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
        pick = sampler.pick(out["logits"][0])
        yield pick
        if pick.token in eos:
            return
        past = {f"past.{k[len('present.') :]}": v for k, v in out.items() if k.startswith("present.")}
        pos += n
        ids = np.array([[pick.token]], dtype=np.int64)


class TokenStream:
    """Iterates (token id, new text) pairs of one generation job; ``text`` is the
    decoded text added by this token (empty while a multi-byte character is incomplete).

    A stop string ends the stream: the text is cut where it begins (it is not part of
    the answer, as OpenAI's), ``stopped`` is set, and no further token is generated.
    Text that may be the beginning of a stop string is held back until the next tokens
    tell (or the generation ends), so nothing sent is ever part of a stop string.
    ``logprobs`` holds each token's log-probabilities when the job asked for them."""

    def __init__(
        self,
        tokenizer: Any,
        picks: Iterator[Pick],
        *,
        eos: Sequence[int],
        max_new: int,
        stop: tuple[str, ...] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.picks = picks
        self.eos = set(eos)
        self.max_new = max_new
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # what was handed out so far
        self.stopped = False
        self.logprobs: list[TokenLogprob] = []

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> tuple[int, str]:
        if self.stopped:
            raise StopIteration
        pick = next(self.picks)
        token = pick.token
        self.ids.append(token)
        if pick.logprob is not None:
            self.logprobs.append(
                TokenLogprob(self._piece(token), pick.logprob, tuple((self._piece(i), lp) for i, lp in pick.top))
            )
        last = token in self.eos or len(self.ids) >= self.max_new
        shown = [t for t in self.ids if t not in self.eos]
        text = self.tokenizer.decode(shown, skip_special_tokens=True)
        if text.endswith("\ufffd") and not last:  # an incomplete UTF-8 sequence: wait for the rest
            return token, ""
        if self.stop:
            at = find_stop(text, self.stop, len(self.text))  # held-back text is where one can begin
            if at is not None:
                self.stopped = True
                text = text[:at]
            elif not last:
                text = text[: len(text) - stop_prefix_len(text, self.stop)]
        new, self.text = text[len(self.text) :], text
        return token, new

    def _piece(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False))

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
