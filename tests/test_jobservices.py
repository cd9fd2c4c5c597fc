"""The job services alone: JobClient and JobWorker over in-memory streams, with ports that
record what they are told (no sockets, no libp2p host)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.peer.id import ID

from cocoon_p2p.core.errors import CocoonError, ProtocolError
from cocoon_p2p.core.metrics import parse, render, total
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import from_numpy
from cocoon_p2p.jobs import JobFailed
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.jobs.client import JobClient
from cocoon_p2p.jobs.connection import JobConnection, Role
from cocoon_p2p.jobs.worker import JobWorker
from cocoon_p2p.overlay.directory import WorkerOffer

from .helpers import JOB_PRICE as PRICE
from .helpers import x_rows

CLIENT, WORKER = b"c" * 38, b"w" * 38


@dataclass
class Ports:
    """Every port of the job services (PeerFeedback, LoadReport, both payments), recording calls."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)
    admission_code: str | None = None
    channel_error: CocoonError | None = None
    pay_s: float = 0.0  # how long a payment takes
    pay_linger_s: float = 0.0  # a payment per job: the calls below are counted one by one

    def misbehaved(self, peer: bytes, error: ProtocolError) -> None:
        self.calls.append(("misbehaved", peer, error.code))

    def worker_lost(self, peer: bytes) -> None:
        self.calls.append(("lost", peer))

    def set_load(self, *, running_jobs: int, free_capacity: dict[bytes, int]) -> None:
        self.calls.append(("load", running_jobs, dict(free_capacity)))

    async def ensure_channel(self, worker: bytes) -> None:
        if self.channel_error is not None:
            raise self.channel_error
        self.calls.append(("channel", worker))

    async def pay(self, worker: bytes, cost: int) -> None:
        await trio.sleep(self.pay_s)
        self.calls.append(("pay", worker, cost))

    async def channel_ended(self, worker: bytes) -> None:
        self.calls.append(("ended", worker))
        self.admission_code = None  # a new channel: the worker admits the job

    def admission(self, client: bytes) -> str | None:
        return self.admission_code

    def bill(self, client: bytes, cost: int) -> None:
        self.calls.append(("bill", client, cost))


class _End:
    """One end of an in-memory job stream, shaped as py-libp2p's NetStream."""

    def __init__(self, stream: trio.abc.Stream, remote: bytes) -> None:
        self._stream = stream
        self.muxed_conn = SimpleNamespace(peer_id=SimpleNamespace(to_bytes=lambda: remote))

    async def read(self, n: int) -> bytes:
        return await self._stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.aclose()


@dataclass
class _Hosts:
    """The client's and the worker's host at once: a new stream reaches the worker's handler."""

    nursery: trio.Nursery
    handler: Callable[[Any], Awaitable[None]] | None = None

    def get_id(self) -> ID:
        return ID(CLIENT)  # the client's side asks (receipts name the client)

    def set_stream_handler(self, protocol: str, handler: Callable[[Any], Awaitable[None]]) -> None:
        assert protocol == jf.JOB_PROTOCOL
        self.handler = handler

    async def new_stream(self, peer_id: ID, protocols: list[str]) -> _End:
        assert self.handler is not None and protocols == [jf.JOB_PROTOCOL]
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.handler, _End(theirs, CLIENT))
        return _End(ours, WORKER)


def _offers(model_id: bytes) -> Callable[[bytes], Awaitable[list[WorkerOffer]]]:
    offer = WorkerOffer(peer_id=WORKER, model_id=model_id, addrs=(), backend="onnxruntime", gpu="cpu",
                        price_nanoton=PRICE, unit="item", capacity=2, free_capacity=2, running_jobs=0,
                        issued_at_ms=0, expires_at_ms=2**62, sources=frozenset({"gossip"}))  # fmt: skip

    async def offers(_: bytes) -> list[WorkerOffer]:
        return [offer]

    return offers


def _services(nursery: trio.Nursery, ports: Ports, model: ModelSpec) -> tuple[JobWorker, JobClient]:
    """A worker serving ``model`` at PRICE (capacity 2) and a client of it, in memory, on ``ports``."""
    hosts = _Hosts(nursery)
    worker = JobWorker(hosts, nursery, capacity=2, feedback=ports, load=ports, payments=ports)
    worker.serve(model, OnnxRuntimeBackend(model.path, threads=1), price_nanoton=PRICE)
    return worker, JobClient(hosts, nursery, _offers(model.model_id), feedback=ports, payments=ports)


async def test_the_services_call_their_ports_and_report_their_metrics(tiny_model: ModelSpec) -> None:
    ports, mid = Ports(), tiny_model.model_id
    async with trio.open_nursery() as nursery:
        worker, client = _services(nursery, ports, tiny_model)
        r = await client.infer(mid, inputs=(from_numpy("x", x_rows(3)),), max_price=10)
        await client.flush_payments()  # the result came first, its voucher behind it
        assert r.cost_nanoton == 3 * PRICE and r.attempts == 1
        assert ports.calls == [
            ("channel", WORKER),  # before the job
            ("load", 1, {mid: 1}),  # admitted: the free capacity of every served model
            ("load", 0, {mid: 2}),
            ("bill", CLIENT, 3 * PRICE),  # the result sent
            ("pay", WORKER, 3 * PRICE),  # and received
        ]
        w, c = parse(render(worker.metrics())), parse(render(client.metrics()))
        # Summed over the model label (a model's series, or the rest without one).
        assert total(w, "cocoon_worker_jobs_total", outcome="ok") == 1 and w["cocoon_worker_capacity"] == 2
        assert w["cocoon_worker_earned_nanoton_total"] == 3 * PRICE and total(w, "cocoon_worker_job_seconds_count") == 1
        assert total(c, "cocoon_client_jobs_total", outcome="ok") == 1
        assert c["cocoon_client_paid_nanoton_total"] == 3 * PRICE
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("setup", "code", "refused"),
    [
        (lambda w, p: w.stop_accepting(), jf.SHUTTING_DOWN, {jf.SHUTTING_DOWN: 1}),
        (lambda w, p: setattr(p, "admission_code", jf.PAYMENT), jf.PAYMENT, {jf.PAYMENT: 1}),
        (lambda w, p: setattr(p, "channel_error", CocoonError("no deposit")), jf.PAYMENT_SETUP, {}),
    ],
)
async def test_refusals_through_the_ports(
    tiny_model: ModelSpec, setup: Callable[[JobWorker, Ports], None], code: str, refused: dict[str, int]
) -> None:
    ports, mid = Ports(), tiny_model.model_id
    async with trio.open_nursery() as nursery:
        worker, client = _services(nursery, ports, tiny_model)
        setup(worker, ports)
        with pytest.raises(JobFailed) as err:
            await client.infer(mid, inputs=(from_numpy("x", x_rows(1)),), max_price=10)
        assert err.value.code == code and err.value.worker == WORKER
        assert worker.stats.refused == refused and worker.running == 0
        assert client.stats.jobs_failed == 1 and client.stats.retries == int(err.value.retryable)
        assert not [call for call in ports.calls if call[0] in ("bill", "pay", "load")]
        nursery.cancel_scope.cancel()


async def test_a_worker_closing_our_channel_gets_the_job_again_on_a_new_one(tiny_model: ModelSpec) -> None:
    """The worker signed a close we never heard of (it crashed before answering): it refuses
    jobs as ``channel-ended``; the client replaces the channel and the same worker runs the job."""
    ports, mid = Ports(admission_code=jf.CHANNEL_ENDED), tiny_model.model_id
    async with trio.open_nursery() as nursery:
        worker, client = _services(nursery, ports, tiny_model)
        r = await client.infer(mid, inputs=(from_numpy("x", x_rows(1)),), max_price=10)
        assert r.worker == WORKER and r.attempts == 2 and worker.stats.refused == {jf.CHANNEL_ENDED: 1}
        await client.flush_payments()
        steps = [c[0] for c in ports.calls if c[0] in ("channel", "ended", "pay")]
        assert steps == ["channel", "ended", "channel", "pay"]
        ports.admission_code = jf.CHANNEL_ENDED  # and once more: the replacement did not help
        ports.channel_ended = lambda worker: trio.lowlevel.checkpoint()  # type: ignore[method-assign,assignment,return-value]
        with pytest.raises(JobFailed) as err:
            await client.infer(mid, inputs=(from_numpy("x", x_rows(1)),), max_price=10)
        assert err.value.code == jf.CHANNEL_ENDED and worker.stats.refused == {jf.CHANNEL_ENDED: 3}
        nursery.cancel_scope.cancel()


async def test_a_result_paid_for_after_the_deadline_is_returned_not_failed(tiny_model: ModelSpec) -> None:
    """The voucher goes out for a result in hand, behind it: a slow acknowledgement past the
    job's deadline neither turns a paid job into a failed one (the soak saw 354 such jobs)
    nor delays the result; the payment still completes."""
    ports, mid = Ports(pay_s=1.0), tiny_model.model_id
    async with trio.open_nursery() as nursery:
        worker, client = _services(nursery, ports, tiny_model)
        r = await client.infer(mid, inputs=(from_numpy("x", x_rows(1)),), max_price=10, timeout_s=0.5)
        assert r.cost_nanoton == PRICE and r.latency_s < 0.5  # not the payment's second
        await client.flush_payments()
        assert ("pay", WORKER, PRICE) in ports.calls
        assert client.stats.jobs_ok == 1 and client.stats.jobs_failed == 0
        nursery.cancel_scope.cancel()


async def test_a_job_past_its_deadline_fails_as_deadline(autojump_clock: trio.testing.MockClock) -> None:
    heard = bytearray()  # what the worker, which never answers, was sent

    async def silent_worker(stream: Any) -> None:
        while data := await stream.read(1 << 16):
            heard.extend(data)

    async with trio.open_nursery() as nursery:
        hosts = _Hosts(nursery, silent_worker)
        client = JobClient(hosts, nursery, _offers(bytes(32)), feedback=Ports())
        t0 = trio.current_time()
        with pytest.raises(JobFailed) as err:
            await client.infer(bytes(32), texts=("hi",), max_price=10, timeout_s=2.0)
        assert err.value.code == jf.DEADLINE and err.value.worker == WORKER
        assert trio.current_time() - t0 == pytest.approx(2.0)
        assert (client.stats.jobs_failed, client.stats.jobs_ok) == (1, 0)
        assert client.router.estimates[WORKER].running == 0  # no longer counted as running there
        await trio.testing.wait_all_tasks_blocked()
        conn = JobConnection(Role.WORKER)
        conn.receive_data(bytes(heard))
        assert [type(conn.next_event()) for _ in range(2)] == [jf.JobRequest, jf.JobCancel]  # told to stop
        nursery.cancel_scope.cancel()
