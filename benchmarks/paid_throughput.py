"""Paid vs unpaid MiniLM jobs, one client and one worker, in the same run (issue 20).

    python -m benchmarks.paid_throughput [--quick]

Three variants, each a client node (in this process) and a worker node serving
MiniLM (in a process of its own, as in a deployment and in :mod:`benchmarks.jobs`),
over 127.0.0.1:

* ``unpaid``: neither side has payments.
* ``paid``: both have a :class:`PaymentConfig` on the local chain (the worker's
  credit at its default). ``infer`` returns before its voucher goes; the jobs finishing
  within the client's ``pay_linger_s`` (0.2 s) are paid by one voucher. Each phase ends with ``flush_payments()``,
  so its time includes paying for all its jobs.
* ``paid-serial``: the same paid pair, each job waiting for its own payment
  (``flush_payments()`` after every job): the old behaviour, the baseline.
* ``paid-quiet`` (concurrency 1 only, a diagnosis): the paid pair, each job's payment
  flushed after its latency is taken, so no voucher is on its way while a job runs.
  Close to ``unpaid``: what ``paid`` adds is the background payment's competition for
  the CPU; close to ``paid``: it is in the job's own path.

Besides jobs/s, latency and vouchers per job, each phase's CPU time per job is taken, of
the client (this process) and of the worker process (``/proc``): where paying costs.

Each round runs every variant at concurrency 1 and 32, in an order that rotates from
round to round (this machine's speed drifts by 10-20% within a minute). Writes
benchmarks/results/paid_throughput.json and .md. The worker process is started as
``python -m benchmarks.paid_throughput --worker {paid,unpaid} ENDPOINT DIR``.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.export import ensure_minilm
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.payments.service import PaymentConfig
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain
from cocoon_p2p.transport.host import quiet_libp2p_logs

from .runmeta import RunMeta, load_avg

SENTENCE = "Decentralized inference spreads jobs over the GPUs that are free at that moment."
TON = 1_000_000_000
PRICE = 1000  # nanoton per embedded token: ~20k a job, far inside the default credit and deposit
CONCURRENCY = (1, 32)
VARIANTS = ("unpaid", "paid", "paid-serial", "paid-quiet")


class Flush(enum.Enum):
    """When a job's task waits for the payments on their way."""

    PHASE_END = "phase-end"  # only when the phase ends
    IN_JOB = "in-job"  # before the job counts as done: the old behaviour
    AFTER_JOB = "after-job"  # after its latency is taken, before the next job


MODES = {"unpaid": Flush.PHASE_END, "paid": Flush.PHASE_END, "paid-serial": Flush.IN_JOB, "paid-quiet": Flush.AFTER_JOB}
RUNS = {v: (1,) if v == "paid-quiet" else CONCURRENCY for v in VARIANTS}  # the concurrencies each variant runs at
PAUSE_S = 0.2  # between phases: onnxruntime's threads keep spinning a while after their last run
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Settings:
    """How much each phase runs."""

    rounds: int
    jobs: dict[int, int]  # per concurrency
    warmup: int


FULL = Settings(rounds=6, jobs={1: 100, 32: 480}, warmup=64)
QUICK = Settings(rounds=2, jobs={1: 30, 32: 160}, warmup=32)


# ---- the worker process -------------------------------------------------------------


async def serve_worker(paid: bool, endpoint: str, data_dir: Path) -> None:
    """Serve MiniLM (batches of up to 32) until stdin closes; print our multiaddr first."""
    quiet_libp2p_logs()
    payments = None
    if paid:
        chain = LocalChain(endpoint)
        wallet = await trio.to_thread.run_sync(chain.new_wallet, 20 * TON)
        payments = PaymentConfig(chain, wallet, data_dir / "w")
    spec = replace(ensure_minilm(), max_batch=32)
    async with Node(NodeConfig(announce_interval_s=0.5, job_capacity=64, payments=payments)) as node:
        node.serve_model(spec, OnnxRuntimeBackend(spec.path), price_nanoton=PRICE)
        print(node.addrs[0], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)


@asynccontextmanager
async def _worker(paid: bool, endpoint: str, data_dir: Path) -> AsyncIterator[tuple[str, int]]:
    """A worker process; yields its multiaddr and process id."""
    argv = [sys.executable, "-m", "benchmarks.paid_throughput", "--worker", "paid" if paid else "unpaid"]
    proc = await trio.lowlevel.open_process(
        [*argv, endpoint, str(data_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = b""
        with trio.fail_after(120):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                if not chunk:
                    raise RuntimeError("the worker process exited")
                line += chunk
        yield line.decode().strip(), proc.pid
        await proc.stdin.aclose()
        with trio.move_on_after(10):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---- phases ---------------------------------------------------------------------------


@dataclass
class Samples:
    """One variant at one concurrency, over all rounds."""

    jobs_per_s: list[float] = field(default_factory=list)  # one per round
    latency_ms: list[float] = field(default_factory=list)  # every job
    p50_ms: list[float] = field(default_factory=list)  # one per round
    vouchers: int = 0
    jobs: int = 0
    client_cpu_s: float = 0.0  # this process's CPU time over the phases (the client node)
    worker_cpu_s: float = 0.0  # the worker process's


def _cpu_s(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vouchers(client: Node) -> int:
    """Vouchers the client has signed so far, over its open channels."""
    if client.payments is None:
        return 0
    return sum(ch.issuer.seqno for ch in client.payments.payer.open.values())


async def _phase(client: Node, model_id: bytes, jobs: int, concurrency: int, flush: Flush) -> tuple[float, list[float]]:
    """``jobs`` jobs, ``concurrency`` at a time, all paid for at the end: (seconds, latencies ms)."""
    limiter = trio.CapacityLimiter(concurrency)
    latencies: list[float] = []

    async def one() -> None:
        async with limiter:
            t = time.perf_counter()
            await client.infer(model_id, texts=(SENTENCE,), max_price_nanoton=PRICE)
            if flush is Flush.IN_JOB:  # the old behaviour: the job is done when its payment is
                await client.flush_payments()
            latencies.append((time.perf_counter() - t) * 1000)
            if flush is Flush.AFTER_JOB:
                await client.flush_payments()

    t = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(jobs):
            nursery.start_soon(one)
    await client.flush_payments()
    return time.perf_counter() - t, latencies


async def _wait_for_worker(client: Node, model_id: bytes) -> None:
    with trio.fail_after(30):
        while not client.directory.workers_for(model_id, now_ms=now_ms()):
            await trio.sleep(0.05)


async def _measure(settings: Settings) -> tuple[dict[str, dict[int, Samples]], list[list[float]]]:
    spec = ensure_minilm()
    samples = {v: {c: Samples() for c in RUNS[v]} for v in VARIANTS}
    loads: list[list[float]] = []
    with open_local_chain() as chain, tempfile.TemporaryDirectory() as d:
        c_cfg = PaymentConfig(chain, chain.new_wallet(50 * TON), Path(d) / "c")
        async with (
            _worker(False, chain.endpoint, Path(d)) as (unpaid_addr, unpaid_pid),
            _worker(True, chain.endpoint, Path(d)) as (paid_addr, paid_pid),
            Node(NodeConfig(announce_interval_s=0.5, bootstrap=[unpaid_addr])) as unpaid,
            Node(NodeConfig(announce_interval_s=0.5, bootstrap=[paid_addr], payments=c_cfg)) as paid,
        ):
            for client in (unpaid, paid):
                await _wait_for_worker(client, spec.model_id)
                # Warm: the first paid job opens the channel on chain; then batches form.
                await client.infer(spec.model_id, texts=(SENTENCE,), max_price_nanoton=PRICE)
                await _phase(client, spec.model_id, settings.warmup, 32, Flush.PHASE_END)
            if paid.payments is None or not paid.payments.payer.open:
                raise RuntimeError("the paid client has no open channel after warming up")
            clients = {v: unpaid if v == "unpaid" else paid for v in VARIANTS}
            pids = {v: unpaid_pid if v == "unpaid" else paid_pid for v in VARIANTS}
            for r in range(settings.rounds):
                order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
                for conc in CONCURRENCY:
                    for variant in (v for v in order if conc in RUNS[v]):
                        client = clients[variant]
                        await trio.sleep(PAUSE_S)
                        before = _vouchers(client)
                        n = settings.jobs[conc]
                        cpu = time.process_time(), _cpu_s(pids[variant])
                        elapsed, lat = await _phase(client, spec.model_id, n, conc, MODES[variant])
                        s = samples[variant][conc]
                        s.client_cpu_s += time.process_time() - cpu[0]
                        s.worker_cpu_s += _cpu_s(pids[variant]) - cpu[1]
                        s.jobs_per_s.append(n / elapsed)
                        s.latency_ms += lat
                        s.p50_ms.append(statistics.median(lat))
                        s.vouchers += _vouchers(client) - before
                        s.jobs += n
                loads.append(load_avg())
                print(f"round {r + 1}/{settings.rounds} done, load {loads[-1][0]}", file=sys.stderr, flush=True)
    return samples, loads


# ---- the report -----------------------------------------------------------------------


def _summary(s: Samples) -> dict[str, Any]:
    return {
        "jobs_per_s_p50": round(statistics.median(s.jobs_per_s), 1),
        "jobs_per_s_rounds": [round(x, 1) for x in s.jobs_per_s],
        "latency_ms_p50": round(statistics.median(s.latency_ms), 3),
        "latency_ms_p99": round(percentile(s.latency_ms, 99), 3),
        "latency_ms_p50_rounds": [round(x, 3) for x in s.p50_ms],
        "vouchers_per_job": round(s.vouchers / s.jobs, 4) if s.jobs else None,
        "client_cpu_ms_per_job": round(s.client_cpu_s / s.jobs * 1000, 3) if s.jobs else None,
        "worker_cpu_ms_per_job": round(s.worker_cpu_s / s.jobs * 1000, 3) if s.jobs else None,
        "jobs": s.jobs,
    }


def _paired(a: list[float], b: list[float]) -> float:
    """The median of round-by-round ratios ``a / b`` (the two ran back to back)."""
    return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 4)


def goals(samples: dict[str, dict[int, Samples]]) -> dict[str, Any]:
    """Issue 20's checks: paid jobs/s at 32 >= 0.9x unpaid; paid p50 at 1 <= 1.05x unpaid."""
    hi, lo = max(CONCURRENCY), min(CONCURRENCY)
    paid, unpaid, serial = samples["paid"], samples["unpaid"], samples["paid-serial"]
    tput = statistics.median(paid[hi].jobs_per_s) / statistics.median(unpaid[hi].jobs_per_s)
    lat = statistics.median(paid[lo].latency_ms) / statistics.median(unpaid[lo].latency_ms)
    return {
        "paid_vs_unpaid_jobs_per_s_at_32": round(tput, 4),
        "paid_vs_unpaid_jobs_per_s_at_32_paired": _paired(paid[hi].jobs_per_s, unpaid[hi].jobs_per_s),
        "throughput_met": tput >= 0.9,
        "paid_vs_unpaid_p50_at_1": round(lat, 4),
        "paid_vs_unpaid_p50_at_1_paired": _paired(paid[lo].p50_ms, unpaid[lo].p50_ms),
        "latency_met": lat <= 1.05,
        "serial_vs_unpaid_jobs_per_s_at_32": round(
            statistics.median(serial[hi].jobs_per_s) / statistics.median(unpaid[hi].jobs_per_s), 4
        ),
        "serial_vs_unpaid_p50_at_1": round(
            statistics.median(serial[lo].latency_ms) / statistics.median(unpaid[lo].latency_ms), 4
        ),
        "quiet_vs_unpaid_p50_at_1": round(
            statistics.median(samples["paid-quiet"][lo].latency_ms) / statistics.median(unpaid[lo].latency_ms), 4
        ),
        "quiet_vs_unpaid_p50_at_1_paired": _paired(samples["paid-quiet"][lo].p50_ms, unpaid[lo].p50_ms),
    }


def write_markdown(meta: dict[str, Any], checks: dict[str, Any], table: dict[str, Any], path: Path) -> str:
    """The table and the goal checks, as Markdown, to ``path``; returns them."""
    s = meta["settings"]
    lines = [
        f"# paid_throughput ({meta['when']}, {meta['cpus']} CPUs, load {meta['load_avg_at_start'][0]} -> "
        f"{meta['load_avg_at_end'][0]}{', quick' if meta['quick'] else ''})",
        "",
        f"MiniLM, one sentence a job, one client node -> one worker process (max batch 32) on 127.0.0.1; "
        f"{s['rounds']} rounds, each variant at each concurrency once a round, order rotating; "
        f"{s['jobs']['1']} / {s['jobs']['32']} jobs a phase at concurrency 1 / 32. Jobs/s: median of the "
        "rounds, each phase timed until its last voucher is acknowledged; latency: over every job.",
        "",
        "| variant | concurrency | jobs/s | p50 ms | p99 ms | vouchers / job | CPU ms / job: client | worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        for conc in RUNS[variant]:
            row = table[variant][str(conc)]
            vpj = "-" if variant == "unpaid" else f"{row['vouchers_per_job']:.3f}"
            lines.append(
                f"| {variant} | {conc} | {row['jobs_per_s_p50']:.0f} | {row['latency_ms_p50']:.2f} | "
                f"{row['latency_ms_p99']:.2f} | {vpj} | {row['client_cpu_ms_per_job']:.2f} | "
                f"{row['worker_cpu_ms_per_job']:.2f} |"
            )
    ok = {True: "met", False: "MISSED"}
    lines += [
        "",
        f"- paid jobs/s at 32 concurrent: {checks['paid_vs_unpaid_jobs_per_s_at_32']:.3f}x unpaid "
        f"(round by round {checks['paid_vs_unpaid_jobs_per_s_at_32_paired']:.3f}x), goal >= 0.9x: "
        f"{ok[checks['throughput_met']]}",
        f"- paid p50 latency at concurrency 1: {checks['paid_vs_unpaid_p50_at_1']:.3f}x unpaid "
        f"(round by round {checks['paid_vs_unpaid_p50_at_1_paired']:.3f}x), goal <= 1.05x: "
        f"{ok[checks['latency_met']]}",
        f"- the old behaviour (paid-serial): {checks['serial_vs_unpaid_jobs_per_s_at_32']:.3f}x unpaid jobs/s at 32, "
        f"{checks['serial_vs_unpaid_p50_at_1']:.3f}x unpaid p50 at 1",
        f"- paid-quiet (no voucher on its way while a job runs): {checks['quiet_vs_unpaid_p50_at_1']:.3f}x unpaid "
        f"p50 at 1 (round by round {checks['quiet_vs_unpaid_p50_at_1_paired']:.3f}x)",
        "",
        f"Load average (1 min) after each round: {[x[0] for x in meta['load_avg_rounds']]}; run took "
        f"{meta['seconds']:.0f} s.",
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


async def run(quick: bool) -> dict[str, Any]:
    """Measure, check and write the results; returns the JSON written."""
    settings = QUICK if quick else FULL
    runmeta = RunMeta.start()
    t = time.perf_counter()
    samples, loads = await _measure(settings)
    meta = {
        **runmeta.finish(),
        "load_avg_rounds": loads,
        "quick": quick,
        "settings": {
            "rounds": settings.rounds,
            "jobs": {str(k): v for k, v in settings.jobs.items()},
            "warmup": settings.warmup,
            "price_nanoton": PRICE,
        },
        "seconds": round(time.perf_counter() - t, 1),
    }
    table = {v: {str(c): _summary(samples[v][c]) for c in RUNS[v]} for v in VARIANTS}
    checks = goals(samples)
    out = {"meta": meta, "goals": checks, "results": table}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "paid_throughput.json").write_text(json.dumps(out, indent=1))
    print(write_markdown(meta, checks, table, RESULTS / "paid_throughput.md"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paid_throughput")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and jobs")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "ENDPOINT", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, endpoint, data_dir = args.worker
        trio.run(serve_worker, kind == "paid", endpoint, Path(data_dir))
        return 0
    quiet_libp2p_logs()
    trio.run(run, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
