"""The same benchmarks on two versions of the code, alternating, in one run.

    python -m benchmarks.ab --ref REF [--rounds 3] [--quick] --only throughput --only job_minilm ...

Checks REF out into a temporary git worktree, then runs ``python -m benchmarks
--only NAME`` for each benchmark in both trees, one after the other, swapping
which goes first every round (this machine's speed drifts by 10-20% within a
minute, so back-to-back phases would measure the drift). Prints, per figure, the
median of each side and their ratio, and writes them as JSON (default
``benchmarks/results/ab.json``). Both sides run under this interpreter, so they
share its installed dependencies; each imports ``cocoon_p2p`` from its own tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE_OF = {
    "connect": "overlay",
    "stream_rpc": "overlay",
    "throughput": "overlay",
    "dht_20": "overlay",
    "gossip_20_at_10": "overlay",
    "gossip_20_at_100": "overlay",
    "job_dispatch": "jobs",
    "job_minilm": "jobs",
    "job_batching": "jobs",
    "job_generation": "jobs",
}


def _run_once(tree: Path, name: str, quick: bool, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks", "--suite", SUITE_OF[name], "--only", name, "--out", str(out)]
    if quick:
        cmd.append("--quick")
    out.unlink(missing_ok=True)
    subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    results: dict[str, Any] = json.loads(out.read_text())["results"]
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab")
    ap.add_argument("--ref", required=True, help="the other version (a commit, tag or branch)")
    ap.add_argument("--only", action="append", required=True, choices=sorted(SUITE_OF))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ab.json")
    args = ap.parse_args(argv)
    samples: dict[str, dict[str, list[float]]] = {"ref": {}, "here": {}}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "ref"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old), args.ref], cwd=ROOT, check=True)
        try:
            for r in range(args.rounds):
                for name in args.only:
                    sides = [("ref", old), ("here", ROOT)]
                    for side, tree in sides if r % 2 == 0 else sides[::-1]:
                        t = time.perf_counter()
                        figures = _run_once(tree, name, args.quick, Path(tmp) / f"{side}.json")
                        print(f"round {r + 1}/{args.rounds} {name} {side}: {time.perf_counter() - t:.0f} s", flush=True)
                        for key, value in figures.items():
                            if isinstance(value, int | float):
                                samples[side].setdefault(key, []).append(float(value))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    table = {}
    print(f"\n{'figure':40} {'ref':>12} {'here':>12} {'here/ref':>9}")
    for key in samples["here"]:
        if key not in samples["ref"]:
            continue
        ref, here = statistics.median(samples["ref"][key]), statistics.median(samples["here"][key])
        ratio = here / ref if ref else float("nan")
        table[key] = {"ref": ref, "here": here, "ratio": ratio, "ref_runs": samples["ref"][key],
                      "here_runs": samples["here"][key]}  # fmt: skip
        print(f"{key:40} {ref:12.3f} {here:12.3f} {ratio:9.3f}")
    meta = {"ref": args.ref, "rounds": args.rounds, "quick": args.quick, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "figures": table}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
