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
