"""What a run measured, in one shape for both fidelities: jobs, lookups, samples, money.

:meth:`Results.summary` gives the figures; :meth:`Results.write` saves
``summary.json``, ``jobs.csv``, ``timeseries.csv``, ``lookups.csv`` and
``workers.csv`` into an output folder. :func:`strict_json` is what every JSON file of the
simulator goes through (no bare NaN); :class:`Estimate` is a mean with its 95% confidence
interval over a sweep point's replicates.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cocoon_p2p.core.metrics import percentile

from .scenario import Scenario
from .spotchecks import Verdict
from .tee import NO_ATTESTED_WORKERS

# A sample's announcement reach: the share of online peers a worker's announcement reached by each of these
# seconds after it was published.
COVERAGE_AT_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


@dataclass
class JobRecord:
    issued: float
    client: int
    counted: bool  # issued after the warm-up
    ok: bool = False
    latency_s: float = math.nan
    attempts: int = 0
    worker: int = -1
    cost: int = 0
    code: str = ""
    tee: bool = False  # its client required an attested worker
    verdict: Verdict = Verdict.UNCHECKED  # a spot check's (issue 18)
    wrong: bool = False  # a wrong result its caller took as right (unchecked, or passed by a lying verifier)


@dataclass
class Results:
    scenario: Scenario
    fidelity: str = "model"
    jobs: list[JobRecord] = field(default_factory=list)
    lookups: list[dict[str, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    money: dict[str, int] = field(default_factory=dict)
    onchain_ops: int = 0
    channels_opened: int = 0
    channels_closed: int = 0
    mesh_recomputes: int = 0
    attestation_ask_s: list[float] = field(default_factory=list)  # each evidence ask: its cost to the job
    cheat: dict[str, Any] = field(default_factory=dict)  # wrong results, checks and bans (.cheating)
    events: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def add_job(self, rec: JobRecord) -> None:
        self.jobs.append(rec)

    def add_lookup(self, res: Any, peers: int) -> None:
        self.lookups.append(
            {"time_s": res.time_s, "hops": res.hops, "messages": res.messages, "timeouts": res.timeouts,
             "found": len(res.records), "peers": peers}
        )  # fmt: skip

    def add_sample(self, t: float, online_workers: int, running: int, coverage: list[float] | None) -> None:
        self.samples.append({"t": t, "online_workers": online_workers, "jobs_running": running, "coverage": coverage})

    def timeseries(self) -> list[dict[str, Any]]:
        """Per sample interval: workers online, jobs running, and the jobs issued in it (ended, success, p50)."""
        step = self.scenario.sample_s
        buckets: dict[int, list[JobRecord]] = {}
        for j in self.jobs:
            if j.code != "client-left":
                buckets.setdefault(int(j.issued // step), []).append(j)
        rows = []
        for s in self.samples:
            jobs = buckets.get(int(s["t"] // step) - 1, [])
            ok = [j.latency_s for j in jobs if j.ok]
            rows.append(
                {"t": s["t"], "online_workers": s["online_workers"], "jobs_running": s["jobs_running"],
                 "jobs_issued": len(jobs), "success": len(ok) / len(jobs) if jobs else math.nan,
                 "latency_p50_s": percentile(ok, 50)}
            )  # fmt: skip
        return rows

    def summary(self) -> dict[str, Any]:
        counted = [j for j in self.jobs if j.counted]
        ok = [j for j in counted if j.ok]
        ended = [j for j in counted if j.code not in ("client-left", "unfinished")]  # abandoned, or cut by the end
        lat = [j.latency_s for j in ok]
        codes: dict[str, int] = {}
        for j in counted:
            if not j.ok:
                codes[j.code] = codes.get(j.code, 0) + 1
        jobs_total = len(self.jobs)
        out: dict[str, Any] = {
            "scenario": self.scenario.name,
            "fidelity": self.fidelity,
            "seed": self.scenario.seed,
            "peers": self.scenario.peers,
            "duration_s": self.scenario.duration_s,
            "jobs_issued": jobs_total,
            "jobs_ok": sum(1 for j in self.jobs if j.ok),
            "jobs_failed": sum(1 for j in self.jobs if not j.ok and j.code not in ("client-left", "unfinished")),
            "jobs_abandoned": sum(1 for j in self.jobs if j.code == "client-left"),
            "jobs_unfinished": sum(1 for j in self.jobs if j.code == "unfinished"),
            "counted_jobs": len(counted),
            "success": len(ok) / len(ended) if ended else math.nan,
            "failures_by_code": codes,
            "latency_s_p50": percentile(lat, 50),
            "latency_s_p90": percentile(lat, 90),
            "latency_s_p99": percentile(lat, 99),
            "latency_s_mean": sum(lat) / len(lat) if lat else math.nan,
            "attempts_mean": sum(j.attempts for j in ok) / len(ok) if ok else math.nan,
            "lookups": len(self.lookups),
            "lookup_s_p50": percentile([x["time_s"] for x in self.lookups], 50),
            "lookup_s_p99": percentile([x["time_s"] for x in self.lookups], 99),
            "lookup_hops_mean": (sum(x["hops"] for x in self.lookups) / len(self.lookups))
            if self.lookups
            else math.nan,
            "lookup_messages_mean": (sum(x["messages"] for x in self.lookups) / len(self.lookups))
            if self.lookups
            else math.nan,
            "onchain_ops": self.onchain_ops,
            "channels_opened": self.channels_opened,
            "channels_closed": self.channels_closed,
            "onchain_ops_per_10k_jobs": self.onchain_ops * 10_000 / max(1, len([j for j in self.jobs if j.ok])),
            "money": self.money,
            "events": self.events,
            "wall_s": self.wall_s,
        }
        cov = [s["coverage"] for s in self.samples if s["coverage"]]
        if cov:
            out["announcement_coverage"] = {
                f"{t}s": sum(c[i] for c in cov) / len(cov) for i, t in enumerate(COVERAGE_AT_S)
            }
        if self.scenario.tee.in_use:
            out["tee"] = {
                "requiring": _group([j for j in counted if j.tee]),
                "other": _group([j for j in counted if not j.tee]),
                "no_attested_workers_failures": codes.get(NO_ATTESTED_WORKERS, 0),
                "attestation_asks": len(self.attestation_ask_s),
                "ask_s_p50": percentile(self.attestation_ask_s, 50),
                "ask_s_p99": percentile(self.attestation_ask_s, 99),
            }
        if self.scenario.cheat.in_use:
            out["cheat"] = self.cheat
        out.update(self.extra)
        return out

    def write(self, out: Path) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        (out / "summary.json").write_text(dumps(summary))
        (out / "scenario.json").write_text(json.dumps(self.scenario.to_dict(), indent=2) + "\n")
        _csv(out / "jobs.csv", [asdict(j) for j in self.jobs])
        _csv(out / "lookups.csv", self.lookups)
        _csv(out / "workers.csv", self.workers)
        _csv(out / "timeseries.csv", self.timeseries())
        return summary


def _group(jobs: list[JobRecord]) -> dict[str, Any]:
    """Success and latency of some counted jobs (abandoned and unfinished ones left out of success)."""
    ended = [j for j in jobs if j.code not in ("client-left", "unfinished")]
    lat = [j.latency_s for j in jobs if j.ok]
    return {
        "jobs": len(jobs),
        "success": len(lat) / len(ended) if ended else math.nan,
        "latency_s_p50": percentile(lat, 50),
        "latency_s_p99": percentile(lat, 99),
    }


def _csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinity (no job to measure, never detected) as None, so the
    JSON written is strict (``json.dumps`` would write bare ``NaN``, which most parsers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict, indented JSON (NaN and infinities as null; unknown objects as their str) and a newline."""
    return json.dumps(strict_json(value), indent=2, default=str, allow_nan=False) + "\n"


@dataclass(frozen=True)
class Estimate:
    """A figure over replicates: mean and 95% confidence interval (Student's t, n - 1 degrees of
    freedom). ``lo`` and ``hi`` are NaN below two values, every field NaN (``n`` 0) with none."""

    mean: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Estimate:
        """The estimate over ``values`` (only the finite ones count: NaN means "nothing measured")."""
        xs = [float(v) for v in values if math.isfinite(v)]
        n = len(xs)
        if n == 0:
            return cls(math.nan, math.nan, math.nan, 0)
        mean = sum(xs) / n
        if n == 1:
            return cls(mean, math.nan, math.nan, 1)
        from scipy.stats import t  # the [sim] extra, imported on first use as the model's numerics

        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        return cls(mean, mean - half, mean + half, n)


KEY_FIGURES = ("jobs_issued", "success", "latency_s_p50", "latency_s_p99", "attempts_mean", "lookup_s_p50",
               "lookup_hops_mean", "onchain_ops", "onchain_ops_per_10k_jobs", "wall_s")  # fmt: skip

# With a [cheat] section in use: the figures of its block that a run prints and a sweep tabulates.
CHEAT_FIGURES = ("cheaters", "cheaters_detected", "wrong_delivered", "wrong_caught", "wrong_paid_share",
                 "jobs_to_detection_p50", "jobs_to_detection_p90", "network_ban_s_max", "checks",
                 "added_compute_share", "false_alarms")  # fmt: skip


@dataclass(frozen=True)
class PointStats:
    """A sweep's grid point over its replicates: each figure's :class:`Estimate`."""

    label: str
    params: dict[str, str]
    replicates: int  # runs that succeeded
    failed: int  # runs that failed
    figures: dict[str, Estimate]  # "success", "cheat.checks", ...


def sweep_figures(runs: Sequence[dict[str, Any]]) -> tuple[str, ...]:
    """The figures a sweep tabulates: the key figures, and the cheat block's where one is in use."""
    cheat = CHEAT_FIGURES if any("cheat" in s for s in runs) else ()
    return (*KEY_FIGURES, *(f"cheat.{k}" for k in cheat))


def figure(summary: dict[str, Any], name: str) -> float:
    """A figure of a run's summary by its sweep name (``cheat.x``: in the cheat block); NaN when
    it has none (absent, null, or not a number)."""
    v = summary.get("cheat", {}).get(name[6:]) if name.startswith("cheat.") else summary.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def write_sweep_csv(path: Path, stats: Sequence[PointStats], names: Sequence[str]) -> None:
    """One row per grid point: its parameters, replicates and failures, then each figure's
    mean and 95% interval (``X``, ``X_ci95_lo``, ``X_ci95_hi``; empty where undefined)."""
    keys = sorted(stats[0].params) if stats else []
    cols = [c for n in names for c in (n, f"{n}_ci95_lo", f"{n}_ci95_hi")]

    def cell(v: float) -> str | float:
        return "" if math.isnan(v) else v

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*keys, "replicates", "failed", *cols])
        for st in stats:
            vals = [cell(x) for n in names for x in (st.figures[n].mean, st.figures[n].lo, st.figures[n].hi)]
            w.writerow([st.params[k] for k in keys] + [st.replicates, st.failed] + vals)
