"""Sweeps on a Dask cluster (issue 22): a real ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1, the same numbers as the local process pool, replicates with 95%
intervals, a point that fails recorded while the aggregates are still written, resume,
strict JSON. And the pure parts: the executor the options choose, the interval, the table."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cocoon_p2p.simulations import cli
from cocoon_p2p.simulations.cluster import ClusterError, ExecutorKind, ExecutorSpec, choose
from cocoon_p2p.simulations.results import Estimate, PointStats, write_sweep_csv
from cocoon_p2p.simulations.sweep import derive_seed, expand

SCENARIOS = Path(__file__).resolve().parent.parent / "simulations" / "scenarios"
DASK = Path(sys.executable).parent / "dask"
GRID = ["--param", "routing.rule=cocoon,random,fastest", "--set", "duration_s=20", "--seeds", "2"]  # fastest: refused


def _raise(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def strict(path: Path) -> Any:
    return json.loads(path.read_text(), parse_constant=_raise)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Dask scheduler and two single-threaded workers, each a process of its own (a group,
    so a nanny's child goes too); every one of them is stopped at the end, whatever happened."""
    if not DASK.exists():
        pytest.skip("dask.distributed is not installed (the [sim] extra)")
    tmp = tmp_path_factory.mktemp("dask")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, log: str) -> None:
        with (tmp / log).open("wb") as f:
            procs.append(subprocess.Popen([str(DASK), *args], stdout=f, stderr=subprocess.STDOUT, cwd=tmp,
                                          start_new_session=True))  # fmt: skip

    try:
        info = tmp / "scheduler.json"
        start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(info), log="scheduler.log")  # fmt: skip
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text().strip():
            assert procs[0].poll() is None and time.monotonic() < deadline, (tmp / "scheduler.log").read_text()
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        for i in range(2):
            start("worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                  "--local-directory", str(tmp / f"w{i}"), log=f"worker{i}.log")  # fmt: skip
        from distributed import Client

        with Client(address, timeout=30) as client:  # both workers in, so both can take points
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def records(out: Path) -> dict[str, dict[str, Any]]:
    return {p.name.removesuffix(".json"): strict(p) for p in (out / "points").glob("*.json")
            if not p.name.endswith(".error.json")}  # fmt: skip


def rows(out: Path) -> list[dict[str, str]]:
    with (out / "sweep.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_sweep_on_a_dask_cluster_matches_the_process_pool_records_failures_and_resumes(
    scheduler: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    on_dask, on_pool = tmp_path / "dask", tmp_path / "pool"
    scenario = str(SCENARIOS / "small.toml")
    assert cli.main(["sweep", scenario, *GRID, "--scheduler", scheduler, "--out", str(on_dask)]) == 1  # 2 failed
    assert "6 to run on the Dask cluster at tcp://127.0.0.1:" in capsys.readouterr().err
    assert cli.main(["sweep", scenario, *GRID, "--processes", "2", "--no-point-plots", "--out", str(on_pool)]) == 1

    # The same points (same keys: scenario, overrides, seed), the same numbers and files.
    dask_recs, pool_recs = records(on_dask), records(on_pool)
    assert sorted(dask_recs) == sorted(pool_recs) and len(dask_recs) == 4
    for key, rec in dask_recs.items():
        other = pool_recs[key]
        drop = ("wall_s", "plots")
        assert {k: v for k, v in rec["summary"].items() if k not in drop} == {
            k: v for k, v in other["summary"].items() if k not in drop
        }
        for name in ("jobs.csv", "timeseries.csv", "workers.csv", "lookups.csv"):
            assert (on_dask / rec["folder"] / name).read_bytes() == (on_pool / other["folder"] / name).read_bytes()
        assert (on_dask / rec["folder"] / "latency_cdf.png").read_bytes().startswith(b"\x89PNG")  # sent back too
    pids = {r["pid"] for r in dask_recs.values()}
    assert len(pids) == 2 and os.getpid() not in pids  # both worker processes ran points, the driver none
    assert {r["seed"] for r in dask_recs.values()} == {7, derive_seed(7, 1)}

    # Replicates: mean and 95% interval per figure; the refused rule's row has no figures, only failures.
    for out in (on_dask, on_pool):
        table = {r["routing.rule"]: r for r in rows(out)}
        assert list(table) == ["cocoon", "random", "fastest"]
        for rule in ("cocoon", "random"):
            r = table[rule]
            assert (r["replicates"], r["failed"]) == ("2", "0")
            assert float(r["jobs_issued_ci95_lo"]) <= float(r["jobs_issued"]) <= float(r["jobs_issued_ci95_hi"])
            assert r["success_ci95_lo"] != "" and r["latency_s_p99_ci95_hi"] != ""
        assert (table["fastest"]["replicates"], table["fastest"]["failed"]) == ("0", "2")
        assert table["fastest"]["success"] == table["fastest"]["success_ci95_lo"] == ""
        errors = [strict(p) for p in (out / "points").glob("*.error.json")]
        assert len(errors) == 2 and all("routing.rule must be" in e["error"] for e in errors)
        assert all("ScenarioError" in e["traceback"] for e in errors)
        summary = strict(out / "summary.json")  # NaN (the failed point's figures) written as null
        assert (summary["points"], summary["done"], summary["failed"], len(summary["failures"])) == (6, 4, 2, 2)
        assert summary["grid"] == {"routing.rule": ["cocoon", "random", "fastest"]}
        assert summary["figures"][2]["figures"]["success"]["mean"] is None
        assert "sweep_success.png" in summary["plots"] and (out / "sweep_latency_s_p99.png").stat().st_size > 0
        for rec in records(out).values():
            strict(out / rec["folder"] / "summary.json")

    # Resume: the points done are skipped (their records untouched), the failed ones run again.
    before = {p: p.stat().st_mtime_ns for p in (on_dask / "points").glob("*.json") if ".error" not in p.name}
    assert cli.main(["sweep", scenario, *GRID, "--scheduler", scheduler, "--out", str(on_dask)]) == 1
    assert "6 points, 4 already done, 2 to run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert strict(on_dask / "summary.json")["computed_now"] == 2
    # Without the failing value nothing is left to run: no point computed, no cluster contacted.
    ok_grid = ["--param", "routing.rule=cocoon,random", "--set", "duration_s=20", "--seeds", "2"]
    assert cli.main(["sweep", scenario, *ok_grid, "--scheduler", "tcp://127.0.0.1:1", "--out", str(on_dask)]) == 0
    assert "4 points, 4 already done, 0 to run" in capsys.readouterr().err
    assert strict(on_dask / "summary.json")["computed_now"] == 0 and len(rows(on_dask)) == 2


@pytest.mark.slow
def test_a_local_dask_cluster_from_workers(tmp_path: Path) -> None:
    out = tmp_path / "local"
    args = ["sweep", str(SCENARIOS / "small.toml"), "--param", "routing.choices=2,3", "--set", "duration_s=15",
            "--workers", "2", "--no-point-plots", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    summary = strict(out / "summary.json")
    assert summary["executor"] == "a local Dask cluster of 2 worker processes" and summary["done"] == 2
    table = rows(out)
    assert [r["routing.choices"] for r in table] == ["2", "3"]
    assert all(r["replicates"] == "1" and r["success"] != "" and r["success_ci95_lo"] == "" for r in table)  # K=1


CHOICES = [  # (options, executor chosen)
    ({}, ExecutorSpec(kind=ExecutorKind.PROCESS)),
    ({"processes": 3}, ExecutorSpec(kind=ExecutorKind.PROCESS, workers=3)),
    ({"workers": 4}, ExecutorSpec(kind=ExecutorKind.DASK, workers=4)),
    ({"workers": 4, "executor": "process"}, ExecutorSpec(kind=ExecutorKind.PROCESS, workers=4)),
    ({"executor": "dask"}, ExecutorSpec(kind=ExecutorKind.DASK)),
    ({"scheduler": "tcp://h:8786"}, ExecutorSpec(kind=ExecutorKind.DASK, scheduler="tcp://h:8786")),
    ({"scheduler": "tcp://h:8786", "executor": "dask"}, ExecutorSpec(kind=ExecutorKind.DASK, scheduler="tcp://h:8786")),
]
REFUSED = [
    {"scheduler": "tcp://h:8786", "workers": 2},
    {"scheduler": "tcp://h:8786", "executor": "process"},
    {"scheduler": "tcp://h:8786", "processes": 2},
    {"processes": 2, "executor": "dask"},
    {"processes": 2, "workers": 2},
    {"workers": 0},
    {"executor": "threads"},
]


@pytest.mark.parametrize(("options", "spec"), CHOICES)
def test_the_options_choose_the_executor(options: dict[str, Any], spec: ExecutorSpec) -> None:
    assert choose(**options) == spec


@pytest.mark.parametrize("options", REFUSED)
def test_conflicting_executor_options_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(ClusterError):
        choose(**options)


T_2 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom


@pytest.mark.parametrize(
    ("values", "mean", "lo", "hi", "n"),
    [
        ([], math.nan, math.nan, math.nan, 0),
        ([math.nan], math.nan, math.nan, math.nan, 0),  # nothing measured is not a value
        ([2.5], 2.5, math.nan, math.nan, 1),  # one seed: no interval
        ([1.0, 2.0, 3.0], 2.0, 2.0 - T_2 / math.sqrt(3), 2.0 + T_2 / math.sqrt(3), 3),
        ([1.0, math.nan, 2.0, 3.0], 2.0, 2.0 - T_2 / math.sqrt(3), 2.0 + T_2 / math.sqrt(3), 3),
        ([4.0, 4.0], 4.0, 4.0, 4.0, 2),
    ],
)
def test_estimate_is_a_mean_with_a_t_interval(values: list[float], mean: float, lo: float, hi: float, n: int) -> None:
    e = Estimate.of(values)
    assert e.n == n
    for got, want in ((e.mean, mean), (e.lo, lo), (e.hi, hi)):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_one_seed_leaves_the_interval_cells_empty(tmp_path: Path) -> None:
    stats = [PointStats("a-1", {"a": "1"}, 1, 0, {"success": Estimate.of([0.99])}),
             PointStats("a-2", {"a": "2"}, 0, 1, {"success": Estimate.of([])})]  # fmt: skip
    write_sweep_csv(tmp_path / "sweep.csv", stats, ["success"])
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines == ["a,replicates,failed,success,success_ci95_lo,success_ci95_hi", "1,1,0,0.99,,", "2,0,1,,,"]


def test_points_and_replicate_seeds_are_stable(tmp_path: Path) -> None:
    grid, base = ["routing.rule=cocoon,random", "seed=3,4"], ["duration_s=20"]
    a = expand(SCENARIOS / "small.toml", grid, base, "model", 3)
    b = expand(SCENARIOS / "small.toml", grid, base, "model", 3)
    assert [p.key for p in a] == [p.key for p in b] and len({p.key for p in a}) == 12
    assert [p.seed for p in a[:3]] == [3, derive_seed(3, 1), derive_seed(3, 2)] and a[0].seed == 3
    assert len({p.seed for p in a}) == 6  # seed=3 and seed=4 replicates never collide
    assert expand(SCENARIOS / "small.toml", grid, base, "emulation", 3)[0].key != a[0].key
    changed = tmp_path / "small.toml"
    changed.write_text((SCENARIOS / "small.toml").read_text().replace("rate_per_s = 5", "rate_per_s = 6"))
    assert expand(changed, grid, base, "model", 3)[0].key != a[0].key  # an edited scenario is a new point
