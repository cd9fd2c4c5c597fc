"""Re-run the experiments of simulations/EXPERIMENTS.md and redraw their figures.

    python -m cocoon_p2p.simulations.experiments [--only routing|churn|dht|settlement|scale|tee|cheat|fresher|large] \
        [--out simulations/results]

Each experiment is a sweep of a committed scenario (model fidelity); the figures
and a JSON of the figures behind them go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from cocoon_p2p.core.metrics import percentile  # noqa: E402

from .experiments_scale import fresher, large  # noqa: E402
from .sweep import sweep  # noqa: E402

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
LOADS = (0.5, 0.7, 0.8, 0.9, 0.95)


def _points(results: list[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {s["params"][key]: s for s in results}


def routing(out: Path, procs: int) -> dict[str, Any]:
    res = sweep(SCENARIOS / "routing.toml", ["routing.rule=cocoon,random,oracle,oracle-wait",
                f"load.target={','.join(map(str, LOADS))}"], "model", out / "runs" / "routing", procs, [])  # fmt: skip
    table: dict[str, dict[str, float]] = {}
    for s in res:
        table.setdefault(s["params"]["routing.rule"], {})[s["params"]["load.target"]] = s["latency_s_p99"]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for rule, pts in sorted(table.items()):
        xs = sorted(pts, key=float)
        ax.plot([float(x) for x in xs], [pts[x] for x in xs], marker="o", label=rule)
    ax.set_yscale("log")
    ax.set_xlabel("load (share of total service rate)")
    ax.set_ylabel("job latency p99 (s)")
    ax.set_title("Routing on mixed GPUs: p99 latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "routing_p99.png", dpi=110)
    plt.close(fig)
    ratio = {ld: table["cocoon"][ld] / table["oracle"][ld] for ld in table["cocoon"]}
    ratio_wait = {ld: table["cocoon"][ld] / table["oracle-wait"][ld] for ld in table["cocoon"]}
    return {"p99_s": table, "cocoon_vs_oracle": ratio, "cocoon_vs_oracle_wait": ratio_wait}


def churn(out: Path, procs: int) -> dict[str, Any]:
    res = sweep(SCENARIOS / "churn.toml", ["churn.fraction=0,0.1,0.3,0.5"], "model", out / "runs" / "churn", procs, [])
    pts = {float(k): v for k, v in _points(res, "churn.fraction").items()}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    xs = sorted(pts)
    ax.plot(xs, [pts[x]["success"] * 100 for x in xs], marker="o")
    ax.axhline(99.5, color="tab:red", linestyle="--", label="goal 99.5%")
    ax.set_xlabel("share of peers that churn")
    ax.set_ylabel("job success (%)")
    ax.set_title("Success under churn (3 attempts a job)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "churn_success.png", dpi=110)
    plt.close(fig)
    return {str(x): {k: pts[x][k] for k in ("success", "attempts_mean", "latency_s_p99", "failures_by_code")}
            for x in xs}  # fmt: skip


def dht(out: Path, procs: int) -> dict[str, Any]:
    res = sweep(SCENARIOS / "dht.toml", ["network.relays=700,2700,5700,9700"], "model", out / "runs" / "dht", procs, [])
    rows = sorted(res, key=lambda s: s["peers"])
    n = [s["peers"] for s in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8.5, 3.6))
    a1.plot(n, [s["lookup_hops_mean"] for s in rows], marker="o", label="measured hops")
    base = rows[0]["lookup_hops_mean"] / math.log2(n[0])
    a1.plot(n, [base * math.log2(x) for x in n], linestyle="--", label="c log2 N")
    a1.set_xscale("log")
    a1.set_xlabel("peers N")
    a1.set_ylabel("lookup hops (mean)")
    a1.legend()
    a2.plot(n, [s["lookup_s_p50"] for s in rows], marker="o", label="p50")
    a2.plot(n, [s["lookup_s_p99"] for s in rows], marker="o", label="p99")
    a2.set_xscale("log")
    a2.set_xlabel("peers N")
    a2.set_ylabel("lookup time (s)")
    a2.legend()
    fig.suptitle("Kademlia lookups (k=20, alpha=3)")
    fig.tight_layout()
    fig.savefig(out / "dht_scaling.png", dpi=110)
    plt.close(fig)
    return {str(s["peers"]): {k: s[k] for k in ("lookups", "lookup_hops_mean", "lookup_messages_mean", "lookup_s_p50",
                                                 "lookup_s_p99")} for s in rows}  # fmt: skip


def settlement(out: Path, procs: int) -> dict[str, Any]:
    deposits = ("100000000", "1000000000", "10000000000")
    limits = ("0", "50000000", "500000000")
    res = sweep(SCENARIOS / "settlement.toml", [f"settlement.deposit_nanoton={','.join(deposits)}",
                f"settlement.settle_above_nanoton={','.join(limits)}"], "model", out / "runs" / "settlement", procs,
                [])  # fmt: skip
    table = {
        (s["params"]["settlement.deposit_nanoton"], s["params"]["settlement.settle_above_nanoton"]): s for s in res
    }
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for lim in limits:
        label = "no worker limit" if lim == "0" else f"worker closes at {int(lim) / 1e9:g} TON"
        ax.plot([int(d) / 1e9 for d in deposits], [table[(d, lim)]["onchain_ops_per_10k_jobs"] for d in deposits],
                marker="o", label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("client deposit per channel (TON)")
    ax.set_ylabel("on-chain operations per 10,000 jobs")
    ax.set_title("Settlement policy vs chain load (200 client-worker pairs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "settlement_ops.png", dpi=110)
    plt.close(fig)
    return {
        f"deposit={d},limit={lim}": {
            k: s[k] for k in ("onchain_ops", "onchain_ops_per_10k_jobs", "channels_opened", "channels_closed", "money")
        }
        for (d, lim), s in table.items()
    }


def scale(out: Path, procs: int) -> dict[str, Any]:
    """1k, 3k, 10k peers for an hour: wall time and events (one process each, run one at a time)."""
    points = {1000: ("30", "200", "770"), 3000: ("90", "600", "2310"), 10000: ("300", "2000", "7700")}
    rows = {}
    for n, (w, c, r) in points.items():
        res = sweep(SCENARIOS / "scale.toml", [f"network.relays={r}"], "model", out / "runs" / f"scale-{n}", 1,
                    [f"workers.count={w}", f"clients.count={c}"])  # fmt: skip
        s = res[0]
        rows[n] = {k: s[k] for k in ("peers", "jobs_issued", "success", "events", "wall_s", "lookup_hops_mean")}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ns = sorted(rows)
    ax.plot(ns, [rows[x]["wall_s"] for x in ns], marker="o", label="wall time for 1 h virtual")
    ax.axhline(300, color="tab:red", linestyle="--", label="goal: 5 min at 10k")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peers")
    ax.set_ylabel("seconds (2 cores, one used)")
    ax.legend()
    ax.set_title("Simulator cost")
    fig.tight_layout()
    fig.savefig(out / "scale_cost.png", dpi=110)
    plt.close(fig)
    return {str(n): v for n, v in rows.items()}


TEE_SHARES = ("0", "0.1", "0.25", "0.5", "1.0")


def tee(out: Path, procs: int) -> dict[str, Any]:
    """Half of the clients require an attested worker; the attested share of workers goes 0 -> 1.
    A run without any TEE (nobody requires, nobody attested) is the baseline."""
    res = sweep(SCENARIOS / "tee.toml", [f"tee.attested_share={','.join(TEE_SHARES)}"], "model", out / "runs" / "tee",
                procs, ["tee.require_share=0.5"])  # fmt: skip
    base = sweep(SCENARIOS / "tee.toml", ["tee.attested_share=0"], "model", out / "runs" / "tee-baseline", 1,
                 ["tee.require_share=0"])[0]  # fmt: skip
    pts = {float(k): v for k, v in _points(res, "tee.attested_share").items()}
    xs = sorted(pts)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for group, style, color in (("requiring", "-", "tab:green"), ("other", "--", "tab:purple")):
        label = "clients requiring TEE" if group == "requiring" else "other clients"
        a1.plot(xs, [pts[x]["tee"][group]["success"] * 100 for x in xs], marker="o", linestyle=style, color=color,
                label=label)  # fmt: skip
        for q, color in (("p50", "tab:blue"), ("p99", "tab:orange")):
            a2.plot(xs, [pts[x]["tee"][group][f"latency_s_{q}"] for x in xs], marker="o", linestyle=style,
                    color=color, label=f"{q}, {label}")  # fmt: skip
    a1.axhline(base["success"] * 100, color="tab:gray", linestyle=":", label="no TEE at all")
    for q in ("p50", "p99"):
        a2.axhline(base[f"latency_s_{q}"], color="tab:gray", linestyle=":", linewidth=1)
    a1.set_xlabel("share of workers attested")
    a1.set_ylabel("job success (%)")
    a1.legend(fontsize=8)
    a2.set_yscale("log")
    a2.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    a2.yaxis.set_minor_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[-1] in "235" else "")
    )
    a2.set_xlabel("share of workers attested")
    a2.set_ylabel("job latency (s; dotted: no TEE at all)")
    a2.legend(fontsize=7)
    fig.suptitle("Half of the clients require a TEE (50% load, 20 workers)")
    fig.tight_layout()
    fig.savefig(out / "tee_share.png", dpi=110)
    plt.close(fig)
    keys = ("success", "latency_s_p50", "latency_s_p99", "failures_by_code")
    table: dict[str, Any] = {"baseline": {k: base[k] for k in keys}}
    for x in xs:
        table[str(x)] = {**pts[x]["tee"], "failures_by_code": pts[x]["failures_by_code"]}
    clean: dict[str, Any] = _no_nan(table)
    return clean


CHEAT_RATES = ("0.01", "0.1", "0.5")
CHECK_RATES = ("0", "0.01", "0.05", "0.1", "0.25")
CHEAT_SHARES = ("0.1", "0.3")
CAUGHT_WITHIN = 100  # jobs: a worker cheating on 10% of its jobs should be caught within this many (median)


def _detection(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Jobs until detection over the cheaters of several runs: percentiles (None: past the
    cheaters still undetected at the end; ``p50_at_least`` then bounds the median from
    below), and detections per job served while undetected (pooled)."""
    until: list[float] = []
    floor: list[float] = []
    found = exposure = 0
    for s in runs:
        ch = s["cheat"]
        for n, served in zip(ch["jobs_to_detection"], ch["cheater_jobs"], strict=True):
            until.append(math.inf if n is None else n)
            floor.append(served if n is None else n)
        found += ch["cheaters_detected"]
        exposure += ch["detection_exposure_jobs"]
    p50, p90 = percentile(until, 50), percentile(until, 90)
    return {
        "cheaters": len(until),
        "detected": found,
        "p50": None if math.isinf(p50) else p50,
        "p90": None if math.isinf(p90) else p90,
        "p50_at_least": percentile(floor, 50),
        "per_job": found / exposure if exposure else None,
        "exposure_jobs": exposure,
    }


def cheat(out: Path, procs: int) -> dict[str, Any]:
    """Wrong results against spot checks: cheat rate x check rate x cheater share, then the
    check rate that catches a worker cheating on 10% of its jobs within 100 of them (median),
    run with a verify job (generation) and with a full re-run (embeddings)."""
    res = sweep(SCENARIOS / "cheat.toml", [f"cheat.rate={','.join(CHEAT_RATES)}",
                f"cheat.check_rate={','.join(CHECK_RATES)}", f"cheat.share={','.join(CHEAT_SHARES)}"], "model",
                out / "runs" / "cheat", procs, [], plots=False)  # fmt: skip
    pts = {(s["params"]["cheat.rate"], s["params"]["cheat.check_rate"], s["params"]["cheat.share"]): s for s in res}
    detect = {(r, c): _detection([pts[(r, c, sh)] for sh in CHEAT_SHARES]) for r in CHEAT_RATES for c in CHECK_RATES}
    # Detection per job is check_rate x cheat_rate x (a check's chance to blame the right worker): fit that
    # last factor on the 10% line (a Poisson fit through the origin), then solve for the median.
    line = [(float(c), detect[("0.1", c)]) for c in CHECK_RATES if float(c) > 0]
    k = sum(d["detected"] for _, d in line) / sum(c * d["exposure_jobs"] for c, d in line)
    needed_per_job = 1 - 2 ** (-1 / CAUGHT_WITHIN)  # median of a geometric = CAUGHT_WITHIN
    needed = {"analytic": needed_per_job / 0.1, "fitted": needed_per_job / k, "fit_per_job_per_check": k}
    check = f"{math.ceil(needed['fitted'] * 100) / 100:g}"
    fixed = ["cheat.rate=0.1", f"cheat.check_rate={check}", "cheat.share=0.3"]
    conf = sweep(SCENARIOS / "cheat.toml", ["cheat.verify_cost=0.08,1.0", "seed=71,72"], "model",
                 out / "runs" / "cheat-needed", procs, fixed, plots=False)  # fmt: skip
    for vc in ("0.08", "1.0"):
        runs = [s for s in conf if s["params"]["cheat.verify_cost"] == vc]
        needed[f"verify_cost={vc}"] = {
            "check_rate": float(check),
            "jobs_to_detection": _detection(runs),
            "added_compute_share": sum(s["cheat"]["added_compute_share"] for s in runs) / len(runs),
            "latency_s_p50": sum(s["latency_s_p50"] for s in runs) / len(runs),
            "latency_s_p99": sum(s["latency_s_p99"] for s in runs) / len(runs),
        }
    _cheat_plots(out, pts, detect)
    keys = ("wrong_paid_share", "wrong_results", "wrong_delivered", "wrong_caught", "cheaters", "cheaters_detected",
            "jobs_to_detection_p50", "jobs_to_detection_p90", "network_ban_s_p50", "network_ban_s_max", "checks",
            "check_runs", "added_compute_share", "false_alarms", "honest_condemned_by_lies", "lying_checkers_caught",
            "paid_to_cheaters_nanoton", "paid_total_nanoton")  # fmt: skip
    runs_table = {
        f"rate={r},check={c},share={sh}": {
            **{k: s["cheat"][k] for k in keys},
            "latency_s_p50": s["latency_s_p50"],
            "latency_s_p99": s["latency_s_p99"],
            "success": s["success"],
        }
        for (r, c, sh), s in sorted(pts.items())
    }
    pooled = {f"rate={r},check={c}": {**d, "analytic_p50": _analytic_p50(float(r), float(c))}
              for (r, c), d in detect.items()}  # fmt: skip
    clean: dict[str, Any] = _no_nan({"runs": runs_table, "detection_pooled_over_shares": pooled, "needed": needed})
    return clean


def _analytic_p50(rate: float, check: float) -> float | None:
    """The median of a geometric with detection check x rate per job (None: never detected)."""
    p = rate * check
    return math.log(2) / -math.log1p(-p) if p > 0 else None


def _cheat_plots(out: Path, pts: dict[tuple[str, str, str], dict[str, Any]],
                 detect: dict[tuple[str, str], dict[str, Any]]) -> None:  # fmt: skip
    colors = dict(zip(CHEAT_RATES, ("tab:blue", "tab:orange", "tab:red"), strict=True))
    xs = [float(c) for c in CHECK_RATES]
    fig, axes = plt.subplots(1, len(CHEAT_SHARES), figsize=(9.5, 3.8), sharey=True)
    for ax, sh in zip(axes, CHEAT_SHARES, strict=True):
        for r in CHEAT_RATES:
            ys = [pts[(r, c, sh)]["cheat"]["wrong_paid_share"] * 100 for c in CHECK_RATES]
            ax.plot(xs, ys, marker="o", color=colors[r], label=f"cheats on {float(r):.0%} of jobs")
        ax.set_xscale("symlog", linthresh=0.01, linscale=0.5)
        ax.set_yscale("symlog", linthresh=0.01, linscale=0.5)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel("clients' spot-check rate")
        ax.set_title(f"{float(sh):.0%} of workers cheat")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("money paid for wrong results (% of all)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Money paid for wrong results (20 workers, 90 s at 50% load, bans by fraud proof)")
    fig.tight_layout()
    fig.savefig(out / "cheat_money.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.6, 4.4))
    checks = [c for c in CHECK_RATES if float(c) > 0]
    fine = [x / 1000 for x in range(8, 300)]
    for r in CHEAT_RATES:
        d = [detect[(r, c)] for c in checks]
        known = [(float(c), x) for c, x in zip(checks, d, strict=True) if x["p50"] is not None]
        if known:
            p50 = [x["p50"] for _, x in known]
            p90 = [x["p90"] if x["p90"] is not None else x["p50"] for _, x in known]
            up = [b - a for a, b in zip(p50, p90, strict=True)]
            ax.errorbar([c for c, _ in known], p50, yerr=[[0] * len(p50), up], marker="o", color=colors[r], capsize=3,
                        label=f"cheats on {float(r):.0%} of jobs")  # fmt: skip
        fits = [(float(c), math.log(2) / -math.log1p(-x["per_job"])) for c, x in zip(checks, d, strict=True)
                if x["per_job"]]  # fmt: skip
        ax.scatter([c for c, _ in fits], [y for _, y in fits], marker="x", color=colors[r], s=25)
        floors = [(float(c), x["p50_at_least"]) for c, x in zip(checks, d, strict=True) if x["p50"] is None]
        if floors:
            ax.scatter([c for c, _ in floors], [y for _, y in floors], marker="^", facecolors="none",
                       edgecolors=colors[r])  # fmt: skip
        ax.plot(fine, [math.log(2) / -math.log1p(-float(r) * c) for c in fine], linestyle="--", color=colors[r],
                linewidth=1)  # fmt: skip
    ax.axhline(CAUGHT_WITHIN, color="tab:gray", linestyle=":", linewidth=1)
    keys = [  # what the marks mean, in black (the colours are the cheat rates)
        Line2D([], [], color="k", marker="o", label="median (bar to p90)"),
        Line2D([], [], color="k", marker="x", linestyle="", label="ln 2 / (detections per job), pooled"),
        Line2D([], [], color="k", marker="^", markerfacecolor="none", linestyle="", label="median beyond (undetected)"),
        Line2D([], [], color="k", linestyle="--", linewidth=1, label="ln 2 / (check x cheat rate)"),
    ]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients' spot-check rate")
    ax.set_ylabel("a cheater's jobs until first caught")
    ax.set_title("Jobs until a cheater is first caught (8 cheaters a point, generation checks)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], *keys], fontsize=7, loc="center left",
              bbox_to_anchor=(1.01, 0.5))  # fmt: skip
    fig.tight_layout()
    fig.savefig(out / "cheat_detection.png", dpi=110)
    plt.close(fig)


def _no_nan(value: Any) -> Any:
    """``value`` with NaN (no job to measure) as None, so figures.json stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    return value


EXPERIMENTS = {"routing": routing, "churn": churn, "dht": dht, "settlement": settlement, "scale": scale, "tee": tee,
               "cheat": cheat, "fresher": fresher, "large": large}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m cocoon_p2p.simulations.experiments")
    ap.add_argument("--only", action="append", choices=list(EXPERIMENTS))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    figures_path = args.out / "figures.json"
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    for name in args.only or list(EXPERIMENTS):
        print(f"== {name}", file=sys.stderr, flush=True)
        figures[name] = EXPERIMENTS[name](args.out, args.processes)
        figures_path.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
