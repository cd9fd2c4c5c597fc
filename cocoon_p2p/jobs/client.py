"""The client's side of ``/cocoon/job/1``: :class:`JobClient` sends jobs.

One long-lived stream per worker carries every job to it (no per-job stream or
protocol negotiation); frames are parsed in the connection's reading task and
handed to the waiting job; :meth:`JobClient.infer` picks workers with
:class:`~.routing.Router` and retries elsewhere on refusal, error or a worker
lost mid-job. A client is charged only by a :class:`JobResult`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import CocoonError, LocalProtocolError, MalformedMessage, ProtocolError, RemoteProtocolError
from cocoon_p2p.core.framing import NeedData
from cocoon_p2p.core.metrics import Histogram
from cocoon_p2p.execution.tensors import Tensor
from cocoon_p2p.overlay.directory import WorkerOffer
from cocoon_p2p.overlay.protocols import JOB_PROTOCOL
from cocoon_p2p.transport.fastlock import FastLock
from cocoon_p2p.transport.host import unblock_peer

from . import frames as jf
from .connection import JobConnection, Role
from .routing import Router
from .stream import READ_SIZE, Inbox, StreamIO

log = logging.getLogger("cocoon_p2p.jobs")


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


class _ClientLink:
    """The client's end of the stream to one worker, shared by all jobs to it.

    Frames are parsed where the bytes arrive: on our connections, in the
    connection's reading task (no hand-over to a task of the link's own, which
    cost a pass of the scheduler per result), and each goes to its job's inbox.
    """

    def __init__(self, peer_id: bytes, stream: Any) -> None:
        self.peer_id = peer_id
        self.stream = stream
        self.io = StreamIO(stream)
        self.conn = JobConnection(Role.CLIENT)
        self.lock = FastLock()
        self.waiters: dict[int, Inbox[jf.Frame | JobFailed]] = {}
        self.broken: JobFailed | None = None
        self.on_misbehaviour: Callable[[bytes, ProtocolError], None] = lambda peer, err: None

    def start(self, nursery: trio.Nursery) -> None:
        if self.io.muxed is not None:
            self.io.muxed.deliver_to(self.receive)
        else:
            nursery.start_soon(self._read_loop)

    async def send(self, frame: jf.Frame) -> None:
        async with self.lock:
            await self.io.write(self.conn.send(frame))

    def receive(self, data: bytes | None) -> None:
        """Bytes from the worker (None: the stream ended); never raises."""
        if self.broken is not None:
            return
        try:
            if data is None:
                raise JobFailed(jf.WORKER_LOST, "stream closed", worker=self.peer_id)
            self.conn.receive_data(data)
            while not isinstance(frame := self.conn.next_event(), NeedData):
                inbox = self.waiters.get(frame.job_id)
                if inbox is not None:
                    inbox.put(frame)
        except JobFailed as exc:
            self._fail(exc)
        except RemoteProtocolError as exc:
            self._fail(JobFailed(jf.WORKER_LOST, f"worker broke the protocol: {exc}", worker=self.peer_id))
            self.on_misbehaviour(self.peer_id, exc)
        except Exception as exc:
            self._fail(JobFailed(jf.WORKER_LOST, repr(exc), worker=self.peer_id))

    def _fail(self, failure: JobFailed) -> None:
        self.broken = failure
        for inbox in self.waiters.values():
            inbox.put(failure)

    async def _read_loop(self) -> None:  # for a stream on another multiplexer than ours
        try:
            while self.broken is None:
                self.receive(await self.io.read(READ_SIZE) or None)
        except Exception as exc:
            self._fail(JobFailed(jf.WORKER_LOST, repr(exc), worker=self.peer_id))
        finally:
            if self.broken is None:
                self._fail(JobFailed(jf.WORKER_LOST, "client stopped", worker=self.peer_id))


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

    async def _open_link(self, offer: WorkerOffer) -> _ClientLink:
        """A job stream to this worker (opened once at a time: concurrent jobs wait for it)."""
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
            link.start(self.nursery)
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
        link = self.links.get(offer.peer_id)
        try:
            if link is None or link.broken is not None:
                link = await self._open_link(offer)
        except Exception as exc:
            raise JobFailed(jf.WORKER_LOST, f"cannot open a job stream: {exc!r}", worker=offer.peer_id) from exc
        job_id = self._next_id
        self._next_id += 1
        inbox: Inbox[jf.Frame | JobFailed] = Inbox()  # not Inbox[...](): that builds the alias per job
        link.waiters[job_id] = inbox
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
        tokens = 0
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
                item = await inbox.get()
                if isinstance(item, JobFailed):
                    raise item
                if isinstance(item, jf.JobAccepted):
                    price = item.price_nanoton
                    if why := jf.price_refusal(price, max_price):  # the protocol lets us check, so we do
                        raise JobFailed(jf.PRICE, why, worker=offer.peer_id)
                elif isinstance(item, jf.JobChunk):
                    tokens += len(item.token_ids) or 1
                    if tokens > max_tokens:  # what a worker streams is bounded by what we asked for
                        err = MalformedMessage(f"job {job_id}: more chunks than the {max_tokens} tokens asked for")
                        link.on_misbehaviour(offer.peer_id, err)
                        raise JobFailed(jf.WORKER_LOST, str(err), worker=offer.peer_id)
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
        # A bare cancel scope: trio.fail_after's context manager costs a few us more per job.
        with trio.CancelScope(deadline=trio.current_time() + timeout_s) as scope:
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
                    token_ids=tuple(t for c in chunks for t in c.token_ids) if chunks else (),
                    text="".join(c.text for c in chunks) if chunks else "",
                )
        if scope.cancelled_caught:
            raise trio.TooSlowError
        self.stats.jobs_failed += 1
        raise last or JobFailed("no-workers", f"no eligible worker for model {model_id.hex()[:16]}")
