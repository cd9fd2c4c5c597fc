"""Spot checks between real peers on 127.0.0.1: receipts, a cheating worker caught, and
no honest worker ever blamed.

The cheater runs the real model and then replaces its outputs (cocoon_p2p.testing.cheating),
so its frames are valid; only the values are wrong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import from_numpy, to_numpy
from cocoon_p2p.execution.verification import cosine_agreement
from cocoon_p2p.jobs import receipts
from cocoon_p2p.jobs.spotcheck import SpotCheckPolicy, compare_outputs, compare_tokens
from cocoon_p2p.node import Node
from cocoon_p2p.testing.cheating import CheatingBackend, TruncatingBackend

from .helpers import x_rows
from .netutil import fast_config, wait_for
from .test_executor import reference


@asynccontextmanager
async def network(
    spec: ModelSpec, cheat_rates: list[float], *, check_rate: float
) -> AsyncIterator[tuple[Node, list[Node], list[CheatingBackend | None]]]:
    cfg = fast_config(spot_checks=SpotCheckPolicy(rate=check_rate))
    async with Node(cfg) as client, trio.open_nursery() as nursery:
        workers: list[Node] = []
        backends: list[CheatingBackend | None] = []

        async def run_worker(rate: float, task_status: trio.TaskStatus[None]) -> None:
            async with Node(fast_config(bootstrap=[client.addrs[0]])) as w:
                inner = OnnxRuntimeBackend(spec.path, threads=1)
                backend = CheatingBackend(inner, rate=rate, seed=len(workers)) if rate else None
                w.serve_model(spec, backend or inner, price_nanoton=1)
                workers.append(w)
                backends.append(backend)
                task_status.started()
                await trio.sleep_forever()

        for rate in cheat_rates:
            await nursery.start(run_worker, rate)
        await wait_for(lambda: len(client.directory.workers_for(spec.model_id, now_ms=now_ms())) == len(cheat_rates))
        yield client, workers, backends
        nursery.cancel_scope.cancel()


async def test_every_result_carries_a_receipt_the_client_verifies(tiny_model: ModelSpec) -> None:
    async with network(tiny_model, [0.0], check_rate=0.0) as (client, (worker,), _):
        x = from_numpy("x", x_rows(2))
        r = await client.infer(tiny_model.model_id, inputs=(x,), max_price_nanoton=10)
        assert r.receipt is not None and r.receipt.worker == worker.peer_id and r.receipt.client == client.peer_id
        assert r.receipt.outputs_digest == receipts.outputs_digest(r.outputs, ())
        assert r.receipt.inputs_digest == receipts.inputs_digest(tiny_model.model_id, (x,), (), 0)
        assert receipts.decode_receipt(r.receipt.encode()) == r.receipt  # portable: anyone can check it


async def test_a_cheater_is_caught_banned_unpaid_and_the_caller_gets_the_right_answer(tiny_model: ModelSpec) -> None:
    async with network(tiny_model, [0.0, 0.0, 1.0], check_rate=1.0) as (client, workers, backends):
        cheater = workers[backends.index(next(b for b in backends if b is not None))]
        honest = {w.peer_id for w in workers} - {cheater.peer_id}
        checks = client.job_client.checks if client.job_client else None
        assert checks is not None
        for i in range(12):
            x = x_rows(1, seed=i)
            skipped = checks.skipped
            r = await client.infer(tiny_model.model_id, inputs=(from_numpy("x", x),), max_price_nanoton=10)
            if checks.skipped > skipped:  # no other worker could run it (a loaded machine lets offers lapse)
                continue
            assert r.worker in honest  # whatever ran first, the caller gets an honest worker's result
            assert np.allclose(to_numpy(r.outputs[0]), reference(x), atol=1e-5)
            if client.guard.is_banned(cheater.peer_id):
                break
        assert client.guard.is_banned(cheater.peer_id)
        assert checks.failed >= 1
        assert not any(client.guard.is_banned(p) for p in honest)
        # The client's fraud proof reached the honest workers, who serve the model, re-ran
        # the job, and banned the cheater too.
        await wait_for(lambda: all(w.guard.is_banned(cheater.peer_id) for w in workers if w.peer_id in honest))
        assert client.fraud.stats.sent >= 1


async def test_honest_workers_are_never_blamed(tiny_model: ModelSpec) -> None:
    async with network(tiny_model, [0.0, 0.0, 0.0], check_rate=1.0) as (client, workers, _):
        checks = client.job_client.checks if client.job_client else None
        assert checks is not None
        async with trio.open_nursery() as nursery:
            for i in range(40):  # concurrent: batches of different sizes on each worker
                nursery.start_soon(
                    lambda i=i: client.infer(
                        tiny_model.model_id, inputs=(from_numpy("x", x_rows(1 + i % 5, seed=i)),), max_price_nanoton=10
                    )
                )
        assert checks.checks == 40 and checks.failed == 0
        assert not any(client.guard.is_banned(w.peer_id) for w in workers)


async def test_two_workers_that_disagree_with_no_third_blame_nobody(tiny_model: ModelSpec) -> None:
    # With one other worker, a check is one word against another: the reference may be the
    # liar. It used to condemn whichever worker ran first, so an honest worker checked
    # against a cheater was banned on the cheater's word.
    async with network(tiny_model, [0.0, 1.0], check_rate=1.0) as (client, workers, _):
        checks = client.job_client.checks if client.job_client else None
        assert checks is not None
        # Inputs whose every output row is non-zero (a cheater's zero row, rescaled, stays zero).
        seeds = [s for s in range(100) if np.all(np.linalg.norm(reference(x_rows(2, seed=s)), axis=1) > 0)][:6]
        for seed in seeds:
            x = from_numpy("x", x_rows(2, seed=seed))
            r = await client.infer(tiny_model.model_id, inputs=(x,), max_price_nanoton=10)
            assert r.worker in {w.peer_id for w in workers}
        assert checks.checks == 6 and checks.skipped == 6 and checks.failed == 0 and checks.withheld_nanoton == 0
        assert not any(client.guard.is_banned(w.peer_id) for w in workers)
        assert client.fraud.stats.sent == 0  # no accusation on one word against another
        # Kept and paid: every result and every reference run earned its worker its price.
        earned = sum(w.job_worker.stats.earned_nanoton for w in workers if w.job_worker is not None)
        assert earned == 2 * 2 * 6  # two rows, two runs, six jobs


def test_comparisons() -> None:
    a = np.eye(3, dtype=np.float32)
    assert cosine_agreement(a, a).tolist() == [1.0, 1.0, 1.0]
    t = (from_numpy("y", a),)
    assert compare_outputs(t, t) is None
    assert compare_outputs(t, (from_numpy("y", a[::-1].copy()),)) is not None
    assert compare_outputs(t, (from_numpy("z", a),)).reason == "outputs"  # type: ignore[union-attr]
    assert compare_outputs(t, (from_numpy("y", a[:2].copy()),)).reason == "shape"  # type: ignore[union-attr]
    near = a + np.float32(1e-5)
    assert compare_outputs(t, (from_numpy("y", near),), cosine_min=0.999) is None
    assert compare_tokens((1, 2, 3), (1, 2, 3)) is None
    assert compare_tokens((1, 2, 3), (1, 5, 3)).detail.startswith("token 1")  # type: ignore[union-attr]
    assert compare_tokens((1, 2), (1, 2, 3)) is not None
    with pytest.raises(ValueError):
        SpotCheckPolicy(rate=1.5)


@pytest.mark.slow
async def test_a_4bit_model_served_under_the_fp32_id_is_caught_by_a_verify_job() -> None:
    """The adversary serves SmolLM2's 4-bit variant under the fp32 model's id; checks of
    its generations are verify jobs (one teacher-forced pass) on the honest workers."""
    from cocoon_p2p.execution.export import ensure_smollm2, ensure_smollm2_q4
    from cocoon_p2p.execution.generation import chatml_prompt

    fp32, q4 = ensure_smollm2(), ensure_smollm2_q4()
    cfg = fast_config(spot_checks=SpotCheckPolicy(rate=1.0))
    async with Node(cfg) as client, trio.open_nursery() as nursery:
        workers: list[Node] = []

        async def run_worker(path: object, task_status: trio.TaskStatus[None]) -> None:
            async with Node(fast_config(bootstrap=[client.addrs[0]])) as w:
                w.serve_model(fp32, OnnxRuntimeBackend(path, threads=1), price_nanoton=1)  # type: ignore[arg-type]
                workers.append(w)
                task_status.started()
                await trio.sleep_forever()

        for path in (fp32.path, fp32.path, q4.path):
            await nursery.start(run_worker, path)
        cheater = workers[2]
        await wait_for(lambda: len(client.directory.workers_for(fp32.model_id, now_ms=now_ms())) == 3)
        verdicts = {}
        for i in range(24):  # until the cheater served one (the router picks among three)
            prompt = chatml_prompt([{"role": "user", "content": f"Count from {i} to {i + 5}, then name a colour."}])
            assert client.job_client is not None
            r = await client.job_client.infer(fp32.model_id, texts=(prompt,), max_tokens=12, max_price=10, timeout_s=60)
            verdicts[r.worker] = verdicts.get(r.worker, ()) + (r.verified,)
            if client.guard.is_banned(cheater.peer_id):
                break
        assert client.guard.is_banned(cheater.peer_id)
        assert False in verdicts.get(cheater.peer_id, ())  # its result was found wrong (and not paid)
        honest = [w.peer_id for w in workers[:2]]
        assert not any(client.guard.is_banned(p) for p in honest)
        assert all(v is True for p in honest for v in verdicts.get(p, ()))
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_generation_cheaters_are_caught_while_their_own_verify_answers_stay_honest() -> None:
    """Two adversaries on SmolLM2 among two honest workers: one answers every generation
    with garbage but verifies honestly (verify jobs run a graph derived from the model
    file, not the backend it cheats with: the "honest to checks, cheating on jobs" worker),
    one cuts generations short with an early end-of-sequence. Both are caught by verify
    jobs on other workers; their own honest verify answers never blame an honest worker."""
    from cocoon_p2p.execution.export import ensure_smollm2
    from cocoon_p2p.execution.generation import chatml_prompt

    spec = ensure_smollm2()
    cfg = fast_config(spot_checks=SpotCheckPolicy(rate=1.0))
    async with Node(cfg) as client, trio.open_nursery() as nursery:
        workers: list[Node] = []

        async def run_worker(kind: str, task_status: trio.TaskStatus[None]) -> None:
            async with Node(fast_config(bootstrap=[client.addrs[0]])) as w:
                inner = OnnxRuntimeBackend(spec.path, threads=1)
                backend = {
                    "honest": inner,
                    "garbage": CheatingBackend(inner, rate=1.0),
                    "truncating": TruncatingBackend(inner, keep=3, eos=spec.eos[0]),
                }[kind]
                w.serve_model(spec, backend, price_nanoton=1)  # type: ignore[arg-type]
                workers.append(w)
                task_status.started()
                await trio.sleep_forever()

        for kind in ("honest", "honest", "garbage", "truncating"):
            await nursery.start(run_worker, kind)
        honest, cheaters = [w.peer_id for w in workers[:2]], [w.peer_id for w in workers[2:]]
        await wait_for(lambda: len(client.directory.workers_for(spec.model_id, now_ms=now_ms())) == 4)
        verdicts: dict[object, list[bool | None]] = {}
        assert client.job_client is not None
        for i in range(24):
            prompt = chatml_prompt([{"role": "user", "content": f"Count from {i} to {i + 9}, in words."}])
            r = await client.job_client.infer(spec.model_id, texts=(prompt,), max_tokens=12, max_price=10, timeout_s=60)
            verdicts.setdefault(r.worker, []).append(r.verified)
            if all(client.guard.is_banned(p) for p in cheaters):
                break
        assert all(client.guard.is_banned(p) for p in cheaters), verdicts
        assert not any(client.guard.is_banned(p) for p in honest)
        assert all(v is True for p in honest for v in verdicts.get(p, ()))
        nursery.cancel_scope.cancel()
