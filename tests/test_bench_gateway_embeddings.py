"""The gateway embeddings benchmark's smallest run (``python -m benchmarks.gateway_embeddings
--quick``), end to end: a MiniLM worker and the gateway, each a process of its own, driven by
the official ``openai`` client, ``http.client`` and the benchmark's lean load clients. Its
figures must hold together; no request of the curve may fail (16 clients on one worker are
queued behind its busy refusals, never answered 503)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_quick_gateway_embeddings_benchmark_runs_and_its_figures_hold_together(tmp_path: Path) -> None:
    out = tmp_path / "gateway_embeddings.json"
    # Capacity 8 (the node's default) under 16 clients: half the jobs meet a busy worker.
    cmd = [sys.executable, "-m", "benchmarks.gateway_embeddings", "--quick", "--worker-capacity", "8"]
    run = subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    lat, curve, goals = doc["latency"], doc["curve"], doc["goals"]
    rounds = doc["meta"]["settings"]["rounds"]
    for name in ("direct", "http", "openai", "openai-float"):
        p = lat["paths"][name]
        assert p["n"] == rounds == len(p["samples"]) and 0 < p["p50"] <= p["p99"]
    for name in ("http", "openai", "openai-float"):  # through the network: never faster than the model alone
        assert lat["paths"][name]["p50"] > lat["paths"]["direct"]["p50"] * 0.5
    gw = lat["gateway"]
    assert 0 < gw["job_ms_mean"] <= gw["request_ms_mean"]  # the job is part of the request
    parts = doc["breakdown"]
    assert sum(parts.values()) == pytest.approx(lat["paths"]["openai"]["mean"], abs=0.01)
    assert [c["clients"] for c in curve] == [1, 16]
    for c in curve:
        assert c["errors"] == 0, c["first_error"]
        assert c["requests"] > 0 and 0 < c["p50_ms"] <= c["p99_ms"]
    assert goals["requests_per_s_at_16"] == curve[1]["requests_per_s"]
    assert goals["openai_vs_direct_p50"] == pytest.approx(
        lat["paths"]["openai"]["p50"] / lat["paths"]["direct"]["p50"], abs=1e-3
    )
    assert "| 16 |" in out.with_suffix(".md").read_text()
