"""Jobs between real peers on 127.0.0.1 (Noise + yamux streams, real onnxruntime).

The job services alone, over in-memory streams, are in test_jobservices.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import from_numpy, to_numpy
from cocoon_p2p.jobs import JobFailed
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.jobs.connection import JobConnection, Role
from cocoon_p2p.node import Node
from cocoon_p2p.overlay.directory import WorkerOffer

from .helpers import JOB_PRICE as PRICE
from .helpers import x_rows
from .netutil import fast_config, wait_for
from .test_executor import reference


@asynccontextmanager
async def network(
    spec: ModelSpec,
    workers: int = 2,
    *,
    capacity: int = 8,
    prices: list[int] | None = None,
    completion_price: int | None = None,
) -> AsyncIterator[tuple[Node, list[Node], list[trio.CancelScope]]]:
    """A client and ``workers`` workers serving ``spec`` (generated tokens at
    ``completion_price``, None: the same price); each worker runs under its own cancel
    scope so a test can kill it."""
    async with Node(fast_config()) as client, trio.open_nursery() as nursery:
        nodes: list[Node] = []
        scopes: list[trio.CancelScope] = []

        async def run_worker(i: int, task_status: trio.TaskStatus[None]) -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                async with Node(fast_config(bootstrap=[client.addrs[0]], job_capacity=capacity)) as w:
                    price = (prices or [PRICE] * workers)[i]
                    backend = OnnxRuntimeBackend(spec.path, threads=1)
                    w.serve_model(spec, backend, price_nanoton=price, completion_price_nanoton=completion_price)
                    nodes.append(w)
                    task_status.started()
                    await trio.sleep_forever()

        for i in range(workers):
            await nursery.start(run_worker, i)
        await wait_for(lambda: len(client.directory.workers_for(spec.model_id, now_ms=now_ms())) == workers)
        yield client, nodes, scopes
        nursery.cancel_scope.cancel()


async def test_infer_runs_on_a_worker_and_pays_price_times_usage(tiny_model: ModelSpec) -> None:
    async with network(tiny_model) as (client, workers, _):
        x = x_rows(3)
        r = await client.infer(tiny_model.model_id, inputs=(from_numpy("x", x),), max_price_nanoton=10)
        np.testing.assert_allclose(to_numpy(r.output("y")), reference(x), rtol=1e-6, atol=1e-6)
        assert r.usage_units == 3 and r.price_nanoton == PRICE and r.cost_nanoton == 3 * PRICE
        served_by = next(w for w in workers if w.peer_id == r.worker)
        assert served_by.job_worker is not None and served_by.job_worker.stats.earned_nanoton == 3 * PRICE


async def test_jobs_share_one_stream_per_worker(tiny_model: ModelSpec) -> None:
    async with network(tiny_model) as (client, _workers, _):
        assert client.job_client is not None
        served_by = set()
        for i in range(10):
            r = await client.infer(tiny_model.model_id, inputs=(from_numpy("x", x_rows(1, i)),), max_price_nanoton=10)
            served_by.add(r.worker)
        links = dict(client.job_client.links)
        assert set(links) == served_by  # one stream per worker that served
        for i in range(10):
            await client.infer(tiny_model.model_id, inputs=(from_numpy("x", x_rows(1, i)),), max_price_nanoton=10)
        assert all(client.job_client.links[p] is link for p, link in links.items())  # no new streams


async def test_cheapest_eligible_price_and_cap(tiny_model: ModelSpec) -> None:
    async with network(tiny_model, prices=[5, 50]) as (client, workers, _):
        for _ in range(5):
            r = await client.infer(tiny_model.model_id, inputs=(from_numpy("x", x_rows(1)),), max_price_nanoton=10)
            assert r.worker == workers[0].peer_id  # the one under the cap
        with pytest.raises(JobFailed) as err:
            await client.infer(tiny_model.model_id, inputs=(from_numpy("x", x_rows(1)),), max_price_nanoton=4)
        assert err.value.code == "no-workers"


async def test_typed_refusals_and_the_worker_keeps_serving(tiny_model: ModelSpec) -> None:
    async with network(tiny_model, workers=1) as (client, workers, _):
        assert client.job_client is not None
        (offer,) = client.directory.workers_for(tiny_model.model_id, now_ms=now_ms())
        good = (from_numpy("x", x_rows(2)),)

        async def attempt(**kw: object) -> str:
            args: dict[str, object] = dict(
                model_id=tiny_model.model_id, inputs=good, max_price=10, deadline_ms=now_ms() + 10_000
            )
            args.update(kw)
            try:
                await client.job_client.run_on(offer, **args)  # type: ignore[union-attr, arg-type]
            except JobFailed as exc:
                return exc.code
            return "ok"

        assert await attempt(model_id=bytes(32)) == jf.UNKNOWN_MODEL
        assert await attempt(max_price=1) == jf.PRICE
        assert await attempt(deadline_ms=now_ms() - 1) == jf.DEADLINE
        assert await attempt(inputs=(from_numpy("x", np.zeros((2, 5), np.float32)),)) == jf.BAD_INPUT
        assert await attempt(inputs=(), texts=("not a tensor model",)) == jf.BAD_INPUT
        huge = (from_numpy("x", np.zeros((600_000, 4), np.float32)),)  # 9.6 MB: over the frame limit
        assert await attempt(inputs=huge) == jf.TOO_LARGE  # refused before sending; the stream lives on
        assert await attempt() == "ok"
        stats = workers[0].job_worker.stats  # type: ignore[union-attr]
        assert stats.refused == {jf.UNKNOWN_MODEL: 1, jf.PRICE: 1, jf.DEADLINE: 1, jf.BAD_INPUT: 2}
        assert stats.jobs_ok == 1 and stats.earned_nanoton == 2 * PRICE


async def test_garbage_on_a_job_stream_does_not_stop_the_worker(tiny_model: ModelSpec) -> None:
    async with network(tiny_model, workers=1) as (client, workers, _):
        w = workers[0]
        for junk in (b"\xff\xff\xff\xff" + b"x" * 64, b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1", b"\x00" * 3):
            stream = await client.host.new_stream(ID(w.peer_id), [TProtocol(jf.JOB_PROTOCOL)])
            await stream.write(junk)
            await stream.close()
        r = await client.infer(tiny_model.model_id, inputs=(from_numpy("x", x_rows(1)),), max_price_nanoton=10)
        assert r.worker == w.peer_id
        assert w.scores.score(client.peer_id, now_ms()) < 0  # the sender of garbage is scored down


async def test_busy_worker_refuses_and_the_client_goes_elsewhere(slow_model: ModelSpec) -> None:
    async with network(slow_model, capacity=1) as (client, workers, _):
        big = (from_numpy("x", x_rows(8192)),)
        results = []

        async def one() -> None:
            results.append(await client.infer(slow_model.model_id, inputs=big, max_price_nanoton=10))

        async with trio.open_nursery() as n:
            for _ in range(2):
                n.start_soon(one)
        assert {r.worker for r in results} == {w.peer_id for w in workers}
        refused = sum(w.job_worker.stats.refused.get(jf.BUSY, 0) for w in workers)  # type: ignore[union-attr]
        retries = client.job_client.stats.retries  # type: ignore[union-attr]
        assert retries == refused  # every busy refusal was retried on the other worker


async def test_cancel_stops_the_job_on_the_worker_and_costs_nothing(slow_model: ModelSpec) -> None:
    async with network(slow_model, workers=1) as (client, workers, _):
        stats = workers[0].job_worker.stats  # type: ignore[union-attr]
        big = (from_numpy("x", x_rows(8192)),)
        with trio.move_on_after(0.05):
            await client.infer(slow_model.model_id, inputs=big, max_price_nanoton=10)
        await wait_for(lambda: stats.jobs_failed == 1)
        assert stats.jobs_ok == 0 and stats.earned_nanoton == 0
        assert workers[0].job_worker.running == 0  # type: ignore[union-attr]


async def test_worker_killed_mid_job_the_client_retries_and_pays_once(slow_model: ModelSpec) -> None:
    async with network(slow_model) as (client, workers, scopes):
        big = (from_numpy("x", x_rows(8192)),)
        job_client = client.job_client
        assert job_client is not None
        result = []

        async def run() -> None:
            result.append(await client.infer(slow_model.model_id, inputs=big, max_price_nanoton=10))

        async with trio.open_nursery() as n:
            n.start_soon(run)
            await wait_for(lambda: any(w.job_worker.running for w in workers))  # type: ignore[union-attr]
            victim = next(i for i, w in enumerate(workers) if w.job_worker.running)  # type: ignore[union-attr]
            scopes[victim].cancel()
        (r,) = result
        assert r.worker != workers[victim].peer_id and r.attempts == 2
        assert job_client.stats.paid_nanoton == r.cost_nanoton == 8192 * PRICE


async def test_concurrent_jobs_are_batched(tiny_model: ModelSpec) -> None:
    async with network(tiny_model, workers=1, capacity=32) as (client, workers, _):

        async def one(i: int) -> None:
            await client.infer(tiny_model.model_id, inputs=(from_numpy("x", x_rows(1, i)),), max_price_nanoton=10)

        async with trio.open_nursery() as n:
            for i in range(24):
                n.start_soon(one, i)
        stats = workers[0].job_worker.stats  # type: ignore[union-attr]
        assert stats.jobs_ok == 24 and stats.batched_items == 24
        assert stats.batches < 24
        # A busy worker's load changes with every job; its announcements must stay
        # under the receivers' per-origin rate limit (it was once banned for this).
        await trio.sleep(1)
        assert client.gossip.stats.rejected_by_code.get("rate-limited", 0) == 0
        assert workers[0].peer_id in client.connected_peers()


async def test_a_result_too_large_to_send_fails_that_job_unpaid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cocoon_p2p.execution.models import load_model

    repeats = numpy_helper.from_array(np.array([1000, 1], dtype=np.int64), "r")
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "r"], ["y"])],
        "blow_up",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 4])],
        initializer=[repeats],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "blow_up.onnx"))
    spec = load_model(tmp_path / "blow_up.onnx")
    async with network(spec, workers=1) as (client, workers, _):
        with pytest.raises(JobFailed) as err:
            await client.infer(spec.model_id, inputs=(from_numpy("x", x_rows(1024)),), max_price_nanoton=10)
        assert err.value.code == jf.TOO_LARGE
        stats = workers[0].job_worker.stats  # type: ignore[union-attr]
        assert stats.jobs_failed == 1 and stats.earned_nanoton == 0
        r = await client.infer(spec.model_id, inputs=(from_numpy("x", x_rows(2)),), max_price_nanoton=10)
        assert r.output().shape == (2000, 4)  # small results still flow on the same stream


async def _fake_worker(client: Node, reply: Callable[[jf.JobRequest], bytes]) -> AsyncIterator[WorkerOffer]:
    """A peer that answers every job request with ``reply(request)``, whatever that is."""
    async with Node(fast_config()) as fake:

        async def handler(stream: Any) -> None:
            conn = JobConnection(Role.WORKER)
            while True:
                data = await stream.read(1 << 16)
                conn.receive_data(data)
                while isinstance(frame := conn.next_event(), jf.JobRequest):
                    await stream.write(reply(frame))

        fake.host.set_stream_handler(TProtocol(jf.JOB_PROTOCOL), handler)
        yield WorkerOffer(
            peer_id=fake.peer_id,
            model_id=b"m" * 32,
            addrs=tuple(fake.addrs),
            backend="onnxruntime",
            gpu="cpu",
            price_nanoton=1,
            unit="item",
            capacity=1,
            free_capacity=1,
            running_jobs=0,
            issued_at_ms=now_ms(),
            expires_at_ms=now_ms() + 60_000,
            sources=frozenset({"gossip"}),
        )


def _frames(*frames: jf.Frame) -> bytes:
    return b"".join(jf.encode_frame(f) for f in frames)


@pytest.mark.parametrize(
    ("reply", "max_tokens", "why"),
    [
        (lambda req: _frames(jf.JobResult(job_id=req.job_id + 7, usage_units=1, cost_nanoton=1)), 0, "not open"),
        (
            lambda req: _frames(
                jf.JobAccepted(job_id=req.job_id, price_nanoton=1, unit="token"),
                *(jf.JobChunk(job_id=req.job_id, seq=i, token_ids=(i,)) for i in range(3)),
            ),
            2,
            "more chunks than the 2 tokens",
        ),
        (lambda req: b"\x00\x00\x00\x02\xc1\xc1", 0, "worker broke the protocol"),
    ],
)
async def test_a_worker_breaking_the_protocol_fails_the_job_and_is_scored_down(
    reply: Callable[[jf.JobRequest], bytes], max_tokens: int, why: str
) -> None:
    async with Node(fast_config()) as client, asynccontextmanager(_fake_worker)(client, reply) as offer:
        assert client.job_client is not None
        with trio.fail_after(10), pytest.raises(JobFailed) as failed:
            await client.job_client.run_on(
                offer,
                model_id=offer.model_id,
                texts=("hi",),
                max_tokens=max_tokens,
                max_price=1,
                deadline_ms=now_ms() + 5000,
            )
        assert failed.value.code == jf.WORKER_LOST and why in str(failed.value)
        assert client.scores.score(offer.peer_id, now_ms()) < 0
