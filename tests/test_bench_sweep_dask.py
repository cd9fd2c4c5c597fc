"""The Dask sweep benchmark's smallest run (``python -m benchmarks.sweep_dask --quick``), end to
end: local Dask clusters of 1 and 2 workers and a process pool, started and shut down by it.
What it writes must hold together (never how fast: this machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_quick_dask_sweep_benchmark_runs_and_its_figures_hold_together(tmp_path: Path) -> None:
    out = tmp_path / "sweep_dask.json"
    cmd = [sys.executable, "-m", "benchmarks.sweep_dask", "--quick", "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "speed-up 2 vs 1" in run.stdout and "Dask adds a point" in run.stdout
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    res, meta = doc["results"], doc["meta"]
    assert meta["quick"] and meta["settings"]["points"] == res["points"] == 4
    assert res["speedup_2_vs_1"] == pytest.approx(res["sweep_s_1_worker"] / res["sweep_s_2_workers"])
    # One worker runs the points one after another: the sweep takes at least their own time.
    assert res["sweep_s_1_worker"] >= res["points"] * res["point_model_s"] * 0.99
    assert res["overhead_ms_per_point_dask"] > 0 and res["overhead_ms_per_point_pool"] > 0
    assert res["dask_extra_ms_per_point"] == pytest.approx(
        res["overhead_ms_per_point_dask"] - res["overhead_ms_per_point_pool"]
    )
    assert set(res["startup_s"]) == {"dask-1", "dask-2", "pool-1"}
    assert all(len(v) == 1 for v in res["wall_s_each_round"].values())  # one round each, all four
    assert len(res["wall_s_each_round"]) == 4
