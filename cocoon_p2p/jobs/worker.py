"""The worker's side of ``/cocoon/job/1``: :class:`JobWorker` serves models.

Admission (unknown model, price cap, deadline, capacity, payment, the model's
input limits -> typed refusals, before any work starts; each admitted job holds
a slot that its stream gives back when the job or the stream ends, see
:mod:`.slots`), batching (:mod:`.batching`), execution (the executor, in a thread
for slow models), cancellation and deadlines. A quick job for an idle model runs
where its request was parsed, in the connection's reading task
(:mod:`.worker_link`), and its JobAccepted and JobResult leave in one write.
What the worker needs from payments and the overlay comes in through the ports
of :mod:`.ports`, at construction.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import ConfigError, LocalProtocolError, ProtocolError
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.metrics import Metric
from cocoon_p2p.core.pricing import FREE, Price
from cocoon_p2p.execution.backends import Backend
from cocoon_p2p.execution.engine import Generation
from cocoon_p2p.execution.engine_runner import EngineRunner
from cocoon_p2p.execution.executor import Executor, Outcome
from cocoon_p2p.execution.limits import InputLimits
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.transport.host import close_quietly

from . import frames as jf
from .batching import Batcher
from .ports import LoadReport, PeerFeedback, WorkerPayments
from .serving import (
    CLIENT_CANCELLED,
    FLUSH_ACCEPTED_S,
    INLINE_RUN_S,
    EngineWatch,
    HealthHook,
    Served,
    last_frame,
    open_generation,
    run_request,
    stream_generation,
    timed_run,
    watch_engine,
)
from .slots import Slots
from .worker_link import Flush, WorkerJob, WorkerLink
from .worker_stats import WorkerStats, model_label, worker_metrics

__all__ = ["EngineWatch", "HealthHook", "JobWorker", "WorkerStats"]

log = logging.getLogger(__name__)


def _input_code(exc: ProtocolError) -> str:
    """The error code for a request the model refused: its own if it is one of ours."""
    return exc.code if exc.code in (jf.TOO_LARGE, jf.BAD_INPUT) else jf.BAD_INPUT


class JobWorker:
    """Serves models on a node's host: ``capacity`` jobs admitted at once (then ``busy``).

    ``feedback`` hears of clients that broke the protocol; ``load`` gets the
    running count and free capacity per model whenever they change;
    ``payments`` (None: jobs are free) admits clients and is billed for each
    result sent. ``per_client`` (None: ``capacity``) caps the jobs one client
    runs at once; beyond it that client is answered ``busy``. ``max_wait_s`` > 0
    holds a lone job that long for batch company.
    Tasks run in ``nursery``: the worker stops with it, and a job cut off there
    is neither answered nor billed.
    """

    def __init__(
        self,
        host: Any,
        nursery: trio.Nursery,
        *,
        capacity: int,
        feedback: PeerFeedback,
        load: LoadReport,
        payments: WorkerPayments | None = None,
        max_wait_s: float = 0.0,
        per_client: int | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.host = host
        self.identity = identity  # signs each result's receipt (None: results carry none)
        self.nursery = nursery
        self.slots = Slots(capacity, per_client=per_client)  # each held by the stream of its job (see .slots)
        self.feedback = feedback
        self.load = load
        self.payments = payments
        self.max_wait_s = max_wait_s
        self.models: dict[bytes, Served] = {}
        self._streams: dict[WorkerJob, Generation] = {}  # generations running, closed on cancel
        self._accepting = True
        self.stats = WorkerStats()
        host.set_stream_handler(TProtocol(jf.JOB_PROTOCOL), self._handle_stream)

    def serve(
        self,
        spec: ModelSpec,
        backend: Backend,
        *,
        price_nanoton: int,
        limits: InputLimits | None = None,
        completion_price_nanoton: int | None = None,
    ) -> None:
        """Serve ``spec`` (already hash-checked) on ``backend`` at ``price_nanoton`` per unit
        (and ``completion_price_nanoton`` per generated token; None: the same).

        ``limits``: what one job may ask of it (None: :meth:`InputLimits.for_model`,
        derived from the model); a job beyond them is refused (``too-large``) before
        any work starts. :meth:`limits` tells them, for the node to advertise."""
        price = Price.of(price_nanoton, completion_price_nanoton)
        batcher: Batcher[WorkerJob] = Batcher(max_batch=spec.max_batch, max_wait_s=self.max_wait_s)
        served = Served(spec, Executor(spec, backend, limits=limits), price, batcher)
        self.models[spec.model_id] = served
        self.nursery.start_soon(self._model_loop, served)

    def serve_engine(
        self,
        runner: EngineRunner,
        *,
        price_nanoton: int,
        capacity: int,
        watch: EngineWatch | None = None,
        on_health: HealthHook | None = None,
        completion_price_nanoton: int | None = None,
    ) -> None:
        """Serve the model an engine runs (``runner.spec``, its weights' id) at
        ``price_nanoton`` per prompt token (and ``completion_price_nanoton`` per generated
        one; None: the same): at most ``capacity`` of its jobs at once (more are
        answered ``busy``), each a stream from the engine. ``watch`` (None: the defaults)
        probes the engine in this worker's nursery; when it goes down, its jobs are
        refused with ``backend`` and ``on_health(model_id, False)`` is told (then True
        when it is back)."""
        price = Price.of(price_nanoton, completion_price_nanoton)
        if capacity < 1:
            raise ConfigError(f"an engine runs at least one job at once, not {capacity}")
        spec = runner.spec
        batcher: Batcher[WorkerJob] = Batcher(max_batch=1, max_wait_s=0.0)  # never used: generations stream
        served = Served(spec, runner, price, batcher, limit=capacity, threads=trio.CapacityLimiter(capacity))
        self.models[spec.model_id] = served
        self.nursery.start_soon(watch_engine, served, runner, watch or EngineWatch(), on_health)

    def limits(self, model_id: bytes) -> InputLimits:
        """The input limits a served model's jobs are held to (KeyError: not served)."""
        return self.models[model_id].executor.limits

    @property
    def capacity(self) -> int:
        """Jobs admitted at once, at most."""
        return self.slots.capacity

    @property
    def running(self) -> int:
        """Jobs admitted and not finished: the slots that streams hold."""
        return self.slots.taken

    @property
    def accepting(self) -> bool:
        """Whether new jobs may start (until :meth:`stop_accepting`)."""
        return self._accepting

    def stop_accepting(self) -> None:
        """Refuse new jobs with ``shutting-down`` from now on; running ones finish."""
        self._accepting = False

    def metrics(self) -> list[Metric]:
        """The worker's series for ``/metrics``: jobs, load, batches, earnings, refusals."""
        return worker_metrics(self.stats, running=self.running, capacity=self.capacity)

    # ---- streams and admission -------------------------------------------------------

    async def _handle_stream(self, stream: Any) -> None:
        link = WorkerLink(stream, self._try_inline, self.slots)
        try:
            while (item := await link.next_item()) is not None:
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, jf.JobRequest):
                    await self._admit(link, item)
                elif isinstance(item, jf.JobCancel):
                    await self._cancel(link, item.job_id)
                elif isinstance(item, Flush):
                    await link.flush()
        except Exception as exc:  # the stream broke: its jobs are abandoned
            log.debug("job stream ended: %r", exc, extra=fields(peer=link.peer))
        finally:
            if (broken := link.conn.errored) is not None:  # whichever path ran into it first
                log.info("client broke the job protocol: %s", broken, extra=fields(peer=link.peer))
                self.feedback.misbehaved(link.peer, broken)
            self._abandon(link)
            await close_quietly(stream)

    def _abandon(self, link: WorkerLink) -> None:
        """The stream of ``link`` ended: its slots go back now, whatever ended it; its jobs
        still queued leave their batches, and those running end unanswered and unbilled."""
        abandoned = link.close()
        for job in abandoned:
            served = self.models.get(job.req.model_id)
            if served is not None:
                served.batcher.remove(job.key, job)
                served.running -= 1
            job.cancelled = True  # a generation still running stops (unanswered)
            if (stream := self._streams.get(job)) is not None and stream.interruptible:
                stream.close()  # nobody to stream to: the engine stops now
            self.stats.job_failed(model_label(served.spec) if served is not None else None)
        if abandoned:
            self._report_load()

    async def _refuse(self, link: WorkerLink, req: jf.JobRequest, code: str, message: str) -> None:
        served = self.models.get(req.model_id)  # a model it serves, else no label (unbounded ids)
        self.stats.job_refused(code, model_label(served.spec) if served is not None else None)
        await link.send(jf.JobError(job_id=req.job_id, code=code, message=message))

    def _refusal(self, link: WorkerLink, req: jf.JobRequest, served: Served | None) -> tuple[str, str] | None:
        """Why ``req`` cannot start now, as (code, message), if it cannot."""
        if not self._accepting:
            return jf.SHUTTING_DOWN, "worker is shutting down"
        if served is None:
            return jf.UNKNOWN_MODEL, f"model {req.model_id.hex()[:16]} not served"
        if served.price.highest > req.max_price_nanoton:
            return jf.PRICE, f"price {served.price.highest} above cap"
        if req.deadline_ms <= now_ms():
            return jf.DEADLINE, "deadline already passed"
        if not served.available:
            return jf.BACKEND, "the model's engine is down"
        if served.limit is not None and served.running >= served.limit:
            return jf.BUSY, f"all {served.limit} slots of this model taken"
        if self.running >= self.capacity:
            return jf.BUSY, f"all {self.capacity} slots taken"
        if self.slots.free_for(link.peer) <= 0:
            return jf.BUSY, f"at most {self.slots.per_client} jobs per client at once"
        if self.payments is not None and (code := self.payments.admission(link.peer)) is not None:
            if code == jf.CHANNEL_ENDED:
                return code, "your payment channel here is closing: open a new one"
            return code, "open a payment channel or pay what is owed first"
        return None

    def _accept(self, link: WorkerLink, job: WorkerJob, *, report: bool = True) -> bool:
        """Give ``job`` a slot, held by its stream; False when the stream has ended meanwhile."""
        if not link.jobs.hold(job.req.job_id, job):
            return False
        self.models[job.req.model_id].running += 1
        if report:
            self._report_load()
        return True

    def _report_load(self) -> None:
        free = max(0, self.capacity - self.running)
        self.load.set_load(
            running_jobs=self.running,
            free_capacity={
                m: free if s.limit is None else max(0, min(free, s.limit - s.running)) for m, s in self.models.items()
            },
        )

    async def _admit(self, link: WorkerLink, req: jf.JobRequest) -> None:
        served = self.models.get(req.model_id)
        if (refusal := self._refusal(link, req, served)) is not None:
            return await self._refuse(link, req, *refusal)
        assert served is not None  # _refusal said so
        run = run_request(req)
        try:
            key = served.executor.check(run)
        except ProtocolError as exc:  # too-large (beyond the limits) or bad-input (does not fit)
            return await self._refuse(link, req, _input_code(exc), str(exc))
        job = WorkerJob(req, run, link, key)
        if not self._accept(link, job):
            return
        accepted = served.accepted(req.job_id)
        if served.spec.kind == "generation":  # token by token, never batched
            await link.send(accepted)
            self.nursery.start_soon(self._run_verify if req.verify_tokens else self._run_generation, served, job)
            return
        link.send_later(accepted)  # flushed when the batch starts, if it will take a while
        if served.quick_and_idle():  # run it here, without waking the model loop
            frame = self._run_now(served, job)
            try:
                await link.flush()
            except Exception as exc:  # the client went away; the job is over either way
                log.debug("could not deliver the job: %r", exc, extra=fields(peer=link.peer, job=req.job_id))
            self._close(job, frame)
            return
        served.batcher.add(key, job, trio.current_time())
        served.wake.set()

    def _try_inline(self, link: WorkerLink, req: jf.JobRequest) -> bool:
        """Admit and run a quick job for an idle model where its request was parsed
        (the connection's reading task), when nothing on the way needs a wait: no
        task switch before the run. False: the stream's task takes it as usual
        (refusals too). A run inline blocks the event loop, as any inline run does."""
        served = self.models.get(req.model_id)
        if served is None or served.spec.kind == "generation" or not served.quick_and_idle():
            return False
        if self._refusal(link, req, served) is not None:
            return False
        run = run_request(req)
        try:
            key = served.executor.check(run)
        except ProtocolError:
            return False
        # Running and done within this call: no announcement can see the load change.
        job = WorkerJob(req, run, link, key)
        if not self._accept(link, job, report=False):
            return False
        link.send_later(served.accepted(req.job_id))
        frame = self._run_now(served, job)
        link.flush_now()
        self._close(job, frame, report=False)  # the books after the answer has gone
        return True

    async def _cancel(self, link: WorkerLink, job_id: int) -> None:
        job = link.jobs.get(job_id)
        if job is None:
            return
        job.cancelled = True
        if (stream := self._streams.get(job)) is not None and stream.interruptible:
            stream.close()  # closes the upstream request; its thread wakes and the job ends
        served = self.models[job.req.model_id]
        if served.batcher.remove(job.key, job):  # not started: end it now
            await self._finish(job, error=CLIENT_CANCELLED)

    # ---- running models ------------------------------------------------------------------

    def _run_now(self, served: Served, job: WorkerJob) -> jf.Frame:
        """Run one quick job on this thread: its last frame, queued in the link's pending
        bytes (the caller sends them, then closes the books with :meth:`_close`)."""
        served.busy = True
        try:
            self.stats.batches += 1
            self.stats.batched_items += 1
            try:
                outcomes, elapsed = timed_run(served, [job.run])
            except Exception as exc:  # a backend failure fails this job, not the worker
                log.warning(
                    "backend failed: %s",
                    exc,
                    extra=fields(model=served.spec.name, peer=job.link.peer, job=job.req.job_id),
                )
                frame = last_frame(job, error=(jf.BACKEND, str(exc)[:200]))
            else:
                served.observe_run(elapsed)
                frame = last_frame(
                    job,
                    outcome=outcomes[0],
                    price=served.price,
                    compute_us=int(elapsed * 1e6),
                    signer=self.identity,
                )
            with contextlib.suppress(LocalProtocolError):  # as send() does: nothing to send
                job.link.send_later(frame)
            return frame
        finally:
            served.busy = False
            if served.batcher.waiting():
                served.wake.set()  # jobs that queued meanwhile

    async def _model_loop(self, served: Served) -> None:
        """Runs the model's batches one at a time; jobs queue meanwhile and form the next."""
        while True:
            batch = None if served.busy else served.batcher.take(trio.current_time())
            if batch is not None:
                served.busy = True
                try:
                    await self._run_batch(served, batch.items)
                finally:
                    served.busy = False
                continue
            deadline = served.batcher.next_deadline()
            with trio.move_on_at(deadline if deadline is not None else math.inf):
                await served.wake.wait()
            served.wake = trio.Event()

    async def _run_batch(self, served: Served, jobs: tuple[WorkerJob, ...]) -> None:
        live = []
        for job in jobs:
            if job.cancelled:
                await self._finish(job, error=CLIENT_CANCELLED)
            elif job.req.deadline_ms <= now_ms():
                await self._finish(job, error=(jf.DEADLINE, "deadline passed while queued"))
            else:
                live.append(job)
        if not live:
            return
        self.stats.batches += 1
        self.stats.batched_items += len(live)
        quick = served.avg_run_s < INLINE_RUN_S
        if served.avg_run_s > FLUSH_ACCEPTED_S:  # a long run: the client hears "accepted" now
            for link in {job.link for job in live}:
                with contextlib.suppress(Exception):
                    await link.flush()
        runs = [j.run for j in live]
        try:
            # A quick model runs inline: a thread hop would cost more than it saves.
            if quick:
                outcomes, elapsed = timed_run(served, runs)
            else:
                outcomes, elapsed = await trio.to_thread.run_sync(timed_run, served, runs)
        except Exception as exc:  # a backend failure fails these jobs, not the worker
            log.warning("backend failed on a batch of %d: %s", len(live), exc, extra=fields(model=served.spec.name))
            for job in live:
                await self._finish(job, error=(jf.BACKEND, str(exc)[:200]))
            return
        served.observe_run(elapsed)
        compute_us = int(elapsed * 1e6)
        for job, outcome in zip(live, outcomes, strict=True):
            if job.cancelled:  # stopped while running: no result, no charge
                await self._finish(job, error=CLIENT_CANCELLED)
            else:
                await self._finish(job, outcome=outcome, price=served.price, compute_us=compute_us)

    async def _run_verify(self, served: Served, job: WorkerJob) -> None:
        """A verify job: one teacher-forced pass over the prompt and the tokens, in a thread."""
        t0 = time.perf_counter()
        try:
            outcome = await trio.to_thread.run_sync(served.executor.verify, job.run)
        except ProtocolError as exc:
            return await self._finish(job, error=(_input_code(exc), str(exc)))
        except Exception as exc:  # a backend failure fails this job, not the worker
            log.warning(
                "verification failed: %s",
                exc,
                extra=fields(model=served.spec.name, peer=job.link.peer, job=job.req.job_id),
            )
            return await self._finish(job, error=(jf.BACKEND, str(exc)[:200]))
        compute_us = int((time.perf_counter() - t0) * 1e6)
        await self._finish(job, outcome=outcome, price=served.price, compute_us=compute_us)

    async def _run_generation(self, served: Served, job: WorkerJob) -> None:
        """Stream a generation chunk by chunk; stop on cancel, deadline or a lost client.

        An ONNX model stops between tokens. An engine's stream is cut off at once: a
        cancel closes it (:meth:`_cancel`), and so does its deadline, or this task's
        cancellation (the thread is abandoned, and wakes when its stream closes)."""
        t0 = time.perf_counter()
        try:
            gen = open_generation(served.executor, job.run)
        except ProtocolError as exc:
            return await self._finish(job, error=(_input_code(exc), str(exc)))
        self._streams[job] = gen
        try:
            ended = await stream_generation(served, job, gen)
        finally:
            del self._streams[job]
            gen.close()
        if ended.error is not None:
            return await self._finish(job, error=ended.error)
        await self._finish(
            job,
            outcome=Outcome.generated(*gen.units(ended.chunks), gen.reason(ended.chunks), gen.tool_calls()),
            price=served.price,
            compute_us=int((time.perf_counter() - t0) * 1e6),
            tokens=ended.tokens,
            text=ended.text,
        )

    # ---- the end of a job ------------------------------------------------------------------

    async def _finish(
        self,
        job: WorkerJob,
        *,
        outcome: Outcome | None = None,
        price: Price = FREE,
        compute_us: int = 0,
        error: tuple[str, str] | None = None,
        tokens: tuple[int, ...] = (),
        text: str = "",
    ) -> None:
        frame = last_frame(
            job,
            outcome=outcome,
            price=price,
            compute_us=compute_us,
            error=error,
            signer=self.identity,
            token_ids=tokens,
            text=text,
        )
        if not self._close(job, frame):
            return
        try:
            await job.link.send(frame)
        except Exception as exc:  # the client went away; the job is over either way
            log.debug("could not deliver the job: %r", exc, extra=fields(peer=job.link.peer, job=job.req.job_id))

    def _close(self, job: WorkerJob, frame: jf.Frame, *, report: bool = True) -> bool:
        """Close the books on ``job``, ended by ``frame``: counts, load, the bill.
        False if it had ended already (nothing to send)."""
        if job.link.jobs.release(job.req.job_id) is None:
            return False
        served = self.models[job.req.model_id]
        served.running -= 1
        if report:
            self._report_load()
        if isinstance(frame, jf.JobResult):
            self.stats.job_done(model_label(served.spec), time.perf_counter() - job.admitted_at)
            self.stats.earned_nanoton += frame.cost_nanoton
            if self.payments is not None:
                self.payments.bill(job.link.peer, frame.cost_nanoton)
        else:
            self.stats.job_failed(model_label(served.spec))
        return True
