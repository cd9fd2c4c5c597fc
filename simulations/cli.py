"""``cocoon-sim``: run scenarios in virtual time (model) or with real nodes (emulation).

    cocoon-sim run SCENARIO [--fidelity model|emulation] [--out DIR] [--param key=value ...]
    cocoon-sim sweep SCENARIO --param key=v1,v2,... [--param ...] [--processes N] [--out DIR]
    cocoon-sim calibrate SCENARIO [--out DIR]    # the same scenario in both fidelities, side by side

Each run writes summary.json, CSVs (jobs, time series, lookups, workers) and PNG plots.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import importlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from cocoon_p2p import __version__

from .results import Results
from .scenario import Scenario, ScenarioError, load

# Imported on first use (by the model and the plots): an install without the
# [sim] extra still answers --help and --version, and says what is missing.
SIM_EXTRA = ("scipy", "matplotlib")


def missing_sim_extra() -> str | None:
    """The first package of the ``[sim]`` extra that does not import, if any."""
    for name in SIM_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


class Progress:
    """A one-line progress bar on stderr (virtual time done, wall time spent)."""

    def __init__(self, total_s: float, label: str, *, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = total_s, label, enabled
        self.t0 = time.perf_counter()

    def __call__(self, now: float) -> None:
        if not self.enabled:
            return
        share = min(1.0, now / self.total)
        bar = "#" * int(share * 30)
        print(f"\r{self.label} [{bar:<30}] {share:4.0%} virtual {now:,.0f}/{self.total:,.0f} s, "
              f"wall {time.perf_counter() - self.t0:,.1f} s", end="", file=sys.stderr, flush=True)  # fmt: skip

    def done(self) -> None:
        if self.enabled:
            self(self.total)
            print(file=sys.stderr)


def run_scenario(sc: Scenario, fidelity: str, *, show_progress: bool = True) -> Results:
    t0 = time.perf_counter()
    progress = Progress(sc.duration_s, sc.name, enabled=show_progress)
    if fidelity == "model":
        from .model import ModelSim

        results = ModelSim(sc, progress=progress).run()
    else:
        from .emulation import run_emulation

        results = run_emulation(sc, progress=progress)
    progress.done()
    results.wall_s = time.perf_counter() - t0
    return results


def _save(results: Results, out: Path, *, plots: bool = True) -> dict[str, Any]:
    summary = results.write(out)
    if plots:  # a fifth of a short run's time: experiments that draw their own figures skip them
        from . import plots as figures

        summary["plots"] = figures.write_all(results, out)
    else:
        summary["plots"] = []
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


KEY_FIGURES = ("jobs_issued", "success", "latency_s_p50", "latency_s_p99", "attempts_mean", "lookup_s_p50",
               "lookup_hops_mean", "onchain_ops", "onchain_ops_per_10k_jobs", "wall_s")  # fmt: skip


# With a [cheat] section in use: the figures of its block that a run prints and a sweep tabulates.
CHEAT_FIGURES = ("cheaters", "cheaters_detected", "wrong_delivered", "wrong_caught", "wrong_paid_share",
                 "jobs_to_detection_p50", "jobs_to_detection_p90", "network_ban_s_max", "checks",
                 "added_compute_share", "false_alarms")  # fmt: skip


def _print_summary(s: dict[str, Any]) -> None:
    for k in KEY_FIGURES:
        v = s.get(k)
        if v is not None:
            print(f"{k:28} {v:.4g}" if isinstance(v, float) else f"{k:28} {v}")
    if s.get("failures_by_code"):
        print(f"{'failures_by_code':28} {s['failures_by_code']}")
    for k in CHEAT_FIGURES if "cheat" in s else ():
        v = s["cheat"].get(k)
        print(f"{'cheat.' + k:28} {v:.4g}" if isinstance(v, float) else f"{'cheat.' + k:28} {v}")


def _one(args: tuple[str, list[str], str, str, bool]) -> dict[str, Any]:
    """A sweep point, in its own process."""
    path, overrides, fidelity, out, plots = args
    sc = load(Path(path), overrides)
    summary = _save(run_scenario(sc, fidelity, show_progress=False), Path(out), plots=plots)
    summary["params"] = dict(o.split("=", 1) for o in overrides)
    return summary


def sweep(
    path: Path, grid: list[str], fidelity: str, out: Path, processes: int, base: list[str], *, plots: bool = True
) -> list[dict[str, Any]]:
    """Every point of ``grid`` (``key=v1,v2`` axes) over ``base`` overrides, in parallel
    processes; each point's files (its plots only with ``plots``) under ``out``, and
    ``sweep.csv`` / ``sweep.json`` of them all."""
    axes = []
    for g in grid:
        key, _, values = g.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])
    points = [base + list(combo) for combo in itertools.product(*axes)]
    jobs = [(str(path), p, fidelity, str(out / "_".join(o.replace("=", "-") for o in p[len(base) :])), plots)
            for p in points]  # fmt: skip
    results: list[dict[str, Any]] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=processes) as pool:
        futures = {pool.submit(_one, j): j for j in jobs}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            s = fut.result()
            results.append(s)
            print(f"[{i}/{len(jobs)}] {s['params']}: success {s['success']:.4f}, p99 {s['latency_s_p99']:.3f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    results.sort(key=lambda s: [s["params"][k] for k in sorted(s["params"])])
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep.csv").open("w", newline="") as f:
        keys = sorted(results[0]["params"]) if results else []
        cheat = CHEAT_FIGURES if any("cheat" in s for s in results) else ()
        w = csv.writer(f)
        w.writerow([*keys, *KEY_FIGURES, *(f"cheat.{k}" for k in cheat)])
        for s in results:
            w.writerow([s["params"][k] for k in keys] + [s.get(k) for k in KEY_FIGURES]
                       + [s.get("cheat", {}).get(k) for k in cheat])  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


CALIBRATED = ("success", "latency_s_p50", "latency_s_p90", "latency_s_p99", "lookup_s_p50", "announce_visible_s_p50")


def calibrate(path: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    """The same scenario in both fidelities; where they differ by more than 25% (or 0.5
    points of success), the model is not to be trusted for that figure.

    The emulation runs first; the model's per-job worker time is then fitted to the
    emulation's median latency (less the scenario's round trip), so the median agrees
    by construction and the other figures are the test."""
    sc = load(path, overrides)
    report: dict[str, Any] = {"emulation": _save(run_scenario(sc, "emulation"), out / "emulation")}
    job_s = max(1e-4, report["emulation"]["latency_s_p50"] - sc.network.rtt_ms_median / 1000)
    report["fitted"] = {"workers.job_s": job_s}
    sc = load(path, [*overrides, f"workers.job_s={job_s}"])
    report["model"] = _save(run_scenario(sc, "model"), out / "model")
    rows = []
    for key in CALIBRATED:
        e, m = report["emulation"].get(key), report["model"].get(key)
        agree = None
        if isinstance(e, (int, float)) and isinstance(m, (int, float)) and not (math.isnan(e) or math.isnan(m)):
            agree = bool(abs(e - m) <= 0.005 if key == "success" else abs(e - m) <= 0.25 * max(abs(e), 1e-9))
        rows.append({"figure": key, "emulation": e, "model": m, "agree": agree})
    report["comparison"] = rows
    (out / "calibration.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    from . import plots

    plots.latency_cdf({"emulation": _reload(out / "emulation", sc), "model": _reload(out / "model", sc)},
                      out / "latency_cdf_both.png")  # fmt: skip
    return report


def _reload(folder: Path, sc: Scenario) -> Results:
    from .results import JobRecord

    r = Results(sc)
    with (folder / "jobs.csv").open() as f:
        for row in csv.DictReader(f):
            r.jobs.append(JobRecord(float(row["issued"]), int(row["client"]), row["counted"] == "True",
                                    row["ok"] == "True", float(row["latency_s"]), int(row["attempts"])))  # fmt: skip
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cocoon-sim", description=__doc__.split("\n")[0])
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run one scenario")
    p.add_argument("scenario", type=Path)
    p.add_argument("--fidelity", choices=["model", "emulation"], default="model")
    p.add_argument("--out", type=Path, help="output folder (default sim-out/<name>)")
    p.add_argument("--param", action="append", default=[], help="override: section.key=value (repeatable)")
    p = sub.add_parser("sweep", help="run a grid of parameter values in parallel processes")
    p.add_argument("scenario", type=Path)
    p.add_argument("--param", action="append", required=True, help="section.key=v1,v2,... (repeatable: a grid)")
    p.add_argument("--set", action="append", default=[], help="fixed override for every point: section.key=value")
    p.add_argument("--fidelity", choices=["model", "emulation"], default="model")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", type=Path)
    p = sub.add_parser("calibrate", help="the scenario in both fidelities, side by side")
    p.add_argument("scenario", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--param", action="append", default=[])
    args = ap.parse_args(argv)
    missing = missing_sim_extra()
    if missing is not None:
        print(f"cocoon-sim needs the simulator's extra ({missing} is missing): pip install 'cocoon-p2p[sim]'",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        if args.command == "run":
            sc = load(args.scenario, args.param)
            out = args.out or Path("sim-out") / sc.name
            summary = _save(run_scenario(sc, args.fidelity), out)
            _print_summary(summary)
            print(f"wrote {out}/ (summary.json, CSVs, {len(summary['plots'])} plots)")
        elif args.command == "sweep":
            name = args.scenario.stem
            out = args.out or Path("sim-out") / f"{name}-sweep"
            procs = 1 if args.fidelity == "emulation" else args.processes
            sweep(args.scenario, args.param, args.fidelity, out, procs, args.set)
            print(f"wrote {out}/sweep.csv")
        else:
            out = args.out or Path("sim-out") / f"{args.scenario.stem}-calibration"
            report = calibrate(args.scenario, out, args.param)
            for row in report["comparison"]:
                print(f"{row['figure']:24} emulation {row['emulation']!s:>12.12} model {row['model']!s:>12.12} "
                      f"{'agree' if row['agree'] else 'DIFFER' if row['agree'] is False else 'n/a'}")  # fmt: skip
            print(f"wrote {out}/calibration.json")
    except ScenarioError as exc:
        print(f"cocoon-sim: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
