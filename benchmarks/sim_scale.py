"""The simulator's cost against network size (issue 22): wall time and peak memory of one
model run, and how they grow.

    python -m benchmarks.sim_scale [--quick] [--peers 1000,10000,100000] [--view auto|full|sampled]
        [--keep] [--out benchmarks/results/sim_scale.json]

Each point is ``simulations/scenarios/scale.toml`` at N peers (3% workers, 20% clients, the
rest relays; 30% churn; a job every 2 minutes per client), one hour of virtual time (``--quick``:
N = 500, 1,000, 2,000 for 5 minutes), run in a fresh process of its own pinned to one core, so
its peak memory (``ru_maxrss``) is its own. The growth exponent is the least-squares slope of
log(wall time) against log(N). ``--keep`` keeps the points of ``--out`` not run again (the
100,000-peer point takes minutes: run it once, add others later). Prints a table and writes
JSON and a log-log plot beside it (``.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cocoon_p2p.simulations.experiments_scale import peers_overrides
from cocoon_p2p.simulations.results import dumps

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "simulations" / "scenarios" / "scale.toml"
OUT = ROOT / "benchmarks" / "results" / "sim_scale.json"
FULL_PEERS = (1_000, 10_000, 100_000)
QUICK_PEERS = (500, 1_000, 2_000)
GOAL_S, GOAL_GIB = 600.0, 8.0  # 100,000 peers x 1 h on one core


def overrides(peers: int, duration_s: float, view: str) -> list[str]:
    """scale.toml at ``peers`` peers: 3% workers, 20% clients, the rest relays."""
    return [*peers_overrides(peers), f"duration_s={duration_s}", f"warmup_s={min(60.0, duration_s / 10)}",
            f"scale.view={view}"]  # fmt: skip


def run_point(peers: int, duration_s: float, view: str) -> dict[str, Any]:
    """One run in this process: its figures, wall time and peak memory."""
    from cocoon_p2p.simulations.model import ModelSim
    from cocoon_p2p.simulations.scenario import load

    sc = load(SCENARIO, overrides(peers, duration_s, view))
    t0 = time.perf_counter()
    r = ModelSim(sc).run()
    wall = time.perf_counter() - t0
    s = r.summary()
    return {
        "peers": sc.peers, "duration_s": duration_s, "view": r.extra.get("view"), "wall_s": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "events": r.events,
        "us_per_event": wall / max(1, r.events) * 1e6, "jobs": s["jobs_issued"], "success": s["success"],
        "latency_s_p99": s["latency_s_p99"], "lookup_hops_mean": s.get("lookup_hops_mean"),
        "lookup_s_p50": s.get("lookup_s_p50"),
    }  # fmt: skip


def fit_exponent(points: list[dict[str, Any]], key: str = "wall_s") -> float | None:
    """The least-squares slope of log(key) against log(peers); None with fewer than 2 points."""
    xs = [math.log(p["peers"]) for p in points if p.get(key)]
    ys = [math.log(p[key]) for p in points if p.get(key)]
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else None


def _child(peers: int, duration_s: float, view: str, cpu: int | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.sim_scale", "--point", str(peers), "--duration", str(duration_s),
           "--view", view]  # fmt: skip
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"point {peers} failed:\n{run.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def plot(points: list[dict[str, Any]], exponent: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [p["peers"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(ns, [p["wall_s"] for p in points], marker="o", label="wall time, 1 h virtual (one core)")
    if exponent is not None and points:
        first = points[0]
        fit = [first["wall_s"] * (n / first["peers"]) ** exponent for n in ns]
        ax.plot(ns, fit, linestyle=":", color="gray", label=f"fit: N^{exponent:.2f}")
    ax.axhline(GOAL_S, color="tab:red", linestyle="--", label="goal: 10 min at 100,000")
    for p in points:
        ax.annotate(f"{p['peak_rss_mib'] / 1024:.1f} GiB", (p["peers"], p["wall_s"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peers N")
    ax.set_ylabel("seconds")
    ax.set_title("Simulator cost against network size (peak memory beside each point)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.sim_scale", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 500, 1,000, 2,000 for 5 minutes virtual")
    ap.add_argument("--peers", help="comma-separated sizes (default 1000,10000,100000)")
    ap.add_argument("--duration", type=float, help="virtual seconds (default 3600; --quick 300)")
    ap.add_argument("--view", choices=["auto", "full", "sampled"], default="auto")
    ap.add_argument("--cpu", type=int, default=0, help="pin each point to this core (-1: do not pin)")
    ap.add_argument("--keep", action="store_true", help="keep the points of --out that are not run again")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--point", type=int, help=argparse.SUPPRESS)  # a child: run one point, print its JSON
    a = ap.parse_args(argv)
    duration = a.duration or (300.0 if a.quick else 3600.0)
    cpu = None if a.cpu < 0 or not hasattr(os, "sched_setaffinity") else a.cpu
    if a.point:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        print(json.dumps(run_point(a.point, duration, a.view)))
        return 0
    sizes = [int(x) for x in a.peers.split(",")] if a.peers else list(QUICK_PEERS if a.quick else FULL_PEERS)
    held: dict[int, dict[str, Any]] = {}
    if a.keep and a.out.exists():
        held = {p["peers"]: p for p in json.loads(a.out.read_text())["results"]["points"]}
    print(f"{'peers':>8} {'view':>8} {'wall s':>9} {'peak MiB':>9} {'events':>10} {'us/event':>9} {'jobs':>8} "
          f"{'success':>8} {'p99 s':>7}")  # fmt: skip
    for n in sizes:
        p = held[n] = _child(n, duration, a.view, cpu)
        print(f"{p['peers']:>8} {p['view']:>8} {p['wall_s']:>9.1f} {p['peak_rss_mib']:>9.0f} {p['events']:>10} "
              f"{p['us_per_event']:>9.1f} {p['jobs']:>8} {p['success']:>8.4f} {p['latency_s_p99']:>7.3f}",
              flush=True)  # fmt: skip
    points = sorted(held.values(), key=lambda p: p["peers"])
    exponent, mem_exponent = fit_exponent(points), fit_exponent(points, "peak_rss_mib")
    print(f"growth exponent: wall time N^{exponent:.2f}" if exponent is not None else "growth exponent: -")
    doc = {
        "meta": {"benchmark": "sim_scale", "quick": a.quick, "duration_s": duration, "view": a.view,
                 "cpu_pinned": cpu, "python": platform.python_version(), "machine": platform.machine(),
                 "cpus": os.cpu_count(), "scenario": "simulations/scenarios/scale.toml",
                 "when": time.strftime("%Y-%m-%d %H:%M:%S")},
        "results": {"points": points, "wall_exponent": exponent, "memory_exponent": mem_exponent,
                    "goal": {"peers": 100_000, "wall_s": GOAL_S, "peak_gib": GOAL_GIB}},
    }  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(dumps(doc))  # strict JSON: null for a figure without a value
    plot(points, exponent, a.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
