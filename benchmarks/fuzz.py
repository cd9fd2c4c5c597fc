"""The decoder fuzz tests of tests/test_fuzz.py, run far longer than CI runs them.

    python -m benchmarks.fuzz [--examples 20000] [-k EXPR]

CI runs each property with 400 examples (seconds); this runs each with
``--examples`` (default 20,000: tens of minutes on 2 cores) and prints pytest's
report, with hypothesis' statistics. A failure prints the shrunk example that
broke a decoder; hypothesis keeps it in .hypothesis/ so the next run of
tests/test_fuzz.py tries it first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fuzz")
    ap.add_argument("--examples", type=int, default=20_000, help="examples per property")
    ap.add_argument("-k", dest="select", help="only the properties whose names match (pytest -k)")
    args = ap.parse_args(argv)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
           str(ROOT / "tests" / "test_fuzz.py")]  # fmt: skip
    if args.select:
        cmd += ["-k", args.select]
    env = {**os.environ, "COCOON_FUZZ_EXAMPLES": str(args.examples)}
    return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
