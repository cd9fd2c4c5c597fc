"""Runs :class:`RunRequest` objects on a loaded model: input checks, batching across jobs, usage.

Synchronous (the worker service calls it in a thread). Kinds:

* ``tensor``: the request's named tensors feed the model; jobs whose inputs agree
  in everything but axis 0 are concatenated into one run and split afterwards;
  usage = rows (items).
* ``embedding``: the request's texts are tokenized (padding, truncation at the
  model's max_seq), embedded in one run per batch; usage = texts (items).
* ``generation``: one prompt, greedy decoding with the KV cache, token by token
  (:meth:`Executor.token_stream`); usage = prompt + generated tokens.

A request that does not fit the model fails alone in :meth:`Executor.check`,
before it can spoil a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cocoon_p2p.core.errors import MalformedMessage

from .backends import Backend, check_feeds
from .generation import TokenStream, greedy_tokens
from .models import ModelError, ModelSpec
from .tensors import Tensor, from_numpy, to_numpy

BAD_INPUT = "bad-input"  # the code of a request the model cannot take (the job protocol's, as in backends)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunRequest:
    """One job's work as the executor sees it (the job layer builds it from its wire request)."""

    inputs: tuple[Tensor, ...] = ()  # a tensor job: named tensors, batch on axis 0
    texts: tuple[str, ...] = ()  # an embedding job: the texts; a generation job: one prompt
    max_tokens: int = 0  # a generation job: tokens to generate at most


@dataclass(frozen=True)
class Outcome:
    """What one request's run produced, and its usage in the model's billing unit."""

    outputs: tuple[Tensor, ...]
    units: int


class _NotBatchAligned(Exception):
    """The outputs' first axis is not the inputs' batch axis: results cannot be split."""


class Executor:
    """One model on one backend. ModelError if a text model comes without its tokenizer."""

    def __init__(self, spec: ModelSpec, backend: Backend) -> None:
        self.spec = spec
        self.backend = backend
        self.batchable = True  # until a batched run shows otherwise
        self.tokenizer: Any = None
        if spec.kind in ("embedding", "generation") and spec.tokenizer is None:
            raise ModelError(f"a {spec.kind} model needs its tokenizer")
        if spec.kind == "embedding":
            from tokenizers import Tokenizer

            assert spec.tokenizer is not None  # checked above; for mypy
            tok = Tokenizer.from_file(str(spec.tokenizer))
            tok.enable_truncation(max_length=spec.max_seq)
            tok.enable_padding()
            self.tokenizer = tok
        elif spec.kind == "generation":
            from tokenizers import Tokenizer

            assert spec.tokenizer is not None  # checked above; for mypy
            self.tokenizer = Tokenizer.from_file(str(spec.tokenizer))

    def check(self, req: RunRequest) -> object:
        """Validate ``req`` against the model; return its batch key (jobs with equal keys batch)."""
        if self.spec.kind == "generation":
            if req.inputs or len(req.texts) != 1 or req.max_tokens < 1:
                raise MalformedMessage("a generation job carries one prompt and max_tokens >= 1", code=BAD_INPUT)
            return "prompt"
        if self.spec.kind == "embedding":
            if req.inputs or not req.texts:
                raise MalformedMessage("an embedding job carries texts, not tensors", code=BAD_INPUT)
            if len(req.texts) > self.spec.max_batch * 8:
                raise MalformedMessage("too many texts in one job", code=BAD_INPUT)
            return "texts"
        if req.texts or not req.inputs:
            raise MalformedMessage("a tensor job carries tensors, not texts", code=BAD_INPUT)
        feeds = {t.name: to_numpy(t) for t in req.inputs}
        if len(feeds) != len(req.inputs):
            raise MalformedMessage("duplicate input names", code=BAD_INPUT)
        check_feeds(self.backend.inputs, feeds)
        return tuple((t.name, t.dtype, t.shape[1:]) for t in sorted(req.inputs, key=lambda t: t.name))

    def run(self, requests: list[RunRequest]) -> list[Outcome]:
        """Run checked requests with one key together; one Outcome per request, in order.

        A model whose outputs turn out not to follow the batch axis (a different
        number of rows than went in) runs each request alone, from then on.
        """
        if self.spec.kind == "embedding":
            return self._run_texts(requests)
        if len(requests) > 1 and self.batchable:
            try:
                return self._run_tensors(requests)
            except _NotBatchAligned:
                self.batchable = False
        if len(requests) > 1:
            return [self._run_tensors([r])[0] for r in requests]
        return self._run_tensors(requests)

    def token_stream(self, req: RunRequest) -> tuple[TokenStream, int]:
        """A generation job's tokens, and the prompt's length in tokens (billed too)."""
        spec = self.spec
        prompt_ids = self.tokenizer.encode(req.texts[0], add_special_tokens=False).ids
        if not prompt_ids or len(prompt_ids) + req.max_tokens > spec.max_context:
            raise MalformedMessage(f"prompt of {len(prompt_ids)} tokens does not fit the context", code=BAD_INPUT)
        tokens = greedy_tokens(
            self.backend.run,
            prompt_ids,
            req.max_tokens,
            eos=spec.eos,
            layers=spec.layers,
            kv_heads=spec.kv_heads,
            head_dim=spec.head_dim,
        )
        return TokenStream(self.tokenizer, tokens, eos=spec.eos), len(prompt_ids)

    def _run_tensors(self, requests: list[RunRequest]) -> list[Outcome]:
        rows = [req.inputs[0].shape[0] for req in requests]
        feeds: dict[str, np.ndarray[Any, Any]] = {}
        for spec in self.backend.inputs:
            parts = [to_numpy(next(t for t in req.inputs if t.name == spec.name)) for req in requests]
            feeds[spec.name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        out = self.backend.run(feeds)
        return self._split(out, rows)

    def _run_texts(self, requests: list[RunRequest]) -> list[Outcome]:
        texts = [t for req in requests for t in req.texts]
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        available = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds = {spec.name: available[spec.name] for spec in self.backend.inputs}
        out = self.backend.run(feeds)
        return self._split(out, [len(req.texts) for req in requests])

    def _split(self, out: dict[str, np.ndarray[Any, Any]], rows: list[int]) -> list[Outcome]:
        if len(rows) == 1:  # one request: its outputs whole, whatever their shapes
            return [Outcome(tuple(from_numpy(name, arr) for name, arr in out.items()), rows[0])]
        if any(arr.ndim == 0 or arr.shape[0] != sum(rows) for arr in out.values()):
            raise _NotBatchAligned
        outcomes, start = [], 0
        for n in rows:
            tensors = tuple(from_numpy(name, arr[start : start + n]) for name, arr in out.items())
            outcomes.append(Outcome(tensors, n))
            start += n
        return outcomes
