"""Spot checks: which results a client re-checks, and when two results disagree (pure).

A client checks a fraction ``rate`` of its jobs, chosen at random *after* the result
arrived, so a worker cannot tell which of its results will be looked at. A check runs
the same request on a different worker of the same model (the reference) and
compares:

* tensors (embeddings...): same names, shapes and dtypes; float outputs row by row
  (axis 0) by cosine similarity, which must reach ``cosine_min`` (set from the honest
  variation measured across batch sizes and thread counts, see the benchmarks); other
  dtypes must be equal;
* generated tokens: greedy decoding is deterministic, so the token ids must be equal
  (the first differing position is reported).

A mismatch means one of the two lied, and either may be the liar: a third worker breaks
the tie (without one nobody is blamed), and the receipt the worker found wrong signed
over its outputs lets anyone who has the model check the blame (:mod:`.fraudproof`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from cocoon_p2p.core.errors import RemoteProtocolError
from cocoon_p2p.execution.tensors import Tensor, to_numpy
from cocoon_p2p.execution.verification import cosine_agreement

DEFAULT_COSINE_MIN = 0.999
# A verified token that is not the greedy choice is excused when its logit is this close to
# the top one (a near-tie that float noise could flip): ~200x the honest noise measured.
TIE_GAP = 0.01


class WrongResult(RemoteProtocolError):
    """A worker's result disagrees with another worker's run of the same request."""

    code = "wrong-result"


@dataclass(frozen=True)
class Mismatch:
    """How two results of one request disagree."""

    reason: str  # "outputs", "shape", "values", "tokens"
    detail: str


@dataclass(frozen=True)
class SpotCheckPolicy:
    """How often a client checks, and how close two honest results are."""

    rate: float = 0.0  # fraction of jobs checked (0: none)
    cosine_min: float = DEFAULT_COSINE_MIN

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"a spot-check rate is within [0, 1], not {self.rate}")
        if not -1.0 <= self.cosine_min <= 1.0:
            raise ValueError(f"a cosine is within [-1, 1], not {self.cosine_min}")


class SpotChecker:
    """Draws the jobs to check (``rng`` passed in: the simulator and tests seed it)."""

    def __init__(self, policy: SpotCheckPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng or random.Random()

    def chosen(self) -> bool:
        """Whether to check the result that just arrived."""
        return self.policy.rate > 0 and self.rng.random() < self.policy.rate


def compare_outputs(
    claimed: tuple[Tensor, ...], reference: tuple[Tensor, ...], *, cosine_min: float = DEFAULT_COSINE_MIN
) -> Mismatch | None:
    """None when ``claimed`` agrees with ``reference`` within tolerance, else how not."""
    names = [t.name for t in claimed]
    if names != [t.name for t in reference]:
        return Mismatch("outputs", f"outputs {names} vs {[t.name for t in reference]}")
    for c, r in zip(claimed, reference, strict=True):
        if c.shape != r.shape or c.dtype != r.dtype:
            return Mismatch("shape", f"{c.name}: {c.dtype}{list(c.shape)} vs {r.dtype}{list(r.shape)}")
        x, y = to_numpy(c), to_numpy(r)
        if np.issubdtype(x.dtype, np.floating):
            if x.size == 0:
                continue
            if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
                return Mismatch("values", f"{c.name}: non-finite values")
            cos = cosine_agreement(x, y)
            worst = int(np.argmin(cos))
            if cos[worst] < cosine_min:
                return Mismatch("values", f"{c.name}: row {worst} cosine {cos[worst]:.6f} < {cosine_min}")
        elif not np.array_equal(x, y):
            return Mismatch("values", f"{c.name}: values differ")
    return None


def compare_tokens(claimed: tuple[int, ...], reference: tuple[int, ...]) -> Mismatch | None:
    """None when two greedy generations are the same tokens, else the first difference."""
    for i, (c, r) in enumerate(zip(claimed, reference, strict=False)):
        if c != r:
            return Mismatch("tokens", f"token {i}: {c} vs {r}")
    if len(claimed) != len(reference):
        return Mismatch("tokens", f"{len(claimed)} tokens vs {len(reference)}")
    return None
