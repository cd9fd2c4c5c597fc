"""The client's side of ``/cocoon/job/1``: :class:`JobClient` sends jobs.

One long-lived stream per worker carries every job to it (no per-job stream or
protocol negotiation), through a :class:`~.client_link.ClientLink`;
:class:`~.links.JobLinks` opens, replaces and retires the links and runs each attempt;
:meth:`JobClient.infer` drives the retry policy of :mod:`.attempts` (worker
choice by :class:`~.routing.Router`, retries elsewhere on refusal, error or a
worker lost mid-job; a worker that let a job's deadline run out cools down for
longer). A client pays only for a :class:`JobResult` whose cost is price x usage
and whose usage the request can hold (:func:`~.frames.usage_bound`: a worker that
bills more broke the protocol and is reported to ``feedback``). What the
client needs from payments and the overlay comes in through the ports of
:mod:`.ports`, at construction.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import CocoonError, LocalProtocolError
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.metrics import Metric, metric
from cocoon_p2p.core.pricing import Price
from cocoon_p2p.execution.chat_options import ChatOptions, ToolCall
from cocoon_p2p.execution.sampling import GREEDY, FinishReason, Sampling, TokenLogprob
from cocoon_p2p.execution.tensors import Tensor
from cocoon_p2p.overlay.directory import WorkerOffer
from cocoon_p2p.overlay.joblimits import JobSize

from . import frames as jf
from .attempts import JobAttempts, JobFailed
from .checks import CheatReport, ResultChecks, Run
from .checks import Request as CheckedRequest
from .client_link import ClientLink
from .links import JobLinks
from .paying import BackgroundPayments
from .ports import ClientPayments, OfferSource, PeerFeedback, TeeGate
from .receiptlog import ReceiptLog
from .receipts import Receipt
from .routing import Router
from .spotcheck import SpotCheckPolicy
from .worker_stats import JobCounts

__all__ = ["ClientStats", "InferenceResult", "JobClient", "JobFailed", "UnknownOutput"]

log = logging.getLogger(__name__)
PAYMENTS_WAIT_S = 5.0  # how long a job refused for want of payment waits for our vouchers on their way


class UnknownOutput(CocoonError, LookupError):
    """An :class:`InferenceResult` has no output of the name asked for."""


@dataclass(frozen=True)
class InferenceResult:
    """What :meth:`JobClient.infer` returns: the outputs and who was paid what for them."""

    outputs: tuple[Tensor, ...]
    worker: bytes
    usage_units: int
    cost_nanoton: int
    price_nanoton: int  # per input unit (prompt token, embedded token, row)
    latency_s: float
    attempts: int
    token_ids: tuple[int, ...] = ()  # generation: every token, in order
    text: str = ""  # generation: the decoded text
    receipt: Receipt | None = None  # the worker's signed receipt (verified), when it sent one
    verified: bool | None = None  # a spot check's verdict on this result (None: not checked)
    logprobs: tuple[TokenLogprob, ...] = ()  # generation with logprobs asked: one per token
    completion_units: int = 0  # generated tokens among ``usage_units`` (a generation's)
    completion_price_nanoton: int = 0  # per generated token
    finish_reason: FinishReason | None = None  # why a generation ended, as its worker said
    tool_calls: tuple[ToolCall, ...] = ()  # a chat with tools: the calls the engine's model made

    def output(self, name: str | None = None) -> Tensor:
        """The output called ``name`` (the first one when None); UnknownOutput if there is none."""
        for t in self.outputs:
            if name is None or t.name == name:
                return t
        raise UnknownOutput(f"no output {name!r} among {[t.name for t in self.outputs]}")


@dataclass
class ClientStats(JobCounts):
    """What a client's jobs came to (exported by :meth:`JobClient.metrics`); ``latency_s``:
    end to end; ``by_model``: by the first 8 bytes of the model id, in hex."""

    retries: int = 0
    paid_nanoton: int = 0


class JobClient:
    """Sends jobs to workers found by ``offers`` (the node's directory + DHT).

    ``feedback`` hears of workers that broke the protocol or were lost mid-job;
    ``payments`` (None: jobs are not paid for) opens a channel before a job and
    pays for its result; ``tee`` (None: no job may require a TEE) says which
    workers are attested; ``checks`` (None: none) re-checks a share of results on
    other workers and tells ``cheats`` of the wrong ones; ``receipts`` keeps the
    signed receipt of every result paid. Links and their reading tasks live in ``nursery``.
    """

    def __init__(
        self,
        host: Any,
        nursery: trio.Nursery,
        offers: OfferSource,
        *,
        feedback: PeerFeedback,
        payments: ClientPayments | None = None,
        tee: TeeGate | None = None,
        checks: SpotCheckPolicy | None = None,
        cheats: CheatReport | None = None,
        receipts: ReceiptLog | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.nursery = nursery
        self.offers = offers
        self.feedback = feedback
        self.payments = payments
        self.tee = tee
        self.router = Router(rng=rng or random.Random())
        self.receipts = receipts  # the receipts of paid jobs (None: not kept)
        self.checks = ResultChecks(self, checks, report=cheats, rng=self.router.rng) if checks else None
        self.job_links = JobLinks(host, nursery, feedback)
        self.stats = ClientStats()
        self.paying = (
            BackgroundPayments(payments, nursery, linger_s=payments.pay_linger_s) if payments is not None else None
        )

    @property
    def links(self) -> dict[bytes, ClientLink]:
        """The job links open now, by worker (:attr:`.links.JobLinks.links`)."""
        return self.job_links.links

    async def run_on(
        self,
        offer: WorkerOffer,
        *,
        model_id: bytes,
        inputs: tuple[Tensor, ...] = (),
        texts: tuple[str, ...] = (),
        max_tokens: int = 0,
        max_price: int,
        deadline_ms: int,
        on_chunk: Callable[[jf.JobChunk], None] | None = None,
        verify_tokens: tuple[int, ...] = (),
        sampling: Sampling | None = None,
        chat: ChatOptions | None = None,
    ) -> tuple[jf.JobResult, Price, Receipt | None]:
        """One attempt on one worker, over its link: see :meth:`.links.JobLinks.run_on`."""
        return await self.job_links.run_on(
            offer,
            model_id=model_id,
            inputs=inputs,
            texts=texts,
            max_tokens=max_tokens,
            max_price=max_price,
            deadline_ms=deadline_ms,
            on_chunk=on_chunk,
            verify_tokens=verify_tokens,
            sampling=sampling,
            chat=chat,
        )

    async def infer(
        self,
        model_id: bytes,
        *,
        inputs: tuple[Tensor, ...] = (),
        texts: tuple[str, ...] = (),
        max_tokens: int = 0,
        max_price: int,
        timeout_s: float = 30.0,
        attempts: int = 3,
        on_chunk: Callable[[jf.JobChunk], None] | None = None,
        require_tee: bool = False,
        sampling: Sampling | None = None,
        chat: ChatOptions | None = None,
    ) -> InferenceResult:
        """Run a job on the best worker for ``model_id``; retry elsewhere when that fails
        (the policy of :class:`~.attempts.JobAttempts`, up to ``attempts`` workers).
        With ``require_tee`` only workers attested by the client's gate are candidates
        (``no-attested-workers`` when the model has workers but none is attested).

        A job that already streamed chunks to ``on_chunk`` is not retried (the caller
        has seen part of one answer). Raises JobFailed: ``deadline`` when no result
        came within ``timeout_s``, ``no-workers`` when no worker was eligible, else
        the last worker's error. Cancelled, the running attempt is cancelled on its
        worker and nothing is paid.

        ``sampling``: a generation's decoding parameters (None: greedy). Only greedy jobs
        without them are spot-checked: a sampled answer has no single right one. ``chat``:
        a chat for an engine model (its messages, response_format, tools), answered by the
        worker's engine; a model served without an engine refuses it (``bad-input``).
        """
        if timeout_s <= 0:
            raise LocalProtocolError(f"a job needs a positive timeout, not {timeout_s}")
        if require_tee and self.tee is None:
            raise LocalProtocolError("require_tee needs a client configured for attestation")
        if sampling == GREEDY:
            sampling = None  # the same job: sent, signed and checked as plain greedy
        chunks: list[jf.JobChunk] = []

        def collect(chunk: jf.JobChunk) -> None:
            chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk)

        t0 = time.perf_counter()
        deadline_ms = now_ms() + int(timeout_s * 1000)
        plan = JobAttempts(
            self.router, max_price=max_price, max_attempts=attempts, deadline=trio.current_time() + timeout_s
        )
        last: JobFailed | None = None
        worker: bytes | None = None  # of the latest attempt
        why: str | None = None
        done: tuple[jf.JobResult, Price, Receipt | None] | None = None  # the result, its price, its receipt
        rows = inputs[0].shape[0] if inputs and inputs[0].shape else 0
        size = JobSize.of(texts=texts, rows=rows, new_tokens=max_tokens)
        # A bare cancel scope: trio.fail_after's context manager costs a few us more per job.
        with trio.CancelScope(deadline=plan.deadline) as scope:
            while (why := plan.stop(trio.current_time())) is None:
                offers = await self.offers(model_id)
                if require_tee and offers:
                    assert self.tee is not None
                    offers = await self.tee.attested(offers)
                    if not offers:
                        why = jf.NO_ATTESTED_WORKERS
                        last = JobFailed(why, f"no attested worker for model {model_id.hex()[:16]}")
                        break
                fitting = [o for o in offers if o.limits is None or o.limits.refusal(size) is None]
                if offers and not fitting:  # every worker says it would refuse: no need to ask
                    assert offers[0].limits is not None
                    why = jf.TOO_LARGE
                    last = JobFailed(jf.TOO_LARGE, f"beyond every worker's limits: {offers[0].limits.refusal(size)}")
                    break
                offer = plan.choose(fitting, trio.current_time())
                if offer is None:
                    why = jf.NO_WORKERS
                    break
                worker = offer.peer_id
                plan.started(worker)
                t_job = time.perf_counter()
                sent = False  # the job reached the worker (its payment set-up is done)
                try:
                    await self._prepare(offer)
                    sent = True
                    job = partial(
                        self.run_on,
                        offer,
                        model_id=model_id,
                        inputs=inputs,
                        texts=texts,
                        max_tokens=max_tokens,
                        max_price=max_price,
                        deadline_ms=deadline_ms,
                        on_chunk=collect,
                        sampling=sampling,
                        chat=chat,
                    )
                    try:
                        result, price, receipt = await job()
                    except JobFailed as exc:
                        if exc.code != jf.PAYMENT or self.paying is None or not self.paying.owing(worker):
                            raise
                        # Its credit is taken by our payments still on their way: once they are in, again.
                        if not await self.paying.settled(worker, timeout_s=PAYMENTS_WAIT_S):
                            raise  # still not through: the refusal stands
                        result, price, receipt = await job()
                except JobFailed as exc:
                    if exc.code == jf.CHANNEL_ENDED:
                        await self._channel_ended(offer.peer_id)
                    after = plan.failed(offer.peer_id, exc.code, trio.current_time(), streamed=bool(chunks))
                    if after.forget_worker:
                        self.feedback.worker_lost(offer.peer_id)
                    if after.retry:
                        self.stats.retries += 1
                    last = exc
                    if after.wait_s:
                        await trio.sleep(after.wait_s)  # within the job's deadline (its cancel scope)
                    continue
                except BaseException:
                    now = trio.current_time()
                    if sent and now >= plan.deadline:  # the job's own deadline, with the worker
                        plan.timed_out(offer.peer_id, now)
                    else:
                        plan.interrupted(offer.peer_id, now)
                    raise
                plan.succeeded(offer.peer_id, time.perf_counter() - t_job, compute_us=result.compute_us)
                done = result, price, receipt
                break
        if done is not None and worker is not None:
            # Paid outside the job's deadline: a result in hand is owed, and is returned once
            # paid even if that took past the deadline (the payer bounds its wait for an
            # acknowledgement; an unacknowledged voucher goes again later).
            result, price, receipt = done
            tokens = tuple(t for c in chunks for t in c.token_ids)
            text = "".join(c.text for c in chunks)
            paid = False
            verified: bool | None = None
            if self.checks is not None and sampling is None and chat is None and self.checks.chosen():
                request = CheckedRequest(model_id, inputs, texts, max_tokens, max_price, timeout_s, require_tee)
                outcome = await self.checks.check(request, Run(worker, result, price, tokens, text, receipt))
                kept, ours_wrong = outcome.keep, outcome.wrong is not None and outcome.wrong.worker == worker
                verified = None if outcome.skipped else not ours_wrong
                if kept.worker != worker:  # ours was wrong, unpaid: the agreeing run's result (paid) instead
                    worker, result, price, receipt = kept.worker, kept.result, kept.price, kept.receipt
                    tokens, text, paid, verified = kept.tokens, kept.text, True, True
                elif ours_wrong:  # a generation found wrong: kept (its tokens were streamed), never paid
                    paid = True
            if not paid:
                self.pay_later(worker, result.cost_nanoton)
            if receipt is not None and self.receipts is not None:
                self.receipts.append(receipt)
            self.stats.job_done(model_id.hex()[:16], time.perf_counter() - t0)
            return InferenceResult(
                outputs=result.outputs,
                worker=worker,
                usage_units=result.usage_units,
                cost_nanoton=result.cost_nanoton,
                price_nanoton=price.unit,
                latency_s=time.perf_counter() - t0,
                attempts=plan.count,
                token_ids=tokens,
                text=text,
                receipt=receipt,
                verified=verified,
                logprobs=tuple(lp for c in chunks for lp in c.logprobs),
                completion_units=result.completion_units,
                completion_price_nanoton=price.completion,
                finish_reason=result.finish_reason,
                tool_calls=result.tool_calls,
            )
        # Labelled only when a worker offered the model: ids nobody serves must not grow the label set.
        self.stats.job_failed(model_id.hex()[:16] if worker is not None else None)
        if scope.cancelled_caught or why == jf.DEADLINE:
            raise JobFailed(jf.DEADLINE, f"no result within {timeout_s} s", worker=worker)
        if last is not None:
            raise last
        raise JobFailed(jf.NO_WORKERS, f"no eligible worker for model {model_id.hex()[:16]}")

    async def _prepare(self, offer: WorkerOffer) -> None:
        """Payments made ready for a job on the offer's worker (a channel); JobFailed if they
        cannot be."""
        if self.payments is None:
            return
        worker = offer.peer_id
        self.job_links.know_addrs(offer)  # the channel's stream may be the first dial (a relayed address, from the DHT)
        try:
            await self.payments.ensure_channel(worker)
        except CocoonError as exc:
            raise JobFailed(jf.PAYMENT_SETUP, str(exc), worker=worker) from exc

    async def _channel_ended(self, worker: bytes) -> None:
        if self.payments is None:
            return
        try:
            await self.payments.channel_ended(worker)
        except CocoonError as exc:  # the next job's payment set-up tries again
            log.warning("could not replace the channel the worker is closing: %s", exc, extra=fields(peer=worker))

    async def _close_channel(self, worker: bytes) -> None:
        """Close our channel to a worker we banned: cooperatively if it still answers, else
        alone with its newest voucher (the ban's hang-up may cut the cooperative close)."""
        if self.payments is None:
            return
        try:
            await self.payments.settle(worker, uncooperative_if_gone=True)
        except CocoonError as exc:
            log.warning("could not close the channel to the worker: %s", exc, extra=fields(peer=worker))

    def pay_later(self, worker: bytes, cost: int) -> None:
        """Pay ``worker`` ``cost`` for a result already handed on: the caller does not wait
        for the voucher (its write-ahead, its round trip), and the results that arrive while
        one is on its way share the next. The worker's exposure meanwhile is bounded by the
        credit it grants (it refuses jobs beyond it). :meth:`flush_payments` waits for them."""
        self.stats.paid_nanoton += cost
        if self.paying is not None and cost:
            self.paying.pay(worker, cost)

    async def flush_payments(self) -> None:
        """Wait until every result paid for has its voucher sent (acknowledged, or logged to
        go again when the worker is back): before settling, or leaving."""
        if self.paying is not None:
            await self.paying.flush()

    @property
    def payments_late(self) -> int:
        """Vouchers whose acknowledgement did not come at once (logged; they go again)."""
        return self.paying.late if self.paying is not None else 0

    async def generate(
        self,
        model_id: bytes,
        prompt: str,
        *,
        max_tokens: int,
        max_price: int,
        timeout_s: float = 120.0,
        require_tee: bool = False,
        sampling: Sampling | None = None,
        chat: ChatOptions | None = None,
    ) -> AsyncGenerator[jf.JobChunk | InferenceResult, None]:
        """:meth:`infer` for text generation, as an async iterator: each chunk as the
        worker streams it, then the result. Leaving the loop early cancels the job
        (the job runs in this client's nursery, so the generator may be finalised late)."""
        send, recv = trio.open_memory_channel[jf.JobChunk | InferenceResult | JobFailed](math.inf)
        scope = trio.CancelScope()

        def hand_on(item: jf.JobChunk | InferenceResult | JobFailed) -> None:
            # The caller may have left the loop (closing ``recv``) while a chunk was on its way.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                send.send_nowait(item)

        async def run() -> None:
            with scope, send:
                try:
                    result = await self.infer(
                        model_id,
                        texts=(prompt,),
                        max_tokens=max_tokens,
                        max_price=max_price,
                        timeout_s=timeout_s,
                        on_chunk=hand_on,
                        require_tee=require_tee,
                        sampling=sampling,
                        chat=chat,
                    )
                    hand_on(result)
                except JobFailed as exc:
                    hand_on(exc)

        self.nursery.start_soon(run)
        try:
            async with recv:
                async for item in recv:
                    if isinstance(item, JobFailed):
                        raise item
                    yield item
        finally:
            scope.cancel()  # synchronous: safe even when the generator is finalised late

    def metrics(self) -> list[Metric]:
        """The client's series for ``/metrics``: jobs sent, retries, payments, latency."""
        cs = self.stats
        return [
            *cs.series("cocoon_client", "Jobs this client sent", "End-to-end latency, successful jobs"),
            metric("cocoon_client_retries_total", "counter", "Jobs retried on another worker", cs.retries),
            metric("cocoon_client_paid_nanoton_total", "counter", "Nanoton paid for jobs", cs.paid_nanoton),
        ] + (self.checks.metrics() if self.checks is not None else [])
