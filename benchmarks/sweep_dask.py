"""A sweep on Dask (issue 22): the speed-up of 2 local Dask workers over 1, and what the Dask
path adds to each point over a local process pool.

    python -m benchmarks.sweep_dask [--quick] [--out benchmarks/results/sweep_dask.json]

* Speed-up: a 16-point sweep (``small.toml`` for 200 s virtual, seeds 1..16, about a second
  of model a point) on a local Dask cluster of 1 worker process and on one of 2, both started
  once before the rounds (their start-up is reported apart).
* Overhead: 16 tiny points (3 s virtual, ~20 ms of model) on 1 Dask worker and in a pool of
  1 process; a point's overhead is the sweep's wall time less the points' own time (measured
  inside them), over the points: submitting, sending the scenario, sending the files back,
  writing them and the record. One worker each, so the points run one after the other.

Every round runs each variant once, in an order that alternates from round to round (this
machine's speed drifts by 10-20% within a minute); each executor runs one sweep before the
rounds (imports, forks), not counted. Points run with ``fresh`` (no resume) and without their
own plots. Prints a table and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cocoon_p2p.simulations.cluster import ExecutorKind, ExecutorSpec, open_executor
from cocoon_p2p.simulations.sweep import Point, expand, run_sweep

from .runmeta import RunMeta

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "simulations" / "scenarios" / "small.toml"
OUT = ROOT / "benchmarks" / "results" / "sweep_dask.json"


@dataclass(frozen=True)
class Settings:
    rounds: int
    points: int
    heavy_s: int  # virtual seconds of a speed-up point
    tiny_s: int  # of an overhead point


FULL = Settings(rounds=3, points=16, heavy_s=200, tiny_s=3)
QUICK = Settings(rounds=1, points=4, heavy_s=20, tiny_s=3)


def _points(n: int, duration_s: int) -> list[Point]:
    grid = [f"seed={','.join(str(i) for i in range(1, n + 1))}"]
    return expand(SCENARIO, grid, [f"duration_s={duration_s}", "warmup_s=1"], "model", 1)


def _sweep(points: list[Point], ex: concurrent.futures.Executor, tmp: Path) -> dict[str, float]:
    """One sweep, fresh, into a folder of its own; its wall time and the points' own time."""
    out = Path(tempfile.mkdtemp(dir=tmp))
    report = run_sweep(points, out, ex, plots=False, fresh=True, log=io.StringIO())
    assert len(report.records) == len(points), report.failures
    return {"wall_s": report.wall_s, "points_s": report.points_wall_s}


def measure(settings: Settings) -> dict[str, Any]:
    heavy, tiny = _points(settings.points, settings.heavy_s), _points(settings.points, settings.tiny_s)
    variants = {
        "dask-1": ExecutorSpec(kind=ExecutorKind.DASK, workers=1),
        "dask-2": ExecutorSpec(kind=ExecutorKind.DASK, workers=2),
        "pool-1": ExecutorSpec(kind=ExecutorKind.PROCESS, workers=1),
    }
    samples: dict[str, list[dict[str, float]]] = {f"{v} {w}": [] for v in variants for w in ("heavy", "tiny")}
    startup: dict[str, float] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        ex = {}
        for name, spec in variants.items():
            t = time.perf_counter()
            ex[name] = stack.enter_context(open_executor(spec))
            startup[name] = time.perf_counter() - t
            _sweep(tiny, ex[name], Path(tmp))  # warm: every worker imports the simulator, a pool forks
        plan = [("dask-1", "heavy"), ("dask-2", "heavy"), ("dask-1", "tiny"), ("pool-1", "tiny")]
        for r in range(settings.rounds):
            for i in range(0, len(plan), 2):  # each pair alternates which goes first
                pair = plan[i : i + 2] if r % 2 == 0 else plan[i : i + 2][::-1]
                for name, work in pair:
                    s = _sweep(heavy if work == "heavy" else tiny, ex[name], Path(tmp))
                    samples[f"{name} {work}"].append(s)
                    print(f"round {r + 1}/{settings.rounds} {name} {work}: {s['wall_s']:.2f} s", file=sys.stderr)
    return {"samples": samples, "startup_s": startup}


def summarize(m: dict[str, Any], settings: Settings) -> dict[str, Any]:
    s, n = m["samples"], settings.points
    wall = {k: statistics.median(x["wall_s"] for x in v) for k, v in s.items() if v}
    overhead_ms = {
        k.split()[0]: statistics.median((x["wall_s"] - x["points_s"]) / n * 1000 for x in s[k])
        for k in ("dask-1 tiny", "pool-1 tiny")
    }
    paired = [a["wall_s"] / b["wall_s"] for a, b in zip(s["dask-1 heavy"], s["dask-2 heavy"], strict=True)]
    return {
        "points": n,
        "point_model_s": statistics.median(x["points_s"] / n for x in s["dask-1 heavy"]),
        "sweep_s_1_worker": wall["dask-1 heavy"],
        "sweep_s_2_workers": wall["dask-2 heavy"],
        "speedup_2_vs_1": wall["dask-1 heavy"] / wall["dask-2 heavy"],
        "speedup_2_vs_1_paired": statistics.median(paired),
        "overhead_ms_per_point_dask": overhead_ms["dask-1"],
        "overhead_ms_per_point_pool": overhead_ms["pool-1"],
        "dask_extra_ms_per_point": overhead_ms["dask-1"] - overhead_ms["pool-1"],
        "tiny_point_model_ms": statistics.median(x["points_s"] / n * 1000 for x in s["pool-1 tiny"]),
        "startup_s": m["startup_s"],
        "wall_s_each_round": {k: [round(x["wall_s"], 3) for x in v] for k, v in s.items() if v},
    }


def table(res: dict[str, Any]) -> str:
    st, n = res["startup_s"], res["points"]
    return "\n".join([
        f"{'figure':44} {'value':>10}",
        f"{f'{n}-point sweep, 1 Dask worker (s)':44} {res['sweep_s_1_worker']:10.2f}",
        f"{f'{n}-point sweep, 2 Dask workers (s)':44} {res['sweep_s_2_workers']:10.2f}",
        f"{'speed-up 2 vs 1 (medians; round by round)':44} {res['speedup_2_vs_1']:10.2f} "
        f"({res['speedup_2_vs_1_paired']:.2f})",
        f"{'model time of a point (s)':44} {res['point_model_s']:10.3f}",
        f"{'overhead a point: Dask, 1 worker (ms)':44} {res['overhead_ms_per_point_dask']:10.1f}",
        f"{'overhead a point: process pool of 1 (ms)':44} {res['overhead_ms_per_point_pool']:10.1f}",
        f"{'Dask adds a point (ms)':44} {res['dask_extra_ms_per_point']:10.1f}",
        f"{'start-up: Dask 1 / Dask 2 / pool (s)':44} "
        f"{st['dask-1']:.2f} / {st['dask-2']:.2f} / {st['pool-1']:.2f}",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sweep_dask")
    ap.add_argument("--quick", action="store_true", help="1 round of 4 short points")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    settings = QUICK if args.quick else FULL
    runmeta = RunMeta.start()
    t = time.perf_counter()
    res = summarize(measure(settings), settings)
    meta = {
        **runmeta.finish(),
        "quick": args.quick,
        "settings": asdict(settings),
        "seconds": round(time.perf_counter() - t, 1),
    }
    print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": res}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
