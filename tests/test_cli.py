"""The node programs as an operator runs them: real processes on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "nodes.cli"]


def test_demo_runs_real_jobs_over_discovered_workers() -> None:
    out = subprocess.run(
        [*CLI, "demo", "--json", "--workers", "2", "--jobs", "8", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["ok"] and r["workers"] == 2
    assert r["discovered_both_sources"] == {"embed": 2, "chat": 2}
    assert r["jobs_ok"] == 8 and r["jobs_failed"] == 0
    assert sum(w["jobs"] for w in r["per_worker"].values()) == 8
    assert sum(w["earned_nanoton"] for w in r["per_worker"].values()) == r["paid_nanoton"] > 0
    # Paid by voucher, settled on the local chain: what the workers' wallets received, net of fees.
    assert 0 < r["settled_nanoton"] <= r["paid_nanoton"]
    assert r["fees_nanoton"] == r["paid_nanoton"] - r["settled_nanoton"] < r["paid_nanoton"] // 10
    assert r["channels"] == sum(1 for w in r["per_worker"].values() if w["jobs"] > 0)  # one per worker paid
    assert 0 < r["latency_ms_p50"] <= r["latency_ms_p99"]
    assert "jobs done" in out.stderr  # progress is shown


def test_worker_and_client_commands(tmp_path: Path) -> None:
    worker = subprocess.Popen(
        [*CLI, "worker", "--data-dir", str(tmp_path / "w"), "--model", "minilm", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        addr = worker.stdout.readline().split()[1]
        assert addr.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in addr
        serving = worker.stdout.readline()
        assert serving.startswith("serving ") and "all-minilm-l6-v2" in serving
        out = subprocess.run(
            [*CLI, "client", "embed", "hello world", "--bootstrap", addr, "--data-dir", str(tmp_path / "c")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "(384 dims)" in out.stdout
        assert f"served by {addr.rsplit('/', 1)[1]}" in out.stderr and "1 units x 1000 = 1000 nanoton" in out.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        rest, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0
    assert "stopping" in rest and "served 1 jobs, earned 1000 nanoton" in rest


def test_demo_survives_a_killed_worker() -> None:
    out = subprocess.run(
        [*CLI, "demo", "--json", "--workers", "2", "--jobs", "9", "--max-tokens", "8", "--kill-worker"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["killed_worker"] in r["worker_ids"] and "killing worker" in out.stderr
    assert r["jobs_ok"] == 9 and r["jobs_failed"] == 0 and r["errors"] == []  # every job completed
    assert sum(w["earned_nanoton"] for w in r["per_worker"].values()) == r["paid_nanoton"]  # each paid once
    assert 0 < r["settled_nanoton"] <= r["paid_nanoton"]  # the restarted worker settled too
