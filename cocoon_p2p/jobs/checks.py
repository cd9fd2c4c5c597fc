"""Spot checks as a client runs them (the trio side of :mod:`.spotcheck`).

After a result arrives and before it is paid, :class:`ResultChecks` draws whether
to check it. A checked job runs again on another worker of the model (paid like any
job once it agrees); when the two disagree, a third run breaks the tie, so one worker's
near-tie or lie never condemns an honest one. Without a third worker nobody is blamed
(the check is skipped, as for generation: the reference may be the liar). The worker
found wrong:

* is not paid for that job (what it can take from us is bounded by its credit);
* is scored down by the guard (``wrong-result``: banned at once), and our channel
  with it is closed as the settlement policy closes an ended one;
* is reported through the :class:`CheatReport` port with its signed receipt, the
  request and both results: a fraud proof that anyone with the model can re-check.

The caller gets the agreeing result. A check that cannot run (no other worker, or
it failed) or cannot decide (two answers and no third, or three answers) leaves the
job as it was, paid, and counts as skipped.

Cancellation: a check cancelled half-way pays nothing it had not judged yet (the
original result included); a reference run under way is cancelled on its worker.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.metrics import Metric, metric
from cocoon_p2p.core.pricing import Price
from cocoon_p2p.execution.tensors import Tensor, to_numpy
from cocoon_p2p.overlay.directory import WorkerOffer

from . import frames as jf
from .attempts import JobFailed
from .receipts import Receipt
from .spotcheck import TIE_GAP, Mismatch, SpotChecker, SpotCheckPolicy, WrongResult, compare_outputs, compare_tokens

if TYPE_CHECKING:
    from .client import JobClient

log = logging.getLogger(__name__)
CHECK_TRIES = 2  # runs a check job gets before it counts as not run


@dataclass(frozen=True)
class Run:
    """One worker's answer to the request under check."""

    worker: bytes
    result: jf.JobResult
    price: Price
    tokens: tuple[int, ...]
    text: str
    receipt: Receipt | None


@dataclass(frozen=True)
class Request:
    """What was asked (enough to ask it again, and to prove what was asked)."""

    model_id: bytes
    inputs: tuple[Tensor, ...]
    texts: tuple[str, ...]
    max_tokens: int
    max_price: int
    timeout_s: float
    require_tee: bool = False


@dataclass(frozen=True)
class CaughtCheating:
    """A worker's wrong result, with what shows it: its signed receipt (None when it sent
    none), the request, its outputs and the agreeing reference."""

    request: Request
    wrong: Run
    reference: Run
    mismatch: Mismatch


class CheatReport(Protocol):
    """Where a client's caught cheats go (the node turns them into gossiped fraud proofs)."""

    async def caught(self, cheat: CaughtCheating) -> None: ...


@dataclass(frozen=True)
class CheckOutcome:
    """What a check decided: the run to keep (paid) and the one found wrong (unpaid), if any."""

    keep: Run
    wrong: Run | None = None
    skipped: bool = False


class ResultChecks:
    """A client's spot checks: draw, re-run, compare, and act on a mismatch."""

    def __init__(
        self,
        client: JobClient,
        policy: SpotCheckPolicy,
        *,
        report: CheatReport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.policy = policy
        self.report = report
        self.checker = SpotChecker(policy, rng)
        self.rng = self.checker.rng
        self.checks = 0
        self.failed = 0
        self.skipped = 0
        self.withheld_nanoton = 0  # not paid for results found wrong

    def chosen(self) -> bool:
        return self.checker.chosen()

    def _mismatch(self, a: Run, b: Run, request: Request) -> Mismatch | None:
        if request.max_tokens > 0:
            return compare_tokens(a.tokens, b.tokens)
        return compare_outputs(a.result.outputs, b.result.outputs, cosine_min=self.policy.cosine_min)

    async def check(self, request: Request, first: Run) -> CheckOutcome:
        """Check ``first`` against other workers. Runs found right are paid here; the one
        found wrong is never paid; the caller pays ``keep`` when it is ``first``."""
        self.checks += 1
        if request.max_tokens > 0:
            return await self._check_generation(request, first)
        reference = await self._run_elsewhere(request, exclude={first.worker})
        if reference is None:
            self.skipped += 1
            return CheckOutcome(keep=first, skipped=True)
        mismatch = self._mismatch(first, reference, request)
        if mismatch is None:
            self._pay(reference)
            return CheckOutcome(keep=first)
        tie = await self._run_elsewhere(request, exclude={first.worker, reference.worker})
        if tie is None:
            # One word against another and nobody to break the tie: the reference is no more
            # likely right than the first (it may be the liar), so nobody is blamed.
            self.skipped += 1
            self._pay(reference)
            return CheckOutcome(keep=first, skipped=True)
        if self._mismatch(first, tie, request) is None:
            wrong, keep = reference, first  # the reference was the odd one out
            mismatch = self._mismatch(reference, tie, request) or mismatch
            self._pay(tie)
        elif self._mismatch(reference, tie, request) is not None:
            self.skipped += 1  # three different answers: nobody can be blamed on this evidence
            self._pay(reference)
            self._pay(tie)
            return CheckOutcome(keep=first, skipped=True)
        else:
            wrong, keep = first, tie
            self._pay(reference)
            self._pay(tie)
        await self._condemn(request, wrong, keep, mismatch)
        return CheckOutcome(keep=keep, wrong=wrong)

    async def _check_generation(self, request: Request, first: Run) -> CheckOutcome:
        """A generation is checked by a verify job on another worker (one teacher-forced
        pass, a few percent of generating it). A verdict of "wrong" is confirmed by a second
        verifier when there is one; when the two disagree, a third decides by majority, and
        without a third nobody is blamed (a lying "right" must not get an honest verifier
        banned). With a single other worker its verdict stands alone. The first worker's
        result is kept either way (a caller has seen its tokens streamed); when it is
        wrong it is not paid."""
        if not first.tokens:  # an engine streams text, not token ids: nothing a verify job can check
            self.skipped += 1
            return CheckOutcome(keep=first, skipped=True)
        verdict = await self._verify_elsewhere(request, first, exclude={first.worker})
        if verdict is None:
            self.skipped += 1
            return CheckOutcome(keep=first, skipped=True)
        verifier, fault = verdict
        if fault is None:
            self._pay(verifier)
            return CheckOutcome(keep=first)
        asked = {first.worker, verifier.worker}
        second = await self._verify_elsewhere(request, first, exclude=asked)
        if second is not None:
            self._pay(second[0])
            if second[1] is None:  # the verifiers disagree: a third one decides
                asked.add(second[0].worker)
                third = await self._verify_elsewhere(request, first, exclude=asked)
                if third is None:
                    self._pay(verifier)
                    self.skipped += 1
                    return CheckOutcome(keep=first, skipped=True)
                self._pay(third[0])
                if third[1] is None:  # two find it right: the first verifier lied, unpaid
                    lie = Mismatch("verify", f"verifier said {fault.reason}: {fault.detail}")
                    await self._condemn(request, verifier, second[0], lie)
                    return CheckOutcome(keep=first, wrong=verifier)
                fault = third[1]  # two find it wrong (the second verifier's "right" was a lie too)
            else:
                fault = second[1]
        self._pay(verifier)
        await self._condemn(request, first, verifier, fault)
        return CheckOutcome(keep=first, wrong=first)

    def _pay(self, run: Run) -> None:
        self.client.pay_later(run.worker, run.result.cost_nanoton)

    async def _verify_elsewhere(
        self, request: Request, claimed: Run, *, exclude: set[bytes]
    ) -> tuple[Run, Mismatch | None] | None:
        """A verify job for ``claimed``'s tokens on a random other worker: (its run, with the
        greedy tokens up to the first fault as its ``tokens``; the fault or None), or None."""
        run = await self._run_elsewhere(request, exclude=exclude, verify=claimed.tokens)
        if run is None:
            return None
        try:
            out = {t.name: to_numpy(t) for t in run.result.outputs}
            next_ids, gaps, length = out["next_ids"].tolist(), out["gap"].tolist(), out["length"].tolist()
        except (KeyError, ValueError):
            return None  # not a verify answer: no verdict
        if len(next_ids) != len(claimed.tokens) or len(gaps) != len(next_ids) or len(length) != 2:
            return None
        fault = next(
            (
                i
                for i, (t, w, g) in enumerate(zip(claimed.tokens, next_ids, gaps, strict=True))
                if t != w and g >= TIE_GAP
            ),
            None,
        )
        reference = replace(run, result=replace(run.result, outputs=()))
        if fault is not None:
            tokens = (*claimed.tokens[:fault], int(next_ids[fault]))
            return replace(reference, tokens=tokens), Mismatch("tokens", f"token {fault}: not the greedy choice")
        if length[0] or length[1]:
            why = "stopped before max_tokens without an end-of-sequence" if length[0] else "tokens past the end"
            return reference, Mismatch("length", why)
        return reference, None

    async def _run_elsewhere(
        self, request: Request, *, exclude: set[bytes], verify: tuple[int, ...] = ()
    ) -> Run | None:
        """The request (a verify job of ``verify`` when given) on a random other worker of
        the model (not paid yet), or None. A run that fails (a busy worker, a stream lost)
        is tried once more, on another worker when there is one: a check that cannot run
        lets a disputed result stand."""
        client = self.client
        offers = await client.offers(request.model_id)
        if request.require_tee and client.tee is not None:
            offers = await client.tee.attested(offers)
        others: list[WorkerOffer] = [
            o for o in offers if o.peer_id not in exclude and o.price.highest <= request.max_price
        ]
        order = self.rng.sample(others, len(others))
        for offer in (order * CHECK_TRIES)[:CHECK_TRIES]:
            run = await self._run_on(request, offer, verify)
            if run is not None:
                return run
        return None

    async def _run_on(self, request: Request, offer: WorkerOffer, verify: tuple[int, ...]) -> Run | None:
        client = self.client
        chunks: list[jf.JobChunk] = []
        try:
            await client._prepare(offer)
            result, price, receipt = await client.run_on(
                offer,
                model_id=request.model_id,
                inputs=request.inputs,
                texts=request.texts,
                max_tokens=request.max_tokens,
                max_price=request.max_price,
                deadline_ms=now_ms() + int(request.timeout_s * 1000),
                on_chunk=chunks.append,
                verify_tokens=verify,
            )
        except JobFailed as exc:
            log.warning("spot check did not run: %s", exc, extra=fields(peer=offer.peer_id))
            return None
        tokens = tuple(t for c in chunks for t in c.token_ids)
        return Run(offer.peer_id, result, price, tokens, "".join(c.text for c in chunks), receipt)

    async def _condemn(self, request: Request, wrong: Run, keep: Run, mismatch: Mismatch) -> None:
        self.failed += 1
        self.withheld_nanoton += wrong.result.cost_nanoton
        log.warning(
            "spot check: a wrong result (%s: %s)", mismatch.reason, mismatch.detail, extra=fields(peer=wrong.worker)
        )
        self.client.feedback.misbehaved(wrong.worker, WrongResult(f"{mismatch.reason}: {mismatch.detail}"))
        self.client.nursery.start_soon(self.client._close_channel, wrong.worker)  # chain work: off this job
        if self.report is not None:
            await self.report.caught(CaughtCheating(request, wrong, keep, mismatch))

    def metrics(self) -> list[Metric]:
        return [
            metric("cocoon_checks_total", "counter", "Results spot-checked", self.checks),
            metric("cocoon_checks_failed_total", "counter", "Spot checks that found a wrong result", self.failed),
            metric("cocoon_checks_skipped_total", "counter", "Spot checks that could not run", self.skipped),
            metric(
                "cocoon_checks_withheld_nanoton_total", "counter", "Not paid for wrong results", self.withheld_nanoton
            ),
        ]
