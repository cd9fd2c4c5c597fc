"""How a generation picks each next token: greedy, or sampled from a seeded generator.

:class:`Sampling` is what a job asks for (OpenAI's chat parameters: temperature, top_p,
seed, presence and frequency penalties, stop strings, logprobs); it travels in the job
request and is checked on decode like any field. :class:`Sampler` applies it to one
position's logits, in the order vLLM and llama.cpp apply them: penalties on the raw
logits, then temperature, then the top-p nucleus, then one draw from a generator
seeded by ``seed``, so the same request on the same model gives the same tokens.

Pure numpy; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from ..core.errors import MalformedMessage
from ..core.wire import expect_int, expect_list, expect_str_list

MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_STOP_CHARS = 64
MAX_TOP_LOGPROBS = 20  # alternatives per position, as OpenAI allows
MAX_SEED = 2**63 - 1
BAD_SAMPLING = "bad-input"  # the job error code a bad parameter gets (jobs.frames.BAD_INPUT)


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """A generation's decoding parameters. The default is greedy decoding, which is what
    verify jobs can check; anything else is ``plain`` False.

    ``logprobs``: None for none; k >= 0 for the chosen token's log-probability and its k
    most likely alternatives at each position."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= 2.0):
            problems.append("temperature must be in [0, 2]")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            problems.append("top_p must be in (0, 1]")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            problems.append(f"seed must be in [0, {MAX_SEED}]")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                problems.append(f"{name} must be in [-2, 2]")
        if len(self.stop) > MAX_STOP or any(not 0 < len(s) <= MAX_STOP_CHARS for s in self.stop):
            problems.append(f"stop: at most {MAX_STOP} strings of 1..{MAX_STOP_CHARS} characters")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            problems.append(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if problems:
            raise MalformedMessage("sampling: " + "; ".join(problems), code=BAD_SAMPLING)

    @property
    def greedy(self) -> bool:
        """Whether each token is the (penalised) argmax: nothing random."""
        return self.temperature == 0.0

    @property
    def plain(self) -> bool:
        """Plain greedy decoding to EOS or max_tokens: what a verify job checks as it is."""
        return self.greedy and self.presence_penalty == 0.0 and self.frequency_penalty == 0.0 and not self.stop

    def to_wire(self) -> list[Any]:
        return [
            _milli(self.temperature),
            _milli(self.top_p),
            -1 if self.seed is None else self.seed,
            _milli(self.presence_penalty),
            _milli(self.frequency_penalty),
            list(self.stop),
            -1 if self.logprobs is None else self.logprobs,
        ]

    @classmethod
    def from_wire(cls, obj: Any) -> Sampling:
        """Decode and check (MalformedMessage, code ``bad-input``)."""
        t, p, seed, pres, freq, stop, logprobs = expect_list(obj, 7, "sampling")
        return cls(
            temperature=expect_int(t, "temperature (milli)", hi=2000) / 1000,
            top_p=expect_int(p, "top_p (milli)", lo=1, hi=1000) / 1000,
            seed=None if seed == -1 else expect_int(seed, "seed", hi=MAX_SEED),
            presence_penalty=expect_int(pres, "presence penalty (milli)", lo=-2000, hi=2000) / 1000,
            frequency_penalty=expect_int(freq, "frequency penalty (milli)", lo=-2000, hi=2000) / 1000,
            stop=expect_str_list(stop, "stop", max_items=MAX_STOP, max_len=MAX_STOP_CHARS),
            logprobs=None if logprobs == -1 else expect_int(logprobs, "top logprobs", hi=MAX_TOP_LOGPROBS),
        )


def _milli(x: float) -> int:
    # Parameters travel as integers in thousandths: a float's encoding is not canonical
    # across implementations, and three decimals is all any engine honours.
    return round(x * 1000)


GREEDY = Sampling()


class FinishReason(StrEnum):
    """Why a generation ended, in OpenAI's words (its ``finish_reason``)."""

    STOP = "stop"  # the model's end of sequence, or a stop string
    LENGTH = "length"  # ``max_tokens`` generated
    TOOL_CALLS = "tool_calls"  # the engine's model called a tool
    CONTENT_FILTER = "content_filter"  # the engine withheld the rest

    @classmethod
    def parse(cls, value: str | None) -> FinishReason | None:
        """``value`` as a reason, or None for none or one we do not know."""
        try:
            return cls(value) if value else None
        except ValueError:
            return None


@dataclass(frozen=True)
class TokenLogprob:
    """One position's log-probability of the chosen token (as text) and its most likely
    alternatives, under the model's own distribution (before penalties and temperature,
    as vLLM reports them)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = field(default=())


@dataclass(frozen=True)
class Pick:
    """The token chosen at one position, with its log-probabilities when asked for: token
    ids of the alternatives (the caller turns ids into text)."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


class Sampler:
    """Applies one job's :class:`Sampling` to successive positions' logits."""

    def __init__(self, sampling: Sampling = GREEDY) -> None:
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)  # seed None: fresh entropy
        self.counts: dict[int, int] = {}

    def pick(self, logits: np.ndarray[Any, Any]) -> Pick:
        """The next token from one position's logits (1-D, the vocabulary)."""
        s = self.sampling
        raw = np.asarray(logits).reshape(-1)
        x = raw
        if self.counts and (s.presence_penalty or s.frequency_penalty):
            x = raw.astype(np.float64)  # a copy: the caller's logits stay as they were
            ids = np.fromiter(self.counts.keys(), dtype=np.int64, count=len(self.counts))
            n = np.fromiter(self.counts.values(), dtype=np.float64, count=len(self.counts))
            x[ids] -= s.frequency_penalty * n + s.presence_penalty
        if s.greedy:
            token = int(np.argmax(x))
        else:
            z = x.astype(np.float64) / s.temperature
            z -= z.max()
            p = np.exp(z)
            p /= p.sum()
            if s.top_p < 1.0:
                order = np.argsort(-p, kind="stable")
                cut = int(np.searchsorted(np.cumsum(p[order]), s.top_p)) + 1  # the smallest nucleus
                nucleus = np.zeros_like(p)
                nucleus[order[:cut]] = p[order[:cut]]
                p = nucleus / nucleus.sum()
            token = int(self.rng.choice(p.size, p=p))
        self.counts[token] = self.counts.get(token, 0) + 1
        if s.logprobs is None:
            return Pick(token)
        lp = _log_softmax(raw)
        top = np.argsort(-lp, kind="stable")[: s.logprobs] if s.logprobs else np.array([], dtype=np.int64)
        return Pick(token, float(lp[token]), tuple((int(i), float(lp[i])) for i in top))


def _log_softmax(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    z = x.astype(np.float64) - float(np.max(x))
    return z - math.log(float(np.exp(z).sum()))


def find_stop(text: str, stops: tuple[str, ...], start: int = 0) -> int | None:
    """Where the first stop string begins in ``text`` (searching from ``start``), or None."""
    found = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(found) if found else None


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that a stop string begins with (text a
    stream must hold back: the next tokens may complete the stop string)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
