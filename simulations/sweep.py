"""Sweeps: a grid of scenario overrides times replicate seeds, on any executor, resumable.

The driver expands the grid into :class:`Point` objects (the scenario as parsed, its
overrides and seed applied, and a stable key), submits them to a
:class:`concurrent.futures.Executor` (a local process pool or a Dask cluster:
:mod:`.cluster`), and writes what comes back. A point runs where the executor puts it: it
writes its files into a temporary folder there and returns their contents
(:class:`PointOutcome`), so no filesystem is shared. For each point the driver writes the files
under ``out/<label>/seed-<seed>/`` first and then the record ``out/points/<key>.json``: a
record means complete files, and a re-run skips the points that have one. A point that raises
is recorded in ``out/points/<key>.error.json`` (and run again by the next run); the aggregates
(:func:`write_aggregates`) are written from the points that succeeded.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import itertools
import json
import os
import socket
import sys
import tempfile
import time
import tomllib
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cocoon_p2p import __version__

from .cluster import ExecutorSpec, open_executor
from .results import Estimate, PointStats, Results, dumps, figure, sweep_figures, write_sweep_csv
from .scenario import Scenario, ScenarioError, from_dict, override


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
    """One run of ``sc`` in ``fidelity`` (``model`` or ``emulation``)."""
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


def save_run(results: Results, out: Path, *, plots: bool = True) -> dict[str, Any]:
    """A run's files into ``out`` (its plots only with ``plots``); returns its summary."""
    summary = results.write(out)
    if plots:  # a fifth of a short run's time: experiments that draw their own figures skip them
        from . import plots as figures

        summary["plots"] = figures.write_all(results, out)
    else:
        summary["plots"] = []
    (out / "summary.json").write_text(dumps(summary))
    return summary


@dataclass(frozen=True, kw_only=True)
class Point:
    """One run of a sweep: a grid point (``label``, ``params``) and one of its replicates."""

    key: str  # stable over runs: what resume looks up (see point_key)
    label: str  # the grid overrides, as a folder name
    params: dict[str, str]  # every override of the point (fixed and grid) as given, seed excluded
    replicate: int  # 0 .. seeds - 1
    seed: Any  # the scenario's seed for this replicate
    data: dict[str, Any]  # the scenario as parsed, overrides and seed applied
    index: int  # its grid point's place in the grid's order


@dataclass(frozen=True, kw_only=True)
class PointOutcome:
    """What a point sends back to the driver: its summary and files, or its error."""

    key: str
    summary: dict[str, Any] | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # name -> zlib-compressed contents
    error: str | None = None
    traceback: str | None = None
    host: str = ""  # where it ran: host name and process id
    pid: int = 0
    version: str = ""  # of cocoon-p2p there
    wall_s: float = 0.0  # inside the point, from parsing the scenario to reading its files back


def derive_seed(base: Any, replicate: int) -> Any:
    """The seed of replicate ``replicate``: the scenario's own for the first, so one seed per
    point is the run it always was; the others drawn from a hash of it (not ``base + r``, which
    would collide with a sweep over ``seed`` itself)."""
    if replicate == 0:
        return base
    digest = hashlib.sha256(f"cocoon-sim/replicate/{base}/{replicate}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def point_key(data: dict[str, Any], fidelity: str) -> str:
    """A stable key for a point: a hash of the scenario it runs (the file's contents as parsed,
    with its overrides and seed) and the fidelity. A changed scenario file is a new point."""
    canonical = json.dumps({"scenario": data, "fidelity": fidelity}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def expand(path: Path, grid: Sequence[str], base: Sequence[str], fidelity: str, seeds: int) -> list[Point]:
    """Every point of ``grid`` (``key=v1,v2,...`` axes) over the ``base`` overrides, times
    ``seeds`` replicates, in the grid's order. Reads the scenario file here, on the driver."""
    if seeds < 1:
        raise ScenarioError(f"--seeds must be at least 1, not {seeds}")
    try:
        parsed = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"cannot read {path}: {exc}") from exc
    parsed.setdefault("name", Path(path).stem)
    axes = []
    for g in grid:
        key, sep, values = g.partition("=")
        if not sep or not values:
            raise ScenarioError(f"--param {g!r} is not section.key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    points = []
    for index, combo in enumerate(itertools.product(*axes)):
        overrides = [*base, *combo]
        data = copy.deepcopy(parsed)
        for item in overrides:
            override(data, item)  # a bad value fails when the point runs, and is recorded there
        label = "_".join(o.replace("=", "-") for o in combo).replace(os.sep, "-") or "point"
        params = dict(o.split("=", 1) for o in overrides)
        for r in range(seeds):
            d = copy.deepcopy(data)
            d["seed"] = derive_seed(data.get("seed", Scenario.seed), r)
            points.append(Point(key=point_key(d, fidelity), label=label, params=params, replicate=r,
                                seed=d["seed"], data=d, index=index))  # fmt: skip
    return points


def run_point(point: Point, fidelity: str, plots: bool) -> PointOutcome:
    """Run one point (in a worker: a pool's process or a Dask worker) and return its files.

    Any exception of the run is caught and returned as the point's error, with its traceback."""
    t0 = time.perf_counter()
    host, pid = socket.gethostname(), os.getpid()
    try:
        sc = from_dict(copy.deepcopy(point.data))
        with tempfile.TemporaryDirectory(prefix="cocoon-sweep-") as tmp:
            summary = save_run(run_scenario(sc, fidelity, show_progress=False), Path(tmp), plots=plots)
            files = {p.name: zlib.compress(p.read_bytes(), 1) for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    except Exception as exc:  # the point's failure is its result: recorded, and the sweep goes on
        return PointOutcome(key=point.key, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                            wall_s=time.perf_counter() - t0, version=__version__, host=host, pid=pid)  # fmt: skip
    return PointOutcome(key=point.key, summary=summary, files=files, wall_s=time.perf_counter() - t0,
                        version=__version__, host=host, pid=pid)  # fmt: skip


@dataclass
class SweepReport:
    """What a sweep did: its runs (done now or before), failures, and counts for this run."""

    points: list[Point]
    records: dict[str, dict[str, Any]]  # key -> the point's record (points/<key>.json), succeeded points
    failures: dict[str, dict[str, Any]]  # key -> the error record of points that failed in this run
    computed: int = 0  # points run by this invocation (succeeded or failed)
    skipped: int = 0  # points already done by an earlier run
    points_wall_s: float = 0.0  # the computed points' own time, summed (the rest is the sweep's overhead)
    wall_s: float = 0.0
    executor: str = ""

    @property
    def runs(self) -> list[dict[str, Any]]:
        """Each succeeded run's summary, with ``params``, ``replicate`` and ``key``, in grid order."""
        done = [p for p in self.points if p.key in self.records]
        return [{**self.records[p.key]["summary"], "params": p.params, "replicate": p.replicate, "key": p.key}
                for p in sorted(done, key=lambda p: (p.index, p.replicate))]  # fmt: skip


class _Store:
    """The driver's side of ``out``: point files and records, written so that a record is last."""

    def __init__(self, out: Path) -> None:
        self.out, self.dir = out, out / "points"
        self.dir.mkdir(parents=True, exist_ok=True)

    def record(self, key: str) -> dict[str, Any] | None:
        try:
            rec: dict[str, Any] = json.loads((self.dir / f"{key}.json").read_text())
        except (OSError, ValueError):  # absent, or cut short by a crash: run it again
            return None
        return rec if rec.get("key") == key and isinstance(rec.get("summary"), dict) else None

    def save(self, point: Point, fidelity: str, res: PointOutcome) -> dict[str, Any]:
        assert res.summary is not None
        folder = self.out / point.label / f"seed-{point.seed}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, blob in res.files.items():
            (folder / Path(name).name).write_bytes(zlib.decompress(blob))
        rec = {**self._head(point, fidelity, res), "folder": str(folder.relative_to(self.out)),
               "files": sorted(res.files), "summary": json.loads(dumps(res.summary))}  # fmt: skip
        self._write(f"{point.key}.json", rec)
        (self.dir / f"{point.key}.error.json").unlink(missing_ok=True)
        return rec

    def fail(self, point: Point, fidelity: str, res: PointOutcome) -> dict[str, Any]:
        rec = {**self._head(point, fidelity, res), "error": res.error, "traceback": res.traceback}
        (self.dir / f"{point.key}.json").unlink(missing_ok=True)  # a --fresh run's failure replaces a success
        self._write(f"{point.key}.error.json", rec)
        return rec

    @staticmethod
    def _head(point: Point, fidelity: str, res: PointOutcome) -> dict[str, Any]:
        return {"key": point.key, "label": point.label, "params": point.params, "replicate": point.replicate,
                "seed": point.seed, "fidelity": fidelity, "host": res.host, "pid": res.pid, "version": res.version,
                "point_wall_s": res.wall_s}  # fmt: skip

    def _write(self, name: str, rec: dict[str, Any]) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(dumps(rec))
        os.replace(tmp, self.dir / name)  # atomic: a record is whole or absent


def run_sweep(
    points: list[Point],
    out: Path,
    executor: ExecutorSpec | concurrent.futures.Executor,
    *,
    fidelity: str = "model",
    plots: bool = True,
    fresh: bool = False,
    log: TextIO | None = None,
) -> SweepReport:
    """Run the points not done yet (all with ``fresh``) on ``executor`` and record them under
    ``out``. An :class:`ExecutorSpec` is started only if a point is left to run; an executor
    given open is used and left open. Progress goes to ``log`` (stderr by default)."""
    log = log or sys.stderr
    t0 = time.perf_counter()
    store = _Store(out)
    records = {} if fresh else {p.key: r for p in points if (r := store.record(p.key)) is not None}
    todo = [p for p in points if p.key not in records]
    desc = executor.describe() if isinstance(executor, ExecutorSpec) else type(executor).__name__
    report = SweepReport(points=points, records=records, failures={}, skipped=len(records), executor=desc)
    print(f"sweep: {len(points)} point{'s' if len(points) != 1 else ''}, {len(records)} already done, "
          f"{len(todo)} to run"
          + (f" on {desc}" if todo else ""), file=log, flush=True)  # fmt: skip
    if todo:
        if isinstance(executor, ExecutorSpec):
            with open_executor(executor) as ex:
                _run(todo, ex, store, report, fidelity, plots, log)
        else:
            _run(todo, executor, store, report, fidelity, plots, log)
    report.wall_s = time.perf_counter() - t0
    return report


def _run(todo: list[Point], ex: concurrent.futures.Executor, store: _Store, report: SweepReport, fidelity: str,
         plots: bool, log: TextIO) -> None:  # fmt: skip
    futures = {ex.submit(run_point, p, fidelity, plots): p for p in todo}
    total = len(report.points)
    try:
        for fut in concurrent.futures.as_completed(futures):
            p = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # the executor's failure (a worker died, a lost connection): the point's
                res = PointOutcome(key=p.key, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            report.computed += 1
            report.points_wall_s += res.wall_s
            if res.summary is not None:
                rec = report.records[p.key] = store.save(p, fidelity, res)
                s = rec["summary"]
                what = f"success {_fmt(s.get('success'))}, p99 {_fmt(s.get('latency_s_p99'))} s"
                if res.version != __version__:
                    what += f" (worker runs cocoon-p2p {res.version}, this driver {__version__})"
            else:
                report.failures[p.key] = store.fail(p, fidelity, res)
                what = f"FAILED {res.error}"
            print(f"[{report.computed}/{len(todo)}] {p.label} seed={p.seed}: {what} | done "
                  f"{len(report.records)}/{total}, failed {len(report.failures)}", file=log, flush=True)  # fmt: skip
    except BaseException:  # interrupted: what is recorded stays recorded; stop the rest
        for f in futures:
            f.cancel()
        raise


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else "n/a"


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    """A sweep as the command line gives it."""

    scenario: Path
    grid: tuple[str, ...]  # section.key=v1,v2,... axes
    base: tuple[str, ...] = ()  # section.key=value for every point
    fidelity: str = "model"
    seeds: int = 1  # replicates per grid point
    plots: bool = True  # each point's own figures (the sweep's are always drawn)


def execute(
    spec: SweepSpec,
    out: Path,
    executor: ExecutorSpec | concurrent.futures.Executor,
    *,
    fresh: bool = False,
    log: TextIO | None = None,
) -> SweepReport:
    """Expand, run (what is not done yet) and write the aggregates: ``sweep.csv``, ``sweep.json``
    (each run's summary), ``summary.json`` (strict JSON) and ``sweep_*.png`` under ``out``."""
    points = expand(spec.scenario, spec.grid, spec.base, spec.fidelity, spec.seeds)
    report = run_sweep(points, out, executor, fidelity=spec.fidelity, plots=spec.plots, fresh=fresh, log=log)
    write_aggregates(report, out, spec)
    return report


def aggregate(report: SweepReport) -> list[PointStats]:
    """Each grid point's figures over the replicates that succeeded, in the grid's order."""
    names = sweep_figures(report.runs)
    groups: dict[int, list[Point]] = {}
    for p in report.points:
        groups.setdefault(p.index, []).append(p)
    stats = []
    for pts in groups.values():
        ok = [report.records[p.key]["summary"] for p in pts if p.key in report.records]
        figures = {n: Estimate.of([figure(s, n) for s in ok]) for n in names}
        stats.append(PointStats(pts[0].label, pts[0].params, len(ok), len(pts) - len(ok), figures))
    return stats


def write_aggregates(report: SweepReport, out: Path, spec: SweepSpec) -> dict[str, Any]:
    """The sweep's own files, from the points that succeeded; returns its summary."""
    runs, stats = report.runs, aggregate(report)
    names = sweep_figures(runs)
    out.mkdir(parents=True, exist_ok=True)
    write_sweep_csv(out / "sweep.csv", stats, names)
    (out / "sweep.json").write_text(dumps(runs))
    # The grid's axes in the order given (those with more than one value are worth a plot).
    values: dict[str, list[str]] = {g.partition("=")[0]: [] for g in spec.grid}
    for st in stats:
        for k, vs in values.items():
            if st.params[k] not in vs:
                vs.append(st.params[k])
    axes = [(k, vs) for k, vs in values.items() if len(vs) > 1]
    from . import plots as figures

    drawn = figures.sweep_intervals(stats, axes, names, out, seeds=spec.seeds) if runs else []
    failed = [p for p in report.points if p.key not in report.records]
    table = [{"label": st.label, "params": st.params, "replicates": st.replicates, "failed": st.failed,
              "figures": {n: {"mean": e.mean, "ci95_lo": e.lo, "ci95_hi": e.hi, "n": e.n}
                          for n, e in st.figures.items()}} for st in stats]  # fmt: skip
    failures = [{k: report.failures[p.key].get(k) for k in ("key", "label", "params", "seed", "error")}
                for p in failed if p.key in report.failures]  # fmt: skip
    summary = {
        "scenario": report.points[0].data.get("name") if report.points else spec.scenario.stem,
        "fidelity": spec.fidelity,
        "grid": values,
        "fixed": dict(o.split("=", 1) for o in spec.base),
        "seeds": spec.seeds,
        "points": len(report.points),
        "done": len(report.records),
        "failed": len(failed),
        "computed_now": report.computed,
        "skipped_done_before": report.skipped,
        "executor": report.executor,
        "wall_s": report.wall_s,
        "points_wall_s": report.points_wall_s,
        "figures": table,
        "failures": failures,
        "plots": drawn,
    }
    (out / "summary.json").write_text(dumps(summary))
    return summary


def sweep(
    path: Path, grid: list[str], fidelity: str, out: Path, processes: int, base: list[str], *, plots: bool = True
) -> list[dict[str, Any]]:
    """Every point of ``grid`` over ``base``, all run again (no resume: the experiments re-run
    what they report) in a pool of ``processes``; returns each run's summary, in grid order."""
    spec = SweepSpec(scenario=path, grid=tuple(grid), base=tuple(base), fidelity=fidelity, plots=plots)
    report = execute(spec, out, ExecutorSpec(workers=processes), fresh=True)
    if report.failures:
        first = next(iter(report.failures.values()))
        raise ScenarioError(f"{len(report.failures)} sweep points failed; first: {first['label']}: {first['error']}")
    return report.runs
