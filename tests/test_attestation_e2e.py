"""Attestation between real peers on 127.0.0.1: claims in gossip, /cocoon/attest/1 over
Noise, dcap-qvl on the real sample quote, and jobs that require a TEE.

No machine here has TDX, so no worker can make a quote bound to its own key. The
positive path uses the real sample quote with two test-only relaxations, both named
``insecure_*_for_tests`` and never defaults: the worker serves a quote not made for
it, and the client skips the binding check and judges collateral at the sample's
time. Everything else is the production path. The same quote under the real
binding check is refused as forged and its worker banned.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio

from cocoon_p2p.attestation.book import TeeStanding
from cocoon_p2p.attestation.errors import RefusalReason
from cocoon_p2p.attestation.gate import ClientAttestation
from cocoon_p2p.attestation.keeper import WorkerAttestation
from cocoon_p2p.attestation.policy import TeePolicy, parse_policy
from cocoon_p2p.attestation.sources import FileSource
from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import from_numpy
from cocoon_p2p.jobs import JobFailed
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.node import Node
from cocoon_p2p.overlay.events import AttestationRefused, PeerAttested

from .helpers import x_rows
from .netutil import fast_config, wait_for

SAMPLES = Path(__file__).resolve().parent / "vectors" / "attestation"  # real quotes: see its README
SAMPLE_TIME = 1750331763
MEASUREMENT = "8ef444fda246f7e0d5f9a3ba0a2822ae0be7dbec5e321277d03b73b198fa2545"

SAMPLE_WORKER = WorkerAttestation(
    source=FileSource(SAMPLES / "tdx_quote"),
    collateral_file=SAMPLES / "tdx_quote_collateral.json",
    insecure_serve_unbound_for_tests=True,
)
TEST_POLICY = parse_policy(
    {"insecure_skip_binding_for_tests": True, "insecure_fixed_time_for_tests": SAMPLE_TIME}, source="test"
)
REAL_BINDING_POLICY = parse_policy({"insecure_fixed_time_for_tests": SAMPLE_TIME}, source="test")


def job(spec: ModelSpec) -> dict[str, object]:
    return {"inputs": (from_numpy("x", np.asarray(x_rows(1))),), "max_price_nanoton": 10}


@asynccontextmanager
async def network(spec: ModelSpec, policy: TeePolicy, attested: list[bool]) -> AsyncIterator[tuple[Node, list[Node]]]:
    """A client with ``policy`` and one worker per entry of ``attested`` (True: it serves
    the sample evidence)."""
    cfg = fast_config()
    cfg.attestation = ClientAttestation(policy=policy, ask_timeout_s=5.0)
    async with Node(cfg) as client, trio.open_nursery() as nursery:
        workers: list[Node] = []

        async def run_worker(tee: bool, task_status: trio.TaskStatus[None]) -> None:
            wcfg = fast_config(bootstrap=[client.addrs[0]])
            wcfg.tee = SAMPLE_WORKER if tee else None
            async with Node(wcfg) as w:
                w.serve_model(spec, OnnxRuntimeBackend(spec.path, threads=1), price_nanoton=1)
                workers.append(w)
                task_status.started()
                await trio.sleep_forever()

        for tee in attested:
            await nursery.start(run_worker, tee)
        await wait_for(lambda: len(client.directory.workers_for(spec.model_id, now_ms=now_ms())) == len(attested))
        yield client, workers
        nursery.cancel_scope.cancel()


async def test_require_tee_with_no_attested_worker_says_so_and_without_it_the_job_runs(tiny_model: ModelSpec) -> None:
    async with network(tiny_model, TEST_POLICY, [False, False]) as (client, _):
        with pytest.raises(JobFailed) as caught:
            await client.infer(tiny_model.model_id, require_tee=True, **job(tiny_model))  # type: ignore[arg-type]
        assert caught.value.code == jf.NO_ATTESTED_WORKERS == "no-attested-workers"
        result = await client.infer(tiny_model.model_id, **job(tiny_model))  # type: ignore[arg-type]
        assert result.outputs and client.tee_gate.stats.asks == 0  # workers that claim nothing are not asked


async def test_a_tee_job_goes_only_to_the_attested_worker_which_is_asked_once(tiny_model: ModelSpec) -> None:
    async with network(tiny_model, TEST_POLICY, [True, False]) as (client, workers):
        attested = next(w for w in workers if w.evidence is not None)
        offers = client.directory.workers_for(tiny_model.model_id, now_ms=now_ms())
        claims = {o.peer_id: o.tee for o in offers}
        assert claims[attested.peer_id] is not None and claims[attested.peer_id].measurement.hex() == MEASUREMENT
        assert sum(c is None for c in claims.values()) == 1
        events = []

        async def listen() -> None:
            async for event in client.events():
                if isinstance(event, PeerAttested | AttestationRefused):
                    events.append(event)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            for _ in range(6):
                r = await client.infer(tiny_model.model_id, require_tee=True, **job(tiny_model))  # type: ignore[arg-type]
                assert r.worker == attested.peer_id
            await wait_for(lambda: bool(events))
            nursery.cancel_scope.cancel()
        assert client.tee_gate.stats.asks == 1 and client.tee_gate.standing(attested.peer_id) is TeeStanding.ATTESTED
        assert isinstance(events[0], PeerAttested) and events[0].measurement == MEASUREMENT
        assert attested.evidence is not None and attested.evidence.served == 1
        series = {m.name: m for m in client.metrics()}
        assert series["cocoon_attestation_accepted_total"].samples[0][1] == 1
        verdict = await client.check_attestation(attested.peer_id)
        assert verdict.accepted and verdict.status == "UpToDate" and client.tee_gate.stats.asks == 1


async def test_the_sample_quote_under_the_real_binding_check_is_forged_and_its_worker_banned(
    tiny_model: ModelSpec,
) -> None:
    async with network(tiny_model, REAL_BINDING_POLICY, [True]) as (client, workers):
        with pytest.raises(JobFailed) as caught:
            await client.infer(tiny_model.model_id, require_tee=True, **job(tiny_model))  # type: ignore[arg-type]
        assert caught.value.code == jf.NO_ATTESTED_WORKERS
        (worker,) = workers
        verdict = client.tee_gate.book.verdict(worker.peer_id, time.time())
        assert verdict is not None and verdict.reason is RefusalReason.NOT_BOUND
        assert client.tee_gate.standing(worker.peer_id) is TeeStanding.REFUSED
        assert client.guard.is_banned(worker.peer_id)  # a quote bound to another key is a lie
