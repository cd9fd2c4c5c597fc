"""Attestation benchmarks: quote verification, the collateral cache, and what attestation
adds to the first job to a new confidential worker.

Verification runs on the real sample TDX quote (tests/vectors/attestation) with dcap-qvl;
the baseline is dcap-qvl's own ``verify`` alone, measured alternately in the same run,
so the difference is our policy step. The first-job figure uses the sample quote with
the test-only relaxations (the worker serves a quote not made for it; the client skips
the binding and judges collateral at the sample's time), the only way to get a quote
past verification on machines without TDX: the protocol, the transfer and the
verification are the production path.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from cocoon_p2p.attestation.collateral import Collateral, CollateralCache, qvl
from cocoon_p2p.attestation.gate import ClientAttestation
from cocoon_p2p.attestation.keeper import WorkerAttestation
from cocoon_p2p.attestation.policy import DEFAULT_POLICY, parse_policy
from cocoon_p2p.attestation.sources import FileSource
from cocoon_p2p.attestation.verifier import verify_quote
from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.models import load_model
from cocoon_p2p.execution.tensors import from_numpy
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.testing.tinymodel import build_tiny_model

SAMPLES = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "attestation"
SAMPLE_TIME = 1750331763


def _ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 3)


async def bench_verify(n: int) -> dict[str, float]:
    """Per-quote verification: ours (dcap-qvl + policy) vs dcap-qvl alone, alternating."""
    quote = (SAMPLES / "tdx_quote").read_bytes()
    text = (SAMPLES / "tdx_quote_collateral.json").read_text()
    coll = Collateral.from_json(text)
    dcap = qvl()
    ours: list[float] = []
    alone: list[float] = []
    for i in range(2 * n):
        t = time.perf_counter()
        if i % 2:
            dcap.verify(quote, coll.for_qvl, SAMPLE_TIME)
            alone.append(time.perf_counter() - t)
        else:
            assert verify_quote(quote, coll, DEFAULT_POLICY, now_s=SAMPLE_TIME, expected_report_data=None).accepted
            ours.append(time.perf_counter() - t)
    cache = CollateralCache()
    misses: list[float] = []
    hits: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        parsed = Collateral.from_json(text)  # a miss in hand: parse what a PCCS or the worker sent
        cache.put(parsed)
        misses.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert cache.get(parsed.fmspc, SAMPLE_TIME) is not None
        hits.append(time.perf_counter() - t)
    return {
        "attest_verify_ms_p50": _ms(ours, 50),
        "attest_verify_ms_p99": _ms(ours, 99),
        "attest_dcap_alone_ms_p50": _ms(alone, 50),
        "attest_policy_overhead_ms_p50": round(_ms(ours, 50) - _ms(alone, 50), 3),
        "attest_collateral_miss_parse_ms_p50": _ms(misses, 50),
        "attest_collateral_hit_us_p50": round(percentile(hits, 50) * 1e6, 2),
    }


async def bench_first_job(rounds: int) -> dict[str, float]:
    """A new client's first TEE job to an attested worker (ask + verify + job) vs its
    later ones (verdict cached), each round with a fresh client; and the same client's
    first job without the requirement, as the baseline of a first job (stream set-up)."""
    with tempfile.TemporaryDirectory() as d:
        spec = load_model(build_tiny_model(Path(d) / "tiny.onnx"))
        x = (from_numpy("x", np.ones((1, 4), np.float32)),)  # the tiny model: 4 features
        worker_cfg = NodeConfig(announce_interval_s=0.5, announce_ttl_s=10)
        worker_cfg.tee = WorkerAttestation(
            source=FileSource(SAMPLES / "tdx_quote"),
            collateral_file=SAMPLES / "tdx_quote_collateral.json",
            insecure_serve_unbound_for_tests=True,
        )
        policy = parse_policy(
            {"insecure_skip_binding_for_tests": True, "insecure_fixed_time_for_tests": SAMPLE_TIME}, source="bench"
        )
        first_tee: list[float] = []
        first_plain: list[float] = []
        steady: list[float] = []
        ask: list[float] = []
        verify: list[float] = []
        async with Node(worker_cfg) as worker:
            worker.serve_model(spec, OnnxRuntimeBackend(spec.path, threads=1), price_nanoton=1)
            for r in range(rounds):
                cfg = NodeConfig(announce_interval_s=0.5, announce_ttl_s=10, bootstrap=[worker.addrs[0]])
                cfg.attestation = ClientAttestation(policy=policy)
                async with Node(cfg) as client:
                    with trio.fail_after(15):
                        while not client.directory.workers_for(spec.model_id, now_ms=now_ms()):
                            await trio.sleep(0.01)
                    # Alternate which first job comes first: plain (opens the job stream) or TEE.
                    order = [True, False] if r % 2 == 0 else [False, True]
                    for tee in order:
                        t = time.perf_counter()
                        await client.infer(spec.model_id, inputs=x, max_price_nanoton=10, require_tee=tee)
                        (first_tee if tee else first_plain).append(time.perf_counter() - t)
                    for _ in range(20):
                        t = time.perf_counter()
                        await client.infer(spec.model_id, inputs=x, max_price_nanoton=10, require_tee=True)
                        steady.append(time.perf_counter() - t)
                    gate = client.tee_gate.stats
                    assert gate.asks == 1
                    ask.append(gate.ask_s.total)
                    verify.append(gate.verify_s.total)
    extra = [a - v for a, v in zip(ask, verify, strict=True)]
    return {
        "attest_first_tee_job_ms_p50": _ms(first_tee, 50),
        "attest_first_plain_job_ms_p50": _ms(first_plain, 50),
        "attest_steady_tee_job_ms_p50": _ms(steady, 50),
        "attest_ask_and_verify_ms_p50": _ms(ask, 50),
        "attest_verify_in_ask_ms_p50": _ms(verify, 50),
        "attest_first_job_extra_ms_beyond_verify_p50": _ms(extra, 50),
        "attest_first_job_rounds": rounds,
        "attest_evidence_bytes": _evidence_size(),
        "attest_first_tee_minus_plain_ms_median": round(
            statistics.median(a - b for a, b in zip(first_tee, first_plain, strict=True)) * 1000, 3
        ),
    }


def _evidence_size() -> int:
    from cocoon_p2p.attestation.evidence import Evidence

    quote = (SAMPLES / "tdx_quote").read_bytes()
    text = (SAMPLES / "tdx_quote_collateral.json").read_text()
    return len(Evidence("tdx", "file", quote, text, 1, 2).encode())


BENCHES: list[tuple[str, Callable[[bool], Any]]] = [
    ("attest_verify", lambda quick: bench_verify(300 if quick else 2000)),
    ("attest_first_job", lambda quick: bench_first_job(4 if quick else 12)),
]
