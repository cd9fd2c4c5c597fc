"""The worker's side of ``/cocoon/job/1``: :class:`JobWorker` serves models.

Admission (unknown model, price cap, deadline, capacity, payment -> typed
refusals), batching (:mod:`.batching`), execution (:mod:`.executor`, in a thread
for slow models), cancellation and deadlines. A quick job for an idle model runs
where its request was parsed, in the connection's reading task, and its
JobAccepted and JobResult leave in one write.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from cocoon_p2p.core.framing import NeedData
from cocoon_p2p.core.metrics import Histogram
from cocoon_p2p.execution.backends import Backend
from cocoon_p2p.execution.executor import Executor, Outcome
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.overlay.protocols import JOB_PROTOCOL
from cocoon_p2p.transport.fastlock import FastLock
from cocoon_p2p.transport.host import close_quietly

from . import frames as jf
from .batching import Batcher
from .connection import JobConnection, Role
from .stream import READ_SIZE, Inbox, StreamIO, remote_peer

log = logging.getLogger("cocoon_p2p.jobs")
# Batches faster than this run on the event loop's thread, when the model is idle: the
# thread hop costs ~0.1 ms (MiniLM batch 1: network/local 1.36 -> 1.28x) and blocks the
# loop at most this long. Under load the average run grows and batches go to a thread.
INLINE_RUN_S = 0.005
FLUSH_ACCEPTED_S = 0.05  # batches slower than this send JobAccepted before they run


@dataclass
class _Served:
    spec: ModelSpec
    executor: Executor
    price_nanoton: int
    batcher: Batcher[_WorkerJob]
    wake: trio.Event = field(default_factory=trio.Event)
    avg_run_s: float = 0.01  # EWMA of one batch's run time; assume slow until measured
    busy: bool = False  # a batch of this model is running


@dataclass(eq=False)
class _WorkerJob:
    req: jf.JobRequest
    link: _WorkerLink
    key: object
    cancelled: bool = False
    admitted_at: float = field(default_factory=time.perf_counter)


class _Flush:
    """An inbox item: send what is pending (the reading task could not without a wait)."""


_FLUSH = _Flush()
_WorkerItem = jf.Frame | Exception | _Flush | None


class _WorkerLink:
    """The worker's end of one client stream.

    On our connections frames are parsed where the bytes arrive, in the
    connection's reading task: a quick job for an idle model runs right there
    (``inline``), and everything else queues, in order, for the stream's task.
    """

    def __init__(self, stream: Any, inline: Callable[[_WorkerLink, jf.JobRequest], bool]) -> None:
        self.stream = stream
        self.io = StreamIO(stream)
        self.peer = remote_peer(stream)
        self.conn = JobConnection(Role.WORKER)
        self.lock = FastLock()  # held only around one write: no scheduler trip when free
        self.jobs: dict[int, _WorkerJob] = {}
        self.pending = bytearray()  # frames held back to share the next write
        self.inbox: Inbox[_WorkerItem] = Inbox()
        self._inline = inline
        self._failed = False
        if self.io.muxed is not None:
            self.io.muxed.deliver_to(self.receive)

    def receive(self, data: bytes | None) -> None:
        """Bytes from the client (None: the stream ended); never raises."""
        if self._failed:
            return
        if data is None:
            self.inbox.put(None)
            return
        try:
            self.conn.receive_data(data)
            while not isinstance(frame := self.conn.next_event(), NeedData):
                if not (isinstance(frame, jf.JobRequest) and self.inbox.idle and self._inline(self, frame)):
                    self.inbox.put(frame)
        except Exception as exc:  # the stream's task raises it
            self._failed = True
            self.inbox.put(exc)

    async def next_item(self) -> _WorkerItem:
        """The next frame (or error, or flush) for the stream's task; None at the end."""
        if self.io.muxed is None:  # another multiplexer than ours: read here
            while not self.inbox.items:
                self.receive(await self.io.read(READ_SIZE) or None)
        return await self.inbox.get()

    def send_later(self, frame: jf.Frame) -> None:
        """Queue ``frame`` to go out with the next :meth:`send` or :meth:`flush`:
        a fast job's JobAccepted then shares one encrypted write with its result."""
        self.pending += self.conn.send(frame)

    def flush_now(self) -> None:
        """Send what is pending if that needs no wait, else leave it to the stream's task."""
        if not self.pending:
            return
        if not self.lock.locked() and self.io.muxed is not None and self.io.muxed.try_write(bytes(self.pending)):
            self.pending = bytearray()
        else:
            self.inbox.put(_FLUSH)

    async def send(self, frame: jf.Frame) -> None:
        async with self.lock:
            try:
                data = self.conn.send(frame)
            except LocalProtocolError:  # e.g. the job already ended: nothing to send
                return
            if self.pending:
                data, self.pending = bytes(self.pending) + data, bytearray()
            await self.io.write(data)

    async def flush(self) -> None:
        async with self.lock:
            if self.pending:
                data, self.pending = bytes(self.pending), bytearray()
                await self.io.write(data)


@dataclass
class WorkerStats:
    jobs_ok: int = 0
    jobs_failed: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    batched_items: int = 0
    earned_nanoton: int = 0
    latency_s: Histogram = field(default_factory=Histogram)  # admission to result, jobs that succeeded


class JobWorker:
    """Serves models on a node's host. ``capacity``: jobs admitted at once (then ``busy``)."""

    def __init__(self, host: Any, nursery: trio.Nursery, *, capacity: int = 8, max_wait_s: float = 0.0) -> None:
        self.host = host
        self.nursery = nursery
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self.models: dict[bytes, _Served] = {}
        self.running = 0
        self.accepting = True
        self.stats = WorkerStats()
        self.on_load_change: Callable[[], None] = lambda: None
        # (peer, error) for a peer that broke the protocol: the node scores it down.
        self.on_misbehaviour: Callable[[bytes, ProtocolError], None] = lambda peer, err: None
        # Payments: may this client start a job (None, or an error code), and bill it.
        self.admission: Callable[[bytes], str | None] = lambda peer: None
        self.on_billed: Callable[[bytes, int], None] = lambda peer, cost: None
        host.set_stream_handler(TProtocol(JOB_PROTOCOL), self._handle_stream)

    def serve(self, spec: ModelSpec, backend: Backend, *, price_nanoton: int) -> None:
        """Serve ``spec`` (already hash-checked) on ``backend`` at ``price_nanoton`` per unit."""
        served = _Served(
            spec, Executor(spec, backend), price_nanoton, Batcher(max_batch=spec.max_batch, max_wait_s=self.max_wait_s)
        )
        self.models[spec.model_id] = served
        self.nursery.start_soon(self._model_loop, served)

    async def _handle_stream(self, stream: Any) -> None:
        link = _WorkerLink(stream, self._try_inline)
        try:
            while (item := await link.next_item()) is not None:
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, jf.JobRequest):
                    await self._admit(link, item)
                elif isinstance(item, jf.JobCancel):
                    await self._cancel(link, item.job_id)
                elif isinstance(item, _Flush):
                    await link.flush()
        except RemoteProtocolError as exc:
            log.info("client broke the job protocol: %s", exc)
            self.on_misbehaviour(remote_peer(stream), exc)
        except Exception as exc:  # the stream broke: its jobs are abandoned
            log.debug("job stream ended: %r", exc)
        finally:
            for job in link.jobs.values():
                job.cancelled = True
            await close_quietly(stream)

    async def _refuse(self, link: _WorkerLink, req: jf.JobRequest, code: str, message: str) -> None:
        self.stats.refused[code] = self.stats.refused.get(code, 0) + 1
        await link.send(jf.JobError(job_id=req.job_id, code=code, message=message))

    def _refusal(self, link: _WorkerLink, req: jf.JobRequest, served: _Served | None) -> tuple[str, str] | None:
        """Why ``req`` cannot start now, as (code, message), if it cannot."""
        if not self.accepting:
            return jf.SHUTTING_DOWN, "worker is shutting down"
        if served is None:
            return jf.UNKNOWN_MODEL, f"model {req.model_id.hex()[:16]} not served"
        if served.price_nanoton > req.max_price_nanoton:
            return jf.PRICE, f"price {served.price_nanoton} above cap"
        if req.deadline_ms <= now_ms():
            return jf.DEADLINE, "deadline already passed"
        if self.running >= self.capacity:
            return jf.BUSY, f"all {self.capacity} slots taken"
        if (code := self.admission(link.peer)) is not None:
            return code, "open a payment channel or pay what is owed first"
        return None

    def _accept(self, link: _WorkerLink, req: jf.JobRequest, key: object, *, report: bool = True) -> _WorkerJob:
        job = _WorkerJob(req, link, key)
        link.jobs[req.job_id] = job
        self.running += 1
        if report:
            self.on_load_change()
        return job

    async def _admit(self, link: _WorkerLink, req: jf.JobRequest) -> None:
        served = self.models.get(req.model_id)
        if (refusal := self._refusal(link, req, served)) is not None:
            return await self._refuse(link, req, *refusal)
        assert served is not None
        try:
            key = served.executor.check(req)
        except ProtocolError as exc:
            return await self._refuse(link, req, jf.BAD_INPUT, str(exc))
        job = self._accept(link, req, key)
        accepted = jf.JobAccepted(job_id=req.job_id, price_nanoton=served.price_nanoton, unit=served.spec.unit)
        if served.spec.kind == "generation":  # token by token, never batched
            await link.send(accepted)
            self.nursery.start_soon(self._run_generation, served, job)
            return
        link.send_later(accepted)  # flushed when the batch starts, if it will take a while
        if _quick_and_idle(served):  # run it here, without waking the model loop
            frame = self._run_now(served, job)
            try:
                await link.flush()
            except Exception as exc:  # the client went away; the job is over either way
                log.debug("could not deliver job %d: %r", req.job_id, exc)
            self._close(job, frame)
            return
        served.batcher.add(key, job, trio.current_time())
        served.wake.set()

    def _try_inline(self, link: _WorkerLink, req: jf.JobRequest) -> bool:
        """Admit and run a quick job for an idle model where its request was parsed
        (the connection's reading task), when nothing on the way needs a wait: no
        task switch before the run. False: the stream's task takes it as usual
        (refusals too). A run inline blocks the event loop, as any inline run does."""
        served = self.models.get(req.model_id)
        if served is None or served.spec.kind == "generation" or not _quick_and_idle(served):
            return False
        if self._refusal(link, req, served) is not None:
            return False
        try:
            key = served.executor.check(req)
        except ProtocolError:
            return False
        # Running and done within this call: no announcement can see the load change.
        job = self._accept(link, req, key, report=False)
        link.send_later(jf.JobAccepted(job_id=req.job_id, price_nanoton=served.price_nanoton, unit=served.spec.unit))
        frame = self._run_now(served, job)
        link.flush_now()
        self._close(job, frame, report=False)  # the books after the answer has gone
        return True

    def _run_now(self, served: _Served, job: _WorkerJob) -> jf.Frame:
        """Run one quick job on this thread: its last frame, queued in the link's pending
        bytes (the caller sends them, then closes the books with :meth:`_close`)."""
        served.busy = True
        try:
            self.stats.batches += 1
            self.stats.batched_items += 1
            try:
                outcomes, elapsed = _timed_run(served, [job.req])
            except Exception as exc:  # a backend failure fails this job, not the worker
                log.warning("backend failed on %s: %s", served.spec.name, exc)
                frame = _last_frame(job, error=(jf.BACKEND, str(exc)[:200]))
            else:
                served.avg_run_s += 0.2 * (elapsed - served.avg_run_s)
                frame = _last_frame(job, outcome=outcomes[0], price=served.price_nanoton, compute_us=int(elapsed * 1e6))
            with contextlib.suppress(LocalProtocolError):  # as send() does: nothing to send
                job.link.send_later(frame)
            return frame
        finally:
            served.busy = False
            if served.batcher.waiting():
                served.wake.set()  # jobs that queued meanwhile

    async def _cancel(self, link: _WorkerLink, job_id: int) -> None:
        job = link.jobs.get(job_id)
        if job is None:
            return
        job.cancelled = True
        served = self.models[job.req.model_id]
        if served.batcher.remove(job.key, job):  # not started: end it now
            await self._finish(job, error=(jf.CANCELLED, "cancelled by the client"))

    async def _model_loop(self, served: _Served) -> None:
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

    async def _run_batch(self, served: _Served, jobs: tuple[_WorkerJob, ...]) -> None:
        live = []
        for job in jobs:
            if job.cancelled:
                await self._finish(job, error=(jf.CANCELLED, "cancelled by the client"))
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
        requests = [j.req for j in live]
        try:
            # A quick model runs inline: a thread hop would cost more than it saves.
            if quick:
                outcomes, elapsed = _timed_run(served, requests)
            else:
                outcomes, elapsed = await trio.to_thread.run_sync(_timed_run, served, requests)
        except Exception as exc:  # a backend failure fails these jobs, not the worker
            log.warning("backend failed on %s: %s", served.spec.name, exc)
            for job in live:
                await self._finish(job, error=(jf.BACKEND, str(exc)[:200]))
            return
        served.avg_run_s += 0.2 * (elapsed - served.avg_run_s)
        compute_us = int(elapsed * 1e6)
        for job, outcome in zip(live, outcomes, strict=True):
            if job.cancelled:  # stopped while running: no result, no charge
                await self._finish(job, error=(jf.CANCELLED, "cancelled by the client"))
            else:
                await self._finish(job, outcome=outcome, price=served.price_nanoton, compute_us=compute_us)

    async def _run_generation(self, served: _Served, job: _WorkerJob) -> None:
        """Stream tokens as they come; stop between tokens on cancel, deadline or a lost client."""
        t0 = time.perf_counter()
        try:
            stream, prompt_tokens = served.executor.token_stream(job.req)
        except ProtocolError as exc:
            return await self._finish(job, error=(jf.BAD_INPUT, str(exc)))
        seq = 0
        while True:
            if job.cancelled:
                return await self._finish(job, error=(jf.CANCELLED, "cancelled by the client"))
            if job.req.deadline_ms <= now_ms():
                return await self._finish(job, error=(jf.DEADLINE, f"deadline passed after {seq} tokens"))
            try:
                step = await trio.to_thread.run_sync(stream.next_or_none)
            except Exception as exc:
                log.warning("generation failed on %s: %s", served.spec.name, exc)
                return await self._finish(job, error=(jf.BACKEND, str(exc)[:200]))
            if step is None:
                break
            token, text = step
            try:
                await job.link.send(jf.JobChunk(job_id=job.req.job_id, seq=seq, token_ids=(token,), text=text))
            except Exception:  # the client is gone: stop generating for nobody
                job.cancelled = True
                continue
            seq += 1
        units = prompt_tokens + seq
        compute_us = int((time.perf_counter() - t0) * 1e6)
        await self._finish(job, outcome=Outcome((), units), price=served.price_nanoton, compute_us=compute_us)

    async def _finish(
        self,
        job: _WorkerJob,
        *,
        outcome: Outcome | None = None,
        price: int = 0,
        compute_us: int = 0,
        error: tuple[str, str] | None = None,
    ) -> None:
        frame = _last_frame(job, outcome=outcome, price=price, compute_us=compute_us, error=error)
        if not self._close(job, frame):
            return
        try:
            await job.link.send(frame)
        except Exception as exc:  # the client went away; the job is over either way
            log.debug("could not deliver job %d: %r", job.req.job_id, exc)

    def _close(self, job: _WorkerJob, frame: jf.Frame, *, report: bool = True) -> bool:
        """Close the books on ``job``, ended by ``frame``: counts, load, the bill.
        False if it had ended already (nothing to send)."""
        if job.link.jobs.pop(job.req.job_id, None) is None:
            return False
        self.running -= 1
        if report:
            self.on_load_change()
        if isinstance(frame, jf.JobResult):
            self.stats.jobs_ok += 1
            self.stats.latency_s.observe(time.perf_counter() - job.admitted_at)
            self.stats.earned_nanoton += frame.cost_nanoton
            self.on_billed(job.link.peer, frame.cost_nanoton)
        else:
            self.stats.jobs_failed += 1
        return True


def _last_frame(
    job: _WorkerJob,
    *,
    outcome: Outcome | None = None,
    price: int = 0,
    compute_us: int = 0,
    error: tuple[str, str] | None = None,
) -> jf.JobResult | jf.JobError:
    """The frame that ends ``job``: its result, or the error (a result too large to send is one)."""
    if outcome is not None:
        frame = jf.JobResult(
            job_id=job.req.job_id,
            outputs=outcome.outputs,
            usage_units=outcome.units,
            cost_nanoton=outcome.units * price,
            compute_us=compute_us,
        )
        if not _maybe_large(outcome):
            return frame
        try:
            jf.encode_frame(frame)
        except LocalProtocolError:  # a result too large to send: the job fails, unpaid
            error = (jf.TOO_LARGE, "the result exceeds the frame limit")
        else:
            return frame
    assert error is not None
    return jf.JobError(job_id=job.req.job_id, code=error[0], message=error[1])


def _quick_and_idle(served: _Served) -> bool:
    """A job for ``served`` may run inline now: the model is idle, nothing waits for it,
    and its runs are quick."""
    return not served.busy and not served.batcher.waiting() and served.avg_run_s < INLINE_RUN_S


def _timed_run(served: _Served, requests: list[jf.JobRequest]) -> tuple[list[Outcome], float]:
    """The run alone, and how long it took (without any thread hop)."""
    t0 = time.perf_counter()
    outcomes = served.executor.run(requests)
    return outcomes, time.perf_counter() - t0


def _maybe_large(outcome: Outcome) -> bool:
    """Whether a result could exceed the frame limit (only then is it encoded twice)."""
    return sum(len(t.data) for t in outcome.outputs) > jf.MAX_FRAME // 2
