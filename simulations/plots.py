"""PNG figures of a run, and of a sweep with its confidence intervals (matplotlib, no display needed)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import COVERAGE_AT_S, PointStats, Results  # noqa: E402


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


# A sweep's figures drawn against its first axis (the others: one line each), when measured.
SWEEP_PLOTTED = ("success", "latency_s_p50", "latency_s_p99", "lookup_s_p50", "onchain_ops_per_10k_jobs",
                 "cheat.wrong_paid_share", "cheat.jobs_to_detection_p50")  # fmt: skip


def _number(v: str) -> float | None:
    try:
        return float(v)
    except ValueError:
        return None


def sweep_intervals(
    stats: Sequence[PointStats], axes: Sequence[tuple[str, list[str]]], names: Sequence[str], out: Path, *, seeds: int
) -> list[str]:
    """One PNG per figure of ``SWEEP_PLOTTED`` (among ``names``): its mean at each grid point
    against the first axis whose values are all numbers (else the first axis, as categories),
    one line per combination of the other axes, error bars the 95% confidence interval over
    the replicates (none with one seed). Returns the file names."""
    if not axes:  # a single grid point: nothing to draw against
        return []
    x_at = next((i for i, (_, vs) in enumerate(axes) if all(_number(v) is not None for v in vs)), None)
    numeric = x_at is not None
    x_key, x_values = axes[x_at or 0]
    others = [a for a in axes if a[0] != x_key]
    pos = {v: float(v) if numeric else float(i) for i, v in enumerate(x_values)}
    names_drawn = []
    for name in (n for n in SWEEP_PLOTTED if n in names):
        if not any(math.isfinite(st.figures[name].mean) for st in stats):
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for combo in itertools.product(*(vs for _, vs in others)):
            want = dict(zip((k for k, _ in others), combo, strict=True))
            mine = [st for st in stats if all(st.params[k] == v for k, v in want.items())]
            pts = [(pos[st.params[x_key]], st.figures[name]) for st in mine if math.isfinite(st.figures[name].mean)]
            if not pts:
                continue
            pts.sort(key=lambda p: p[0])
            xs, ests = [p[0] for p in pts], [p[1] for p in pts]
            low = [e.mean - e.lo if math.isfinite(e.lo) else 0.0 for e in ests]
            high = [e.hi - e.mean if math.isfinite(e.hi) else 0.0 for e in ests]
            label = ", ".join(f"{k}={v}" for k, v in want.items()) or None
            ax.errorbar(xs, [e.mean for e in ests], yerr=[low, high], marker="o", capsize=3, label=label)
        if not numeric:
            ax.set_xticks(range(len(x_values)), x_values)
        ax.set_xlabel(x_key)
        ax.set_ylabel(name)
        what = f"mean and 95% CI over {seeds} seeds" if seeds > 1 else "one seed a point (no interval)"
        ax.set_title(f"{name}: {what}", fontsize=10)
        ax.grid(True, alpha=0.3)
        if others:
            ax.legend(fontsize=7)
        file = f"sweep_{name.replace('.', '_')}.png"
        _save(fig, out / file)
        names_drawn.append(file)
    return names_drawn
