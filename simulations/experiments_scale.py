"""Experiments of issue 22 (simulations/EXPERIMENTS.md): fresher load on the job path, and the
network at 100,000 peers. Registered in :mod:`.experiments` (``--only fresher`` / ``--only large``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .sweep import sweep  # noqa: E402

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
LOADS = (0.5, 0.8, 0.95)
DURATION = ["duration_s=300"]  # 5 minutes a point (routing.toml's 15 make 15 points take 40 min on 2 cores)
VARIANTS = {  # label -> (run folder, overrides of routing.toml)
    "cocoon (gossiped load)": ("cocoon", ["routing.rule=cocoon", "routing.job_path_load=false"]),
    "cocoon + queue length in JobAccepted": ("cocoon-jobpath", ["routing.rule=cocoon", "routing.job_path_load=true"]),
    "cocoon + JobAccepted + busy past 0.5 s": (
        "cocoon-maxwait", ["routing.rule=cocoon", "routing.job_path_load=true", "workers.max_wait_s=0.5"]),
    "cocoon + JobAccepted + busy past 1 s": (
        "cocoon-maxwait1", ["routing.rule=cocoon", "routing.job_path_load=true", "workers.max_wait_s=1.0"]),
    "oracle-wait": ("oracle-wait", ["routing.rule=oracle-wait"]),
}  # fmt: skip


def fresher(out: Path, procs: int) -> dict[str, Any]:
    """The COCOON rule with and without the worker's queue length on the job path, and with
    workers that answer busy past an expected wait, against the expected-wait oracle, at
    50-95% load (routing.toml)."""
    table: dict[str, dict[str, float]] = {}
    for label, (slug, fixed) in VARIANTS.items():
        res = sweep(SCENARIOS / "routing.toml", [f"load.target={','.join(map(str, LOADS))}"], "model",
                    out / "runs" / f"fresher-{slug}", procs, [*fixed, *DURATION])  # fmt: skip
        table[label] = {s["params"]["load.target"]: s["latency_s_p99"] for s in res}
    oracle = table["oracle-wait"]
    ratios = {label: {ld: pts[ld] / oracle[ld] for ld in pts} for label, pts in table.items() if label != "oracle-wait"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in table.items():
        xs = sorted(pts, key=float)
        a1.plot([float(x) for x in xs], [pts[x] for x in xs], marker="o", label=label)
    for label, pts in ratios.items():
        xs = sorted(pts, key=float)
        a2.plot([float(x) for x in xs], [pts[x] for x in xs], marker="o", label=label)
    a2.axhline(1.5, color="tab:red", linestyle="--", label="goal: 1.5x the oracle")
    a1.set_yscale("log")
    a1.set_ylabel("job latency p99 (s)")
    a2.set_ylabel("p99 / oracle-wait p99")
    for ax in (a1, a2):
        ax.set_xlabel("load (share of total service rate)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Routing on fresher load: the queue on the job path, busy past an expected wait (routing.toml)")
    fig.tight_layout()
    fig.savefig(out / "fresher_load.png", dpi=110)
    plt.close(fig)
    return {"p99_s": table, "vs_oracle_wait": ratios}


LARGE_PEERS = (1_000, 10_000, 100_000)


def peers_overrides(peers: int) -> list[str]:
    """scale.toml's and large.toml's shape at ``peers`` peers: 3% workers, 20% clients, the rest relays."""
    workers, clients = max(1, round(peers * 0.03)), max(1, round(peers * 0.2))
    return [f"workers.count={workers}", f"clients.count={clients}", f"network.relays={peers - workers - clients}"]


def large(out: Path, procs: int) -> dict[str, Any]:
    """The network at 1,000 / 10,000 / 100,000 peers (large.toml, 80% load, churn): DHT hops
    and lookup time, announcement reach, routing p50/p99; the expected-wait oracle beside the
    COCOON rule where its scan of every worker per job is affordable (up to 10,000 peers)."""
    rows: dict[str, dict[str, Any]] = {}
    for peers in LARGE_PEERS:
        rules = ["cocoon", "oracle-wait"] if peers <= 10_000 else ["cocoon"]
        grid, folder = [f"routing.rule={','.join(rules)}"], out / "runs" / f"large-{peers}"
        res = sweep(SCENARIOS / "large.toml", grid, "model", folder, min(procs, len(rules)), peers_overrides(peers),
                    plots=False)  # fmt: skip
        for s in res:
            rows[f"{peers} {s['params']['routing.rule']}"] = {
                "peers": peers, "rule": s["params"]["routing.rule"], "jobs": s["jobs_issued"], "success": s["success"],
                "latency_s_p50": s["latency_s_p50"], "latency_s_p99": s["latency_s_p99"],
                "attempts_mean": s["attempts_mean"], "lookup_hops_mean": s["lookup_hops_mean"],
                "lookup_s_p50": s["lookup_s_p50"], "lookup_s_p99": s["lookup_s_p99"],
                "announcement_coverage": s.get("announcement_coverage"), "wall_s": s["wall_s"],
            }  # fmt: skip
    cocoon = [r for r in rows.values() if r["rule"] == "cocoon"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4))
    xs = [r["peers"] for r in cocoon]
    a1.plot(xs, [r["lookup_hops_mean"] for r in cocoon], marker="o", label="hops (mean)")
    a1.plot(xs, [r["lookup_s_p50"] for r in cocoon], marker="s", label="lookup time p50 (s)")
    a1.set_title("DHT lookups")
    for r in cocoon:
        cov = r["announcement_coverage"] or {}
        ts = sorted(cov, key=lambda k: float(k.rstrip("s")))
        a2.plot([float(t.rstrip("s")) for t in ts], [cov[t] for t in ts], marker="o", label=f"{r['peers']:,} peers")
    a2.set_xscale("log")
    a2.set_xlabel("time since published (s)")
    a2.set_title("Announcement reach (share of online peers)")
    for rule in ("cocoon", "oracle-wait"):
        pts = [r for r in rows.values() if r["rule"] == rule]
        a3.plot([r["peers"] for r in pts], [r["latency_s_p99"] for r in pts], marker="o", label=f"{rule} p99")
        a3.plot([r["peers"] for r in pts], [r["latency_s_p50"] for r in pts], marker="s", linestyle=":",
                label=f"{rule} p50")  # fmt: skip
    a3.set_title("Job latency at 80% load (10 s jobs)")
    a3.set_ylabel("seconds")
    for ax in (a1, a3):
        ax.set_xscale("log")
        ax.set_xlabel("peers")
    for ax in (a1, a2, a3):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("The network at 100,000 peers (large.toml: 3% workers, 20% clients, 30% churn)")
    fig.tight_layout()
    fig.savefig(out / "large_network.png", dpi=110)
    plt.close(fig)
    return rows
