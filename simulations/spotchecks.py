"""A client's spot check in the model, as a pure decision (issue 18): after each run, ask
another worker, or decide who was wrong and which runs are paid.

The decisions are :class:`~cocoon_p2p.jobs.checks.ResultChecks`' own, over answers
reduced to numbers (0: the right result; n > 0: a wrong one, no two alike):

* :attr:`Flow.RERUN` (tensors): the reference agrees with the first run: passed. It does
  not: a third worker breaks the tie. It agrees with the first: the reference was wrong;
  with the reference: the first was; with neither, or there is no third worker: nobody
  can be blamed (skipped: one word against another). Every run that judged is paid.
* :attr:`Flow.VERIFY` (generation): a verify job says whether the first run's tokens are
  the greedy ones. No fault: passed. A fault is confirmed by a second verifier; one that
  finds no fault condemns the first verifier instead (unpaid). With no second verifier the
  first verifier's word stands. The caller keeps the first run's tokens either way (they
  were streamed); found wrong, they are not paid. A lying verifier echoes the claimed
  tokens back: it finds no fault (it did no work to find one).

A check with no worker to run on, or whose run failed, is skipped: the first result is
kept and paid as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .world import SimJob, SimWorker


class Verdict(StrEnum):
    """What a spot check decided about a caller's result (a job's ``verdict`` column)."""

    UNCHECKED = ""
    PASSED = "passed"  # found right (or its accuser found lying): paid
    WRONG = "wrong"  # found wrong: unpaid (the caller gets the agreeing run's result, or keeps it, knowing)
    SKIPPED = "skipped"  # no other worker, a check run failed, or no majority: kept and paid as it was


class Flow(Enum):
    """How a client checks: re-run the request (tensors) or verify the tokens (generation)."""

    RERUN = "re-run"
    VERIFY = "verify"


@dataclass(eq=False)
class Run:
    """One worker's answer to a request under check."""

    worker: SimWorker
    answer: int  # what a comparison sees: 0 the right result, n > 0 a wrong one (no two alike)
    cost: int
    lie: bool  # the worker returned a wrong result on purpose (the truth, whatever a check sees)
    nth: int = 0  # a cheater's caller job: how many it had served, this one included


@dataclass(eq=False)
class Check:
    """A spot check in progress: the caller's job waits for it."""

    job: SimJob
    first: Run
    exclude: set[bytes]  # the workers it has asked (a run goes to another)
    runs: list[Run] = field(default_factory=list)  # the reference (or verifier) when it disagreed
    noise: bool = False  # the first (right) result looks wrong to this check (cheat.honest_false_alarm)


@dataclass(frozen=True)
class Decided:
    """A check's end: its verdict on the first run, the check runs to pay, the run found
    wrong (never paid) and the run whose result the caller gets (None: the first)."""

    verdict: Verdict
    pay: tuple[Run, ...] = ()
    wrong: Run | None = None
    keep: Run | None = None


def decide(flow: Flow, check: Check, run: Run | None) -> Decided | None:
    """After ``run`` (None: no worker left, or its run failed): the check's end, or None to
    ask one more worker (the caller then records ``run`` in ``check.runs``)."""
    if flow is Flow.RERUN:
        return _rerun(check, run)
    return _verify(check, run)


def _rerun(check: Check, run: Run | None) -> Decided | None:
    first = check.first
    if not check.runs:  # the reference
        if run is None:
            return Decided(Verdict.SKIPPED)
        if run.answer == first.answer:
            return Decided(Verdict.PASSED, (run,))
        return None  # a tie-breaker
    ref = check.runs[0]
    if run is None:  # no third worker: one word against another, nobody is blamed
        return Decided(Verdict.SKIPPED, (ref,))
    if run.answer == first.answer:  # the reference was the odd one out
        return Decided(Verdict.PASSED, (run,), wrong=ref)
    if run.answer != ref.answer:  # three answers: nobody can be blamed on this evidence
        return Decided(Verdict.SKIPPED, (ref, run))
    return Decided(Verdict.WRONG, (ref, run), wrong=first, keep=run)


def fault(check: Check, verifier: Run) -> bool:
    """A verify job's verdict on the first run; a lying verifier echoes it back: no fault."""
    return verifier.answer == 0 and check.first.answer != 0


def _verify(check: Check, run: Run | None) -> Decided | None:
    first = check.first
    if not check.runs:  # the verifier
        if run is None:
            return Decided(Verdict.SKIPPED)
        if not fault(check, run):
            return Decided(Verdict.PASSED, (run,))
        return None  # a second verifier
    verifier = check.runs[0]
    if len(check.runs) == 1:  # the second verifier
        if run is None:  # none: the first verifier's word stands
            return Decided(Verdict.WRONG, (verifier,), wrong=first)
        if fault(check, run):
            return Decided(Verdict.WRONG, (run, verifier), wrong=first)
        return None  # they disagree: a third decides
    second = check.runs[1]
    if run is None:  # one word against another: nobody is blamed
        return Decided(Verdict.SKIPPED, (verifier, second))
    if not fault(check, run):  # two find it right: the first verifier lied
        return Decided(Verdict.PASSED, (second, run), wrong=verifier)
    return Decided(Verdict.WRONG, (verifier, second, run), wrong=first)
