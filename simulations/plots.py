"""PNG figures of a run (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import Results  # noqa: E402

COVERAGE_AT_S = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def latency_cdf(runs: dict[str, Results], path: Path) -> None:
    """Job latency CDFs of one or several runs (labels: the legend)."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, r in runs.items():
        lat = sorted(j.latency_s for j in r.jobs if j.ok and j.counted)
        if lat:
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("job latency (s)")
    ax.set_ylabel("share of jobs")
    ax.set_title("Job latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save(fig, path)


def write_all(r: Results, out: Path) -> list[str]:
    """Every figure of one run into ``out``; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    latency_cdf({r.scenario.name: r}, out / "latency_cdf.png")
    names.append("latency_cdf.png")

    if r.workers:
        ws = sorted(r.workers, key=lambda w: (-w["speed"], w["idx"]))
        for key, name, label in (("jobs", "worker_load.png", "jobs served"),
                                 ("earned_nanoton", "earnings.png", "earned (nanoton)")):  # fmt: skip
            fig, ax = plt.subplots(figsize=(6.4, 4))
            colors = ["tab:red" if w["behaviour"] != "honest" or w.get("cheats") else "tab:blue" for w in ws]
            ax.bar(range(len(ws)), [w[key] for w in ws], color=colors, width=1.0)
            ax.set_xlabel("worker (fastest first; red: adversarial)")
            ax.set_ylabel(label)
            ax.set_title(f"Per-worker {label}")
            _save(fig, out / name)
            names.append(name)

    if r.lookups:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.6))
        hops = [int(x["hops"]) for x in r.lookups]
        a1.hist(hops, bins=range(0, max(hops) + 2), align="left", rwidth=0.8)
        a1.set_xlabel("lookup hops")
        a1.set_ylabel("lookups")
        a2.hist([x["time_s"] for x in r.lookups], bins=40)
        a2.set_xlabel("lookup time (s)")
        fig.suptitle("DHT lookups")
        _save(fig, out / "lookups.png")
        names.append("lookups.png")

    cov = [s["coverage"] for s in r.samples if s.get("coverage")]
    if cov:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        mean = [sum(c[i] for c in cov) / len(cov) for i in range(len(COVERAGE_AT_S))]
        ax.plot(COVERAGE_AT_S, mean, marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("time since an announcement was published (s)")
        ax.set_ylabel("share of online peers reached")
        ax.set_ylim(0, 1.05)
        ax.set_title("Announcement coverage")
        ax.grid(True, alpha=0.3)
        _save(fig, out / "coverage.png")
        names.append("coverage.png")

    ts = r.timeseries()
    if ts:
        fig, ax = plt.subplots(figsize=(6.4, 4))
        t = [row["t"] for row in ts]
        ax.plot(t, [row["success"] for row in ts], label="job success")  # NaN: no job issued, a gap
        ax.set_ylim(min([0.9] + [row["success"] for row in ts if not math.isnan(row["success"])]), 1.005)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("success of jobs issued")
        ax2 = ax.twinx()
        ax2.plot(t, [row["online_workers"] for row in ts], color="tab:gray", alpha=0.6, label="workers online")
        ax2.set_ylabel("workers online")
        ax.set_title("Success under churn")
        _save(fig, out / "success_over_time.png")
        names.append("success_over_time.png")
    return names
