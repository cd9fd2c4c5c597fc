"""Run the benchmarks: ``python -m benchmarks [--quick] [--suite overlay|jobs|payments|attestation|all] [--only NAME]``.

Prints one table and writes the figures as JSON (default
benchmarks/results/overlay.json). Comparisons (ours vs baseline) are always
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import trio

from cocoon_p2p.transport.host import quiet_libp2p_logs

from . import attestation, jobs, overlay, payments

SUITES = {
    "overlay": overlay.BENCHES,
    "jobs": jobs.BENCHES,
    "payments": payments.BENCHES,
    "attestation": attestation.BENCHES,
}

GOALS = {
    "connect_ms_p50": ("<=", 10.0),
    "stream_vs_baseline": (">=", 0.8),
    "job_dispatch_overhead_ms_p50": ("<=", 1.0),
    "minilm_network_vs_local": ("<=", 1.2),
    "gen_network_vs_local": (">=", 0.9),
    "gen_q4_vs_fp32": (">=", 2.0),
    "vouchers_created_per_s": (">=", 30_000.0),
    "vouchers_verified_per_s": (">=", 15_000.0),
    "vouchers_persisted_per_s_group_64": (">=", 10_000.0),
    "onchain_ops_per_channel": ("<=", 3.0),
    "attest_first_job_extra_ms_beyond_verify_p50": ("<=", 5.0),
}


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside nested exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    ap.add_argument("--only", action="append", help="run only these (repeatable)")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of a failed benchmark")
    ap.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    ap.add_argument("--out", type=Path, help="JSON file (default: benchmarks/results/<suite>.json)")
    args = ap.parse_args()
    quiet_libp2p_logs()
    results: dict[str, Any] = {}
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    out = args.out or Path(__file__).parent / "results" / f"{args.suite}.json"
    for name, bench in [b for s in suites for b in SUITES[s]]:
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            figures = trio.run(bench, args.quick)
        except Exception as exc:  # one failed benchmark must not hide the others' figures
            leaf = _leaf(exc)
            print(f"  FAILED: {leaf!r}", file=sys.stderr, flush=True)
            if args.verbose:
                traceback.print_exception(leaf)
            figures = {f"{name}_error": repr(leaf)[:300]}
        print(f"  done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        results.update(figures)
    print(f"\n{'metric':40} {'value':>12}  goal")
    for key, value in results.items():
        goal = GOALS.get(key)
        mark = ""
        if goal:
            ok = value <= goal[1] if goal[0] == "<=" else value >= goal[1]
            mark = f"{goal[0]} {goal[1]}  {'met' if ok else 'MISSED'}"
        shown = f"{value:12.3f}" if isinstance(value, float) else f"{value!s:>12}"
        print(f"{key:40} {shown}  {mark}")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": args.quick,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if args.only and out.is_file():  # a partial run updates its figures, keeps the others
        try:
            kept = json.loads(out.read_text()).get("results", {})
        except ValueError:
            kept = {}
        results = {**kept, **results}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
