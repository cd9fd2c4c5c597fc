"""The simulator scale benchmark's smallest run (``python -m benchmarks.sim_scale --quick``,
two small sizes): what it writes must hold together (never how fast: this machine is shared)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_quick_scale_benchmark_writes_points_a_fit_and_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "sim_scale.json"
    cmd = [sys.executable, "-m", "benchmarks.sim_scale", "--quick", "--peers", "300,600", "--duration", "60",
           "--view", "sampled", "--cpu", "-1", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "growth exponent" in run.stdout
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    points = doc["results"]["points"]
    assert [p["peers"] for p in points] == [300, 600] and all(p["view"] == "sampled" for p in points)
    assert all(p["wall_s"] > 0 and p["peak_rss_mib"] > 0 and p["events"] > 0 and p["jobs"] > 0 for p in points)
    slope = math.log(points[1]["wall_s"] / points[0]["wall_s"]) / math.log(2)
    assert doc["results"]["wall_exponent"] == pytest.approx(slope)  # two points: the fit is their slope
    assert out.with_suffix(".png").stat().st_size > 0
