"""Trio services that carry jobs over ``/cocoon/job/1`` streams (Noise + yamux).

:class:`JobWorker` serves models: admission (unknown model, price cap, deadline,
capacity -> typed refusals), batching (:mod:`.batching`), execution in a thread
(:mod:`.executor`), cancellation and deadlines.

:class:`JobClient` sends jobs: one long-lived stream per worker carries every
job to it (no per-job stream or protocol negotiation), a reader task per stream
routes frames to the waiting callers, and :meth:`JobClient.infer` picks workers
with :class:`~.routing.Router` and retries elsewhere on refusal, error or a
worker lost mid-job. A client is charged only by a :class:`JobResult`.

Cancellation: both services run their tasks in the node's nursery, so they stop
with the node. A caller cancelled while waiting for a job sends a best-effort
``JobCancel`` and the job is forgotten; the worker then stops it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from . import jobframes as jf
from .backends import Backend
from .batching import Batcher
from .directory import WorkerOffer
from .errors import CocoonError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .executor import Executor, Outcome
from .fastlock import FastLock
from .host import close_quietly, unblock_peer
from .jobconn import JobConnection, NeedData, Role
from .metrics import Histogram
from .models import ModelSpec
from .protocols import JOB_PROTOCOL
from .routing import Router
from .tensors import Tensor

log = logging.getLogger("cocoon_p2p.jobs")
READ_SIZE = 1 << 16
# Batches faster than this run on the event loop's thread, when the model is idle: the
# thread hop costs ~0.1 ms (MiniLM batch 1: network/local 1.36 -> 1.28x) and blocks the
# loop at most this long. Under load the average run grows and batches go to a thread.
INLINE_RUN_S = 0.005
FLUSH_ACCEPTED_S = 0.05  # batches slower than this send JobAccepted before they run


def now_ms() -> int:
    return int(time.time() * 1000)


class JobFailed(CocoonError):
    """A job ended without a result. ``code`` is the worker's error code or
    ``worker-lost`` / ``no-workers``; ``retryable`` says another worker may succeed."""

    def __init__(self, code: str, message: str, *, worker: bytes | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.worker = worker

    @property
    def retryable(self) -> bool:
        return jf.retryable(self.code)


@dataclass(frozen=True)
class InferenceResult:
    """What :meth:`JobClient.infer` returns: the outputs and who was paid what for them."""

    outputs: tuple[Tensor, ...]
    worker: bytes
    usage_units: int
    cost_nanoton: int
    price_nanoton: int
    latency_s: float
    attempts: int
    token_ids: tuple[int, ...] = ()  # generation: every token, in order
    text: str = ""  # generation: the decoded text

    def output(self, name: str | None = None) -> Tensor:
        return self.outputs[0] if name is None else next(t for t in self.outputs if t.name == name)


# ---- worker --------------------------------------------------------------------------------


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


class _WorkerLink:
    """The worker's end of one client stream."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.peer = _remote_peer(stream)
        self.conn = JobConnection(Role.WORKER)
        self.lock = FastLock()  # held only around one write: no scheduler trip when free
        self.jobs: dict[int, _WorkerJob] = {}
        self.pending = bytearray()  # frames held back to share the next write

    def send_later(self, frame: jf.Frame) -> None:
        """Queue ``frame`` to go out with the next :meth:`send` or :meth:`flush`:
        a fast job's JobAccepted then shares one encrypted write with its result."""
        self.pending += self.conn.send(frame)

    async def send(self, frame: jf.Frame) -> None:
        async with self.lock:
            try:
                data = self.conn.send(frame)
            except LocalProtocolError:  # e.g. the job already ended: nothing to send
                return
            if self.pending:
                data, self.pending = bytes(self.pending) + data, bytearray()
            await self.stream.write(data)

    async def flush(self) -> None:
        async with self.lock:
            if self.pending:
                data, self.pending = bytes(self.pending), bytearray()
                await self.stream.write(data)


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
        link = _WorkerLink(stream)
        try:
            while True:
                data = await stream.read(READ_SIZE)
                if not data:
                    break
                link.conn.receive_data(data)
                while True:
                    frame = link.conn.next_event()
                    if isinstance(frame, NeedData):
                        break
                    if isinstance(frame, jf.JobRequest):
                        await self._admit(link, frame)
                    elif isinstance(frame, jf.JobCancel):
                        await self._cancel(link, frame.job_id)
        except RemoteProtocolError as exc:
            log.info("client broke the job protocol: %s", exc)
            self.on_misbehaviour(_remote_peer(stream), exc)
        except Exception as exc:  # the stream broke: its jobs are abandoned
            log.debug("job stream ended: %r", exc)
        finally:
            for job in link.jobs.values():
                job.cancelled = True
            await close_quietly(stream)

    async def _refuse(self, link: _WorkerLink, req: jf.JobRequest, code: str, message: str) -> None:
        self.stats.refused[code] = self.stats.refused.get(code, 0) + 1
        await link.send(jf.JobError(job_id=req.job_id, code=code, message=message))

    async def _admit(self, link: _WorkerLink, req: jf.JobRequest) -> None:
        served = self.models.get(req.model_id)
        if not self.accepting:
            return await self._refuse(link, req, jf.SHUTTING_DOWN, "worker is shutting down")
        if served is None:
            return await self._refuse(link, req, jf.UNKNOWN_MODEL, f"model {req.model_id.hex()[:16]} not served")
        if served.price_nanoton > req.max_price_nanoton:
            return await self._refuse(link, req, jf.PRICE, f"price {served.price_nanoton} above cap")
        if req.deadline_ms <= now_ms():
            return await self._refuse(link, req, jf.DEADLINE, "deadline already passed")
        if self.running >= self.capacity:
            return await self._refuse(link, req, jf.BUSY, f"all {self.capacity} slots taken")
        refusal = self.admission(link.peer)
        if refusal is not None:
            return await self._refuse(link, req, refusal, "open a payment channel or pay what is owed first")
        try:
            key = served.executor.check(req)
        except ProtocolError as exc:
            return await self._refuse(link, req, jf.BAD_INPUT, str(exc))
        job = _WorkerJob(req, link, key)
        link.jobs[req.job_id] = job
        self.running += 1
        self.on_load_change()
        accepted = jf.JobAccepted(job_id=req.job_id, price_nanoton=served.price_nanoton, unit=served.spec.unit)
        if served.spec.kind == "generation":  # token by token, never batched
            await link.send(accepted)
            self.nursery.start_soon(self._run_generation, served, job)
            return
        link.send_later(accepted)  # flushed when the batch starts, if it will take a while
        if not served.busy and not served.batcher.waiting() and served.avg_run_s < INLINE_RUN_S:
            served.busy = True  # idle and quick: run it here, without waking the model loop
            try:
                await self._run_batch(served, (job,))
            finally:
                served.busy = False
                if served.batcher.waiting():
                    served.wake.set()  # jobs that queued meanwhile
            return
        served.batcher.add(key, job, trio.current_time())
        served.wake.set()

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

        def timed_run() -> tuple[list[Outcome], float]:  # the run alone, without the thread hop
            t0 = time.perf_counter()
            outcomes = served.executor.run(requests)
            return outcomes, time.perf_counter() - t0

        try:
            # A sub-millisecond model runs inline: a thread hop would cost more than the run.
            outcomes, elapsed = timed_run() if quick else await trio.to_thread.run_sync(timed_run)
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
        if job.link.jobs.pop(job.req.job_id, None) is None:
            return
        self.running -= 1
        self.on_load_change()
        frame: jf.Frame
        if outcome is not None:
            frame = jf.JobResult(
                job_id=job.req.job_id,
                outputs=outcome.outputs,
                usage_units=outcome.units,
                cost_nanoton=outcome.units * price,
                compute_us=compute_us,
            )
            if _maybe_large(outcome):
                try:
                    jf.encode_frame(frame)
                except LocalProtocolError:  # a result too large to send: the job fails, unpaid
                    error, outcome = (jf.TOO_LARGE, "the result exceeds the frame limit"), None
        if outcome is not None:
            self.stats.jobs_ok += 1
            self.stats.latency_s.observe(time.perf_counter() - job.admitted_at)
            self.stats.earned_nanoton += outcome.units * price
            self.on_billed(job.link.peer, outcome.units * price)
        else:
            assert error is not None
            self.stats.jobs_failed += 1
            frame = jf.JobError(job_id=job.req.job_id, code=error[0], message=error[1])
        try:
            await job.link.send(frame)
        except Exception as exc:  # the client went away; the job is over either way
            log.debug("could not deliver job %d: %r", job.req.job_id, exc)


# ---- client --------------------------------------------------------------------------------


def _maybe_large(outcome: Outcome) -> bool:
    """Whether a result could exceed the frame limit (only then is it encoded twice)."""
    return sum(len(t.data) for t in outcome.outputs) > jf.MAX_FRAME // 2


def _remote_peer(stream: Any) -> bytes:
    return bytes(stream.muxed_conn.peer_id.to_bytes())


class _ClientLink:
    """The client's end of the stream to one worker, shared by all jobs to it."""

    def __init__(self, peer_id: bytes, stream: Any) -> None:
        self.peer_id = peer_id
        self.stream = stream
        self.conn = JobConnection(Role.CLIENT)
        self.lock = FastLock()
        self.waiters: dict[int, trio.MemorySendChannel[jf.Frame | JobFailed]] = {}
        self.broken: JobFailed | None = None
        self.on_misbehaviour: Callable[[bytes, ProtocolError], None] = lambda peer, err: None

    async def send(self, frame: jf.Frame) -> None:
        async with self.lock:
            await self.stream.write(self.conn.send(frame))

    async def read_loop(self) -> None:
        try:
            while True:
                data = await self.stream.read(READ_SIZE)
                if not data:
                    raise JobFailed(jf.WORKER_LOST, "stream closed", worker=self.peer_id)
                self.conn.receive_data(data)
                while not isinstance(frame := self.conn.next_event(), NeedData):
                    ch = self.waiters.get(frame.job_id)
                    if ch is not None:
                        ch.send_nowait(frame)  # buffer sized for a job's frames
        except JobFailed as exc:
            self.broken = exc
        except RemoteProtocolError as exc:
            self.broken = JobFailed(jf.WORKER_LOST, f"worker broke the protocol: {exc}", worker=self.peer_id)
            self.on_misbehaviour(self.peer_id, exc)
        except Exception as exc:
            self.broken = JobFailed(jf.WORKER_LOST, repr(exc), worker=self.peer_id)
        finally:
            failure = self.broken or JobFailed(jf.WORKER_LOST, "client stopped", worker=self.peer_id)
            for ch in self.waiters.values():
                try:
                    ch.send_nowait(failure)
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    pass


@dataclass
class ClientStats:
    jobs_ok: int = 0
    jobs_failed: int = 0
    retries: int = 0
    paid_nanoton: int = 0
    payments_pending: int = 0  # vouchers sent whose acknowledgement never came
    latency_s: Histogram = field(default_factory=Histogram)  # end to end, jobs that succeeded


class JobClient:
    """Sends jobs to workers found by ``find_workers`` (the node's directory + DHT)."""

    def __init__(
        self,
        host: Any,
        nursery: trio.Nursery,
        find_workers: Callable[[bytes], Any],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.nursery = nursery
        self.find_workers = find_workers
        self.router = Router(rng=rng or random.Random())
        self.links: dict[bytes, _ClientLink] = {}
        self._opening: dict[bytes, trio.Lock] = {}
        self._next_id = 1
        self.stats = ClientStats()
        self.on_misbehaviour: Callable[[bytes, ProtocolError], None] = lambda peer, err: None
        # A worker we lost mid-job or could not reach: the node forgets its offers
        # until it announces itself again (a restarted worker does at once).
        self.on_worker_lost: Callable[[bytes], None] = lambda peer: None
        # Payments: made ready before a job (a channel), and paid after its result.
        self.prepare: Callable[[bytes], Awaitable[Any]] | None = None
        self.pay: Callable[[bytes, int], Awaitable[Any]] | None = None

    async def _link(self, offer: WorkerOffer) -> _ClientLink:
        link = self.links.get(offer.peer_id)
        if link is not None and link.broken is None:
            return link
        lock = self._opening.setdefault(offer.peer_id, trio.Lock())
        async with lock:
            link = self.links.get(offer.peer_id)
            if link is not None and link.broken is None:
                return link
            pid = ID(offer.peer_id)
            addrs = [Multiaddr(a) for a in offer.addrs]
            if addrs:
                self.host.get_peerstore().add_addrs(pid, addrs, 3600)
                unblock_peer(self.host, offer.peer_id)
            stream = await self.host.new_stream(pid, [TProtocol(JOB_PROTOCOL)])
            link = _ClientLink(offer.peer_id, stream)
            link.on_misbehaviour = self.on_misbehaviour
            self.links[offer.peer_id] = link
            self.nursery.start_soon(link.read_loop)
            return link

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
    ) -> tuple[jf.JobResult, int]:
        """One attempt on one worker: (result, agreed price per unit). Raises JobFailed.
        Streamed chunks go to ``on_chunk`` as they arrive."""
        try:
            link = await self._link(offer)
        except Exception as exc:
            raise JobFailed(jf.WORKER_LOST, f"cannot open a job stream: {exc!r}", worker=offer.peer_id) from exc
        job_id = self._next_id
        self._next_id += 1
        send, recv = trio.open_memory_channel[jf.Frame | JobFailed](jf.MAX_TOKENS + 4)
        link.waiters[job_id] = send
        req = jf.JobRequest(
            job_id=job_id,
            model_id=model_id,
            inputs=inputs,
            texts=texts,
            max_tokens=max_tokens,
            deadline_ms=deadline_ms,
            max_price_nanoton=max_price,
        )
        price = 0
        done = False
        try:
            try:
                await link.send(req)
            except LocalProtocolError as exc:  # e.g. too large to send: this job only, no retry
                done = True
                raise JobFailed(exc.code, str(exc), worker=offer.peer_id) from exc
            except Exception as exc:
                link.broken = JobFailed(jf.WORKER_LOST, repr(exc), worker=offer.peer_id)
                raise link.broken from exc
            while True:
                try:  # a fast job's result arrives with its JobAccepted: take it without a yield
                    item = recv.receive_nowait()
                except trio.WouldBlock:
                    item = await recv.receive()
                if isinstance(item, JobFailed):
                    raise item
                if isinstance(item, jf.JobAccepted):
                    price = item.price_nanoton
                    if why := jf.price_refusal(price, max_price):  # the protocol lets us check, so we do
                        raise JobFailed(jf.PRICE, why, worker=offer.peer_id)
                elif isinstance(item, jf.JobChunk):
                    if on_chunk is not None:
                        on_chunk(item)
                elif isinstance(item, jf.JobError):
                    done = True
                    raise JobFailed(item.code, item.message, worker=offer.peer_id)
                elif isinstance(item, jf.JobResult):
                    done = True
                    if why := jf.charge_refusal(price, item.usage_units, item.cost_nanoton):
                        raise JobFailed(jf.PRICE, why, worker=offer.peer_id)
                    return item, price
        finally:
            link.waiters.pop(job_id, None)
            if not done and link.broken is None and job_id in link.conn.jobs:
                with trio.move_on_after(0.5) as scope:  # tell the worker to stop
                    scope.shield = True
                    try:
                        await link.send(jf.JobCancel(job_id=job_id))
                    except Exception:
                        pass

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
    ) -> InferenceResult:
        """Run a job on the best worker for ``model_id``; retry elsewhere when that fails.

        A job that already streamed chunks to ``on_chunk`` is not retried (the caller
        has seen part of one answer). Raises JobFailed (``no-workers`` when none is
        eligible, else the last error).
        """
        chunks: list[jf.JobChunk] = []

        def collect(chunk: jf.JobChunk) -> None:
            chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk)

        t0 = time.perf_counter()
        deadline_ms = now_ms() + int(timeout_s * 1000)
        tried: set[bytes] = set()
        last: JobFailed | None = None
        with trio.fail_after(timeout_s):
            for attempt in range(1, attempts + 1):
                offers = await self.find_workers(model_id)
                offer = self.router.choose(
                    offers, max_price=max_price, now=trio.current_time(), exclude=frozenset(tried)
                )
                if offer is None:
                    break
                tried.add(offer.peer_id)
                self.router.started(offer.peer_id)
                t_job = time.perf_counter()
                try:
                    if self.prepare is not None:
                        try:
                            await self.prepare(offer.peer_id)
                        except CocoonError as exc:
                            raise JobFailed(jf.PAYMENT_SETUP, str(exc), worker=offer.peer_id) from exc
                    result, price = await self.run_on(
                        offer,
                        model_id=model_id,
                        inputs=inputs,
                        texts=texts,
                        max_tokens=max_tokens,
                        max_price=max_price,
                        deadline_ms=deadline_ms,
                        on_chunk=collect,
                    )
                except JobFailed as exc:
                    self.router.failed(offer.peer_id, trio.current_time())
                    if exc.code == jf.WORKER_LOST:
                        self.on_worker_lost(offer.peer_id)
                    last = exc
                    if not exc.retryable or chunks:
                        break
                    self.stats.retries += 1
                    continue
                except BaseException:
                    self.router.failed(offer.peer_id, trio.current_time(), cooldown_s=0)
                    raise
                service_s = result.compute_us / 1e6 if result.compute_us else None  # the worker's own figure
                self.router.finished(offer.peer_id, time.perf_counter() - t_job, service_s=service_s)
                if self.pay is not None and result.cost_nanoton:
                    try:
                        await self.pay(offer.peer_id, result.cost_nanoton)
                    except CocoonError as exc:
                        # The voucher is signed and logged; only its acknowledgement is missing
                        # (the worker went away). It goes again on reconnect or at settlement.
                        self.stats.payments_pending += 1
                        log.warning("payment to %s not acknowledged yet: %s", ID(offer.peer_id), exc)
                self.stats.jobs_ok += 1
                self.stats.latency_s.observe(time.perf_counter() - t0)
                self.stats.paid_nanoton += result.cost_nanoton
                return InferenceResult(
                    outputs=result.outputs,
                    worker=offer.peer_id,
                    usage_units=result.usage_units,
                    cost_nanoton=result.cost_nanoton,
                    price_nanoton=price,
                    latency_s=time.perf_counter() - t0,
                    attempts=attempt,
                    token_ids=tuple(t for c in chunks for t in c.token_ids),
                    text="".join(c.text for c in chunks),
                )
        self.stats.jobs_failed += 1
        raise last or JobFailed("no-workers", f"no eligible worker for model {model_id.hex()[:16]}")
