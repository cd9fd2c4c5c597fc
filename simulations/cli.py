"""``cocoon-sim``: run scenarios in virtual time (model) or with real nodes (emulation).

    cocoon-sim run SCENARIO [--fidelity model|emulation] [--out DIR] [--param key=value ...]
    cocoon-sim sweep SCENARIO --param key=v1,v2,... [--param ...] [--seeds K] [--out DIR]
        [--scheduler tcp://HOST:8786 | --workers N [--executor dask|process] | --processes N] [--fresh]
    cocoon-sim calibrate SCENARIO [--out DIR]    # the same scenario in both fidelities, side by side

Each run writes summary.json, CSVs (jobs, time series, lookups, workers) and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from cocoon_p2p import __version__

from .cluster import ClusterError, choose
from .results import CHEAT_FIGURES, KEY_FIGURES, Results, dumps
from .scenario import Scenario, ScenarioError, load
from .sweep import SweepSpec, execute, run_scenario, save_run

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


CALIBRATED = ("success", "latency_s_p50", "latency_s_p90", "latency_s_p99", "lookup_s_p50", "announce_visible_s_p50")


def calibrate(path: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    """The same scenario in both fidelities; where they differ by more than 25% (or 0.5
    points of success), the model is not to be trusted for that figure.

    The emulation runs first; the model's per-job worker time is then fitted to the
    emulation's median latency (less the scenario's round trip), so the median agrees
    by construction and the other figures are the test."""
    sc = load(path, overrides)
    report: dict[str, Any] = {"emulation": save_run(run_scenario(sc, "emulation"), out / "emulation")}
    job_s = max(1e-4, report["emulation"]["latency_s_p50"] - sc.network.rtt_ms_median / 1000)
    report["fitted"] = {"workers.job_s": job_s}
    sc = load(path, [*overrides, f"workers.job_s={job_s}"])
    report["model"] = save_run(run_scenario(sc, "model"), out / "model")
    rows = []
    for key in CALIBRATED:
        e, m = report["emulation"].get(key), report["model"].get(key)
        agree = None
        if isinstance(e, (int, float)) and isinstance(m, (int, float)) and not (math.isnan(e) or math.isnan(m)):
            agree = bool(abs(e - m) <= 0.005 if key == "success" else abs(e - m) <= 0.25 * max(abs(e), 1e-9))
        rows.append({"figure": key, "emulation": e, "model": m, "agree": agree})
    report["comparison"] = rows
    (out / "calibration.json").write_text(dumps(report))
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
    p = sub.add_parser("sweep", help="run a grid of parameter values (x seeds) in parallel, locally or on Dask")
    p.add_argument("scenario", type=Path)
    p.add_argument("--param", action="append", required=True, help="section.key=v1,v2,... (repeatable: a grid)")
    p.add_argument("--set", action="append", default=[], help="fixed override for every point: section.key=value")
    p.add_argument("--fidelity", choices=["model", "emulation"], default="model")
    p.add_argument("--seeds", type=int, default=1, help="replicates per grid point (mean and 95%% CI in sweep.csv)")
    p.add_argument("--scheduler", help="run the points on the Dask cluster at this address (tcp://HOST:8786)")
    p.add_argument("--workers", type=int, help="start a local Dask cluster of N worker processes")
    p.add_argument("--executor", choices=["auto", "dask", "process"], default="auto",
                   help="process: a local process pool (with --workers N: of N) instead of Dask")  # fmt: skip
    p.add_argument("--processes", type=int, help="a local process pool of N (the default: one per CPU)")
    p.add_argument("--fresh", action="store_true", help="run every point again (default: skip those done in --out)")
    p.add_argument("--no-point-plots", action="store_true", help="skip each point's own figures (faster)")
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
            summary = save_run(run_scenario(sc, args.fidelity), out)
            _print_summary(summary)
            print(f"wrote {out}/ (summary.json, CSVs, {len(summary['plots'])} plots)")
        elif args.command == "sweep":
            return _sweep(args)
        else:
            out = args.out or Path("sim-out") / f"{args.scenario.stem}-calibration"
            report = calibrate(args.scenario, out, args.param)
            for row in report["comparison"]:
                print(f"{row['figure']:24} emulation {row['emulation']!s:>12.12} model {row['model']!s:>12.12} "
                      f"{'agree' if row['agree'] else 'DIFFER' if row['agree'] is False else 'n/a'}")  # fmt: skip
            print(f"wrote {out}/calibration.json")
    except (ScenarioError, ClusterError) as exc:
        print(f"cocoon-sim: {exc}", file=sys.stderr)
        return 2
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """The sweep command: 0 when every point is done, 1 when some failed (the files are written either way)."""
    out = args.out or Path("sim-out") / f"{args.scenario.stem}-sweep"
    ex = choose(executor=args.executor, scheduler=args.scheduler, workers=args.workers, processes=args.processes)
    if args.fidelity == "emulation" and ex.scheduler is None:
        ex = replace(ex, workers=1)  # real nodes and a local chain each: one at a time on this machine
    spec = SweepSpec(scenario=args.scenario, grid=tuple(args.param), base=tuple(args.set), fidelity=args.fidelity,
                     seeds=args.seeds, plots=not args.no_point_plots)  # fmt: skip
    report = execute(spec, out, ex, fresh=args.fresh)
    failed = len(report.points) - len(report.records)
    print(f"wrote {out}/sweep.csv and summary.json: {len(report.records)} of {len(report.points)} points done "
          f"({report.computed} run now, {report.skipped} before)"
          + (f", {failed} FAILED (see {out}/points/*.error.json)" if failed else ""))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
