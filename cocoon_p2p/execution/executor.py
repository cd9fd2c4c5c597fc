"""Runs :class:`RunRequest` objects on a loaded model: input checks, batching across jobs, usage.

Synchronous (the worker service calls it in a thread). Kinds:

* ``tensor``: the request's named tensors feed the model; jobs whose inputs agree
  in everything but axis 0 are concatenated into one run and split afterwards;
  usage = rows (items).
* ``embedding``: the request's texts are tokenized (padding, truncation at the
  model's max_seq), embedded in one run per batch; usage = texts (items).
* ``generation``: one prompt, greedy decoding with the KV cache, token by token
  (:meth:`Executor.token_stream`); usage = prompt + generated tokens.

A request that does not fit the model, or asks more of it than its
:class:`~.limits.InputLimits` allow, fails alone in :meth:`Executor.check`, before
any work starts and before it can spoil a batch. However many jobs a batch holds,
one backend run holds at most ``max_job_tokens`` tokens (texts sorted by length
and run in slices), and a large run gives the backend's spare memory back after it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from cocoon_p2p.core.errors import MalformedMessage

from .backends import Backend, check_feeds
from .chat_options import ChatOptions, ToolCall
from .generation import TokenStream, sample_tokens
from .limits import InputLimits, Overflow
from .models import ModelError, ModelSpec
from .sampling import GREEDY, FinishReason, Sampler, Sampling, find_stop
from .tensors import Tensor, from_numpy, to_numpy

BAD_INPUT = "bad-input"  # the code of a request the model cannot take (the job protocol's, as in backends)
TOO_LARGE = "too-large"  # the code of a request beyond the model's input limits
# A backend run this large gives its spare memory back after it: a text model's
# activations grow with its tokens (MiniLM, 32 x 256 tokens: +500 MB held), a tensor
# model's, as far as we can tell, with its inputs. Smaller runs keep it for reuse.
RELEASE_TOKENS = 1024
RELEASE_BYTES = 1 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class RunRequest:
    """One job's work as the executor sees it (the job layer builds it from its wire request)."""

    inputs: tuple[Tensor, ...] = ()  # a tensor job: named tensors, batch on axis 0
    texts: tuple[str, ...] = ()  # an embedding job: the texts; a generation job: one prompt
    max_tokens: int = 0  # a generation job: tokens to generate at most
    verify_tokens: tuple[int, ...] = ()  # a verify job: a generation's tokens to check (see .verification)
    sampling: Sampling = GREEDY  # a generation job: how each token is picked
    chat: ChatOptions | None = None  # a chat for an engine: only an engine runner takes one


@dataclass(frozen=True)
class Outcome:
    """What one request's run produced, and its usage in the model's billing unit:
    ``units`` in all, ``completion_units`` of them generated tokens (a generation's)."""

    outputs: tuple[Tensor, ...]
    units: int
    completion_units: int = 0
    finish_reason: FinishReason | None = None  # why a generation ended
    tool_calls: tuple[ToolCall, ...] = ()  # the calls an engine's model made

    @classmethod
    def generated(
        cls, prompt: int, completion: int, reason: FinishReason | None, tool_calls: tuple[ToolCall, ...] = ()
    ) -> Outcome:
        """A streamed generation's outcome: no outputs (its tokens went as chunks)."""
        return cls((), prompt + completion, completion, reason, tool_calls)


class _NotBatchAligned(Exception):
    """The outputs' first axis is not the inputs' batch axis: results cannot be split."""


class Executor:
    """One model on one backend, within ``limits`` (None: :meth:`InputLimits.for_model`).
    ModelError if a text model comes without its tokenizer; ConfigError if the model
    cannot honour ``limits``."""

    def __init__(self, spec: ModelSpec, backend: Backend, *, limits: InputLimits | None = None) -> None:
        self.spec = spec
        self.backend = backend
        self.limits = (limits or InputLimits.for_model(spec)).check_for(spec)
        self.batchable = True  # until a batched run shows otherwise
        self.tokenizer: Any = None
        self._counter: Any = None  # the tokenizer without truncation: a text's whole length
        self._pad_id = 0
        self._verifier: Any = None  # a GreedyVerifier, made on the first verify job
        self.verify_threads = 0  # its onnxruntime threads (0: all cores)
        if spec.kind in ("embedding", "generation") and spec.tokenizer is None:
            raise ModelError(f"a {spec.kind} model needs its tokenizer")
        if spec.kind == "embedding":
            from tokenizers import Tokenizer

            assert spec.tokenizer is not None  # checked above; for mypy
            self._counter = Tokenizer.from_file(str(spec.tokenizer))
            self._counter.no_truncation()
            self._counter.no_padding()
            tok = Tokenizer.from_file(str(spec.tokenizer))
            tok.enable_truncation(max_length=self.limits.max_text_tokens)
            tok.enable_padding()  # only to learn the model's padding token: runs pad their own slices
            self._pad_id = int(tok.padding["pad_id"]) if tok.padding else 0
            tok.no_padding()
            self.tokenizer = tok
        elif spec.kind == "generation":
            from tokenizers import Tokenizer

            assert spec.tokenizer is not None  # checked above; for mypy
            self.tokenizer = Tokenizer.from_file(str(spec.tokenizer))

    def check(self, req: RunRequest) -> object:
        """Validate ``req`` against the model and its input limits; return its batch key
        (jobs with equal keys batch). MalformedMessage: ``bad-input`` for a request the
        model cannot take, ``too-large`` for one beyond the limits."""
        if req.chat is not None:  # messages, response_format, tools: an engine's to honour, not ours
            raise MalformedMessage("this model's backend takes a prompt, not chat options (tools, response_format)",
                                   code=BAD_INPUT)  # fmt: skip
        if self.spec.kind == "generation":
            if req.inputs or len(req.texts) != 1 or req.max_tokens < 1:
                raise MalformedMessage("a generation job carries one prompt and max_tokens >= 1", code=BAD_INPUT)
            self._check_prompt(req.texts[0], max(req.max_tokens, len(req.verify_tokens)))
            return "prompt"
        if req.verify_tokens:
            raise MalformedMessage("only a generation model verifies tokens", code=BAD_INPUT)
        if self.spec.kind == "embedding":
            if req.inputs or not req.texts:
                raise MalformedMessage("an embedding job carries texts, not tensors", code=BAD_INPUT)
            self._check_texts(req.texts)
            return "texts"
        if req.texts or not req.inputs:
            raise MalformedMessage("a tensor job carries tensors, not texts", code=BAD_INPUT)
        feeds = {t.name: to_numpy(t) for t in req.inputs}
        if len(feeds) != len(req.inputs):
            raise MalformedMessage("duplicate input names", code=BAD_INPUT)
        check_feeds(self.backend.inputs, feeds)
        rows = max(t.shape[0] if t.shape else 1 for t in req.inputs)
        if rows > self.limits.max_items:
            raise MalformedMessage(f"{rows} rows in one job: at most {self.limits.max_items}", code=TOO_LARGE)
        return tuple((t.name, t.dtype, t.shape[1:]) for t in sorted(req.inputs, key=lambda t: t.name))

    def _check_chars(self, texts: tuple[str, ...]) -> None:
        lim = self.limits
        if len(texts) > lim.max_items:
            raise MalformedMessage(f"{len(texts)} texts in one job: at most {lim.max_items}", code=TOO_LARGE)
        longest = max(len(t) for t in texts)
        if longest > lim.max_text_chars:
            raise MalformedMessage(f"a text of {longest} characters: at most {lim.max_text_chars}", code=TOO_LARGE)
        total = sum(len(t) for t in texts)
        if total > lim.max_total_chars:
            raise MalformedMessage(f"{total} characters in one job: at most {lim.max_total_chars}", code=TOO_LARGE)

    def _check_texts(self, texts: tuple[str, ...]) -> None:
        """An embedding job's texts within the limits: counts and characters first (cheap),
        then tokens, counted only when the texts could exceed the job's token budget."""
        self._check_chars(texts)
        lim = self.limits
        window = lim.max_text_tokens
        if lim.overflow is Overflow.TRUNCATE and len(texts) * window <= lim.max_job_tokens:
            return  # even a full window each stays within the budget: no need to tokenize
        counts = [len(e.ids) for e in self._counter.encode_batch(list(texts))]
        if lim.overflow is Overflow.REFUSE and max(counts) > window:
            raise MalformedMessage(f"a text of {max(counts)} tokens: the window is {window}", code=TOO_LARGE)
        tokens = sum(min(n, window) for n in counts)
        if tokens > lim.max_job_tokens:
            raise MalformedMessage(f"{tokens} tokens in one job: at most {lim.max_job_tokens}", code=TOO_LARGE)

    def _check_prompt(self, prompt: str, max_tokens: int) -> None:
        """A generation job's prompt and length within the limits and the model's context."""
        lim = self.limits
        if max_tokens > lim.max_new_tokens:
            raise MalformedMessage(f"max_tokens {max_tokens}: at most {lim.max_new_tokens}", code=TOO_LARGE)
        self._check_chars((prompt,))
        n = len(self.tokenizer.encode(prompt, add_special_tokens=False).ids)
        if not n:
            raise MalformedMessage("an empty prompt", code=BAD_INPUT)
        if n > lim.max_text_tokens or n + max_tokens > self.spec.max_context:
            raise MalformedMessage(
                f"prompt of {n} tokens and {max_tokens} new ones do not fit the context of {self.spec.max_context}",
                code=TOO_LARGE,
            )

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

    def verify(self, req: RunRequest) -> Outcome:
        """A verify job: whether ``req.verify_tokens`` are this model's greedy generation
        after the prompt, in one teacher-forced pass. Outputs ``next_ids`` (int64, the greedy
        choice at each position), ``gap`` (float32, how far below the top each returned
        token's logit is: 0 where it is the choice) and ``length`` (uint8 [truncated,
        overrun]); billed as the prompt's tokens plus the tokens checked. BLOCKING."""
        from .verification import GreedyVerifier

        if self._verifier is None:  # built on the first verify job: it derives a graph and loads it
            self._verifier = GreedyVerifier(self.spec, threads=self.verify_threads)
        prompt_ids = self.tokenizer.encode(req.texts[0], add_special_tokens=False).ids
        tokens = req.verify_tokens
        run = self._verifier.greedy_pass(prompt_ids, tokens)
        first_eos = next((i for i, t in enumerate(tokens) if t in self.spec.eos), None)
        overrun = (first_eos is not None and first_eos < len(tokens) - 1) or len(tokens) > req.max_tokens
        truncated = len(tokens) < req.max_tokens and first_eos is None  # stopped early, not at an EOS
        if truncated and req.sampling.stop:  # unless a stop string ended it
            text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
            truncated = find_stop(text, req.sampling.stop) is None
        outputs = (
            from_numpy("next_ids", np.asarray(run.next_ids, dtype=np.int64)),
            from_numpy("gap", np.asarray(run.gaps, dtype=np.float32)),
            from_numpy("length", np.asarray([truncated, overrun], dtype=np.uint8)),
        )
        return Outcome(outputs, len(prompt_ids) + len(req.verify_tokens))

    def token_stream(self, req: RunRequest) -> tuple[TokenStream, int]:
        """A generation job's tokens, and the prompt's length in tokens (billed too)."""
        spec = self.spec
        prompt_ids = self.tokenizer.encode(req.texts[0], add_special_tokens=False).ids
        if not prompt_ids or len(prompt_ids) + req.max_tokens > spec.max_context:  # check() said so; a caller may not
            raise MalformedMessage(f"prompt of {len(prompt_ids)} tokens does not fit the context", code=TOO_LARGE)
        picks = sample_tokens(
            self.backend.run,
            prompt_ids,
            req.max_tokens,
            Sampler(req.sampling),
            eos=spec.eos,
            layers=spec.layers,
            kv_heads=spec.kv_heads,
            head_dim=spec.head_dim,
        )
        stream = TokenStream(self.tokenizer, picks, eos=spec.eos, max_new=req.max_tokens, stop=req.sampling.stop)
        return stream, len(prompt_ids)

    def _run_tensors(self, requests: list[RunRequest]) -> list[Outcome]:
        rows = [req.inputs[0].shape[0] for req in requests]
        feeds: dict[str, np.ndarray[Any, Any]] = {}
        for spec in self.backend.inputs:
            parts = [to_numpy(next(t for t in req.inputs if t.name == spec.name)) for req in requests]
            feeds[spec.name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        large = sum(a.nbytes for a in feeds.values()) >= RELEASE_BYTES
        return self._split(self._backend_run(feeds, large=large), rows)

    def _backend_run(self, feeds: dict[str, np.ndarray[Any, Any]], *, large: bool) -> dict[str, np.ndarray[Any, Any]]:
        """One backend run; a large one gives the backend's spare memory back after it
        (onnxruntime's arena would otherwise keep its peak for good)."""
        return self.backend.run(feeds, release=True) if large else self.backend.run(feeds)

    def _run_texts(self, requests: list[RunRequest]) -> list[Outcome]:
        texts = [t for req in requests for t in req.texts]
        enc = self.tokenizer.encode_batch(texts)  # truncated to the window, not padded
        ids = [e.ids for e in enc]
        out = self._embed_slices(ids)
        rows = [len(req.texts) for req in requests]
        ends = list(itertools.accumulate(rows))
        tokens = [sum(len(x) for x in ids[end - n : end]) for n, end in zip(rows, ends, strict=True)]
        return self._split(out, rows, units=tokens)  # billed per token embedded, as OpenAI counts

    def _embed_slices(self, ids: list[list[int]]) -> dict[str, np.ndarray[Any, Any]]:
        """Every text's outputs, in order; one run per slice of at most ``max_job_tokens``
        padded tokens (texts sorted by length, so a slice pads little), whatever the batch."""
        budget = self.limits.max_job_tokens
        if len(ids) * max(len(x) for x in ids) <= budget:  # one run, as it comes
            return self._embed(ids)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        slices: list[list[int]] = [[]]
        for i in order:  # lengths grow: a slice's width is its last text's
            if slices[-1] and (len(slices[-1]) + 1) * len(ids[i]) > budget:
                slices.append([])
            slices[-1].append(i)
        parts = [(part, self._embed([ids[i] for i in part])) for part in slices]
        out: dict[str, np.ndarray[Any, Any]] = {}
        for name, first in parts[0][1].items():
            whole = np.empty((len(ids), *first.shape[1:]), dtype=first.dtype)
            for part, arrays in parts:
                whole[part] = arrays[name]
            out[name] = whole
        return out

    def _embed(self, ids: list[list[int]]) -> dict[str, np.ndarray[Any, Any]]:
        width = max(len(x) for x in ids)
        tokens = np.full((len(ids), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, x in enumerate(ids):
            tokens[row, : len(x)] = x
            mask[row, : len(x)] = 1
        available = {"input_ids": tokens, "attention_mask": mask, "token_type_ids": np.zeros_like(tokens)}
        feeds = {spec.name: available[spec.name] for spec in self.backend.inputs}
        return self._backend_run(feeds, large=tokens.size >= RELEASE_TOKENS)

    def _split(
        self, out: dict[str, np.ndarray[Any, Any]], rows: list[int], *, units: list[int] | None = None
    ) -> list[Outcome]:
        """Each request's share of ``out`` (``rows`` of it), billed ``units`` (None: its rows)."""
        billed = units if units is not None else rows
        if len(rows) == 1:  # one request: its outputs whole, whatever their shapes
            return [Outcome(tuple(from_numpy(name, arr) for name, arr in out.items()), billed[0])]
        if any(arr.ndim == 0 or arr.shape[0] != sum(rows) for arr in out.values()):
            raise _NotBatchAligned
        outcomes, start = [], 0
        for n, bill in zip(rows, billed, strict=True):
            tensors = tuple(from_numpy(name, arr[start : start + n]) for name, arr in out.items())
            outcomes.append(Outcome(tensors, bill))
            start += n
        return outcomes
