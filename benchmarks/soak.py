"""Soak: a paid local network under steady load, with churn and attackers, for a long time.

    python -m benchmarks.soak [--minutes 30] [--workers 3] [--load 0.7] [--quick]

Starts the local TON chain, a bootstrap peer and ``--workers`` MiniLM workers
(``cocoon-node`` processes, capacity 4, paid by voucher), measures what they
serve at full concurrency, then sends embedding jobs from an honest paying
client as a Poisson stream at ``--load`` of that, while

* churn: every ``--churn-every-s`` a random worker is SIGKILLed and restarted
  from its data directory a few seconds later;
* attackers, every ``--attack-every-s``: a throwaway identity publishes garbage
  announcements; a paying client writes ~2,000 pipelined job requests in one
  write on a job stream, then sends a job of 256 texts of 30,000 characters;
  and a cheap black-hole worker accepts job streams and never answers, all along.

Every ``--sample-s`` it records, per minute: jobs ok and failed, p50/p99
latency, and each worker's resident memory. At the end it stops the workers and
audits the money channel by channel: the newest voucher each client (the honest
one and the paying attacker) wrote to its ``issued.log``, the total each worker
acknowledged, and the vouchers the workers hold on disk (``cocoon-node status``'s
reading of their data directories). Money is lost when a worker acknowledged more
than it holds, paid twice when it holds more than was signed; vouchers signed and
not yet acknowledged stay in the client's log and are resent on its next
connection. Writes ``benchmarks/results/soak.json`` and ``soak.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cocoon_p2p.nodes import status as status_mod
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.execution.export import ensure_minilm
from cocoon_p2p.jobs import JobFailed
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.node import ModelCapability, Node, NodeConfig
from cocoon_p2p.overlay import protocols
from cocoon_p2p.payments.service import PaymentConfig
from cocoon_p2p.payments.settlement import SettlementPolicy
from cocoon_p2p.payments.voucherlog import VoucherLog
from cocoon_p2p.payments.vouchers import SignedSemiChannel
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain
from cocoon_p2p.testing.processes import NODE_CLI, start_process
from cocoon_p2p.transport.host import quiet_libp2p_logs

OUT = Path(__file__).parent / "results"
PRICE = 1_000
SENTENCE = "A decentralized network pays GPU owners for inference."
CLIENT_FUNDS = 50_000_000_000


@dataclass
class Job:
    t: float
    ok: bool
    latency_ms: float
    code: str = ""


@dataclass
class Soak:
    args: argparse.Namespace
    root: Path
    chain: LocalChain
    jobs: list[Job] = field(default_factory=list)
    memory: list[dict[str, float]] = field(default_factory=list)  # t, then RSS MB per worker
    events: list[str] = field(default_factory=list)
    workers: list[trio.Process] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    attacker: Node | None = None  # a paying client too: its paid jobs count in the audit

    def log(self, msg: str) -> None:
        line = f"[soak {time.perf_counter() - self.t0:7.1f} s] {msg}"
        self.events.append(line)
        print(line, file=sys.stderr, flush=True)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


async def _sample_memory(s: Soak) -> None:
    while True:
        row = {"t": time.perf_counter() - s.t0}
        for i, proc in enumerate(s.workers):
            row[f"w{i}"] = _rss_mb(proc.pid) if proc.returncode is None else math.nan
        s.memory.append(row)
        await trio.sleep(s.args.sample_s)


async def _churn(s: Soak, nursery: trio.Nursery) -> None:
    rng = random.Random(1)
    while True:
        await trio.sleep(s.args.churn_every_s)
        i = rng.randrange(len(s.workers))
        s.log(f"churn: SIGKILL worker {i}")
        s.workers[i].send_signal(signal.SIGKILL)
        await trio.sleep(3)
        s.workers[i], _ = await start_process(s.commands[i], nursery)
        s.log(f"churn: worker {i} restarted from its data directory")


async def _one_job(s: Soak, client: Node, model_id: bytes) -> None:
    t = time.perf_counter()
    try:
        await client.infer(model_id, texts=(SENTENCE,), max_price_nanoton=PRICE * 2, timeout_s=10)
        s.jobs.append(Job(t - s.t0, True, (time.perf_counter() - t) * 1000))
    except JobFailed as exc:
        s.jobs.append(Job(t - s.t0, False, (time.perf_counter() - t) * 1000, exc.code))


async def _capacity(s: Soak, client: Node, model_id: bytes, seconds: float) -> float:
    """Jobs/s the workers serve at full concurrency (4 per worker), closed loop."""
    done = 0
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as n:

            async def lane() -> None:
                nonlocal done
                while True:
                    try:
                        await client.infer(model_id, texts=(SENTENCE,), max_price_nanoton=PRICE * 2)
                        done += 1
                    except JobFailed:
                        await trio.sleep(0.05)

            for _ in range(4 * s.args.workers):
                n.start_soon(lane)
    return done / seconds


async def _load(s: Soak, client: Node, model_id: bytes, rate: float, until: float) -> None:
    rng = random.Random(2)
    async with trio.open_nursery() as n:
        while time.perf_counter() < until:
            await trio.sleep(rng.expovariate(rate))
            n.start_soon(_one_job, s, client, model_id)


async def _attack(s: Soak, boot: str, model_id: bytes) -> None:
    """Garbage gossip from a fresh identity; a pipelined flood and a huge job from a paying client."""
    wallet = await trio.to_thread.run_sync(s.chain.new_wallet, CLIENT_FUNDS // 10)
    pay = PaymentConfig(s.chain, wallet, s.root / "attacker", policy=SettlementPolicy(deposit_nanoton=10**8))
    async with Node(NodeConfig(bootstrap=[boot], payments=pay)) as mallory:
        s.attacker = mallory
        while True:
            await trio.sleep(s.args.attack_every_s)
            async with Node(NodeConfig(bootstrap=[boot])) as throwaway:
                with trio.move_on_after(5):
                    while not throwaway.connected_peers():
                        await trio.sleep(0.1)
                for _ in range(20):
                    await throwaway.publish(protocols.ANNOUNCE_TOPIC, random.randbytes(200))
            s.log("attack: 20 garbage announcements from a fresh identity")
            try:  # a paid job first: the attacker has a channel like any client
                r = await mallory.infer(model_id, texts=(SENTENCE,), max_price_nanoton=PRICE * 2, timeout_s=10)
                requests = b"".join(
                    jf.encode_frame(
                        jf.JobRequest(job_id=i + 1, model_id=model_id, texts=(SENTENCE,),
                                      deadline_ms=2**40, max_price_nanoton=PRICE * 2)
                    )
                    for i in range(2000)
                )  # fmt: skip
                stream = await mallory.host.new_stream(ID(r.worker), [TProtocol(jf.JOB_PROTOCOL)])
                await stream.write(requests)
                await trio.sleep(1)
                await stream.reset()
                s.log("attack: 2,000 pipelined job requests in one write")
                with trio.move_on_after(60):
                    await mallory.infer(model_id, texts=tuple("x" * 30_000 for _ in range(256)),
                                        max_price_nanoton=PRICE * 2, timeout_s=30)  # fmt: skip
                s.log("attack: a job of 256 texts of 30,000 characters")
            except Exception as exc:  # refusals are the point; the soak goes on
                s.log(f"attack: {type(exc).__name__}: {str(exc)[:120]}")


async def _black_hole(boot: str, model_id: bytes) -> None:
    """A cheap worker that takes job streams and never answers."""
    async with Node(NodeConfig(bootstrap=[boot], announce_interval_s=2)) as hole:

        async def swallow(stream: Any) -> None:
            while await stream.read(1 << 16):
                pass

        hole.host.set_stream_handler(TProtocol(jf.JOB_PROTOCOL), swallow)
        hole.set_capabilities(
            [
                ModelCapability(
                    model_id=model_id, backend="onnxruntime", price_nanoton=PRICE // 10, unit="item", capacity=8
                )
            ]
        )
        await trio.sleep_forever()


async def run(args: argparse.Namespace, root: Path, chain: LocalChain) -> dict[str, Any]:
    s = Soak(args, root, chain)
    spec = ensure_minilm()
    async with trio.open_nursery() as nursery:
        try:
            boot, boot_addrs = await start_process([*NODE_CLI, "bootstrap", "--data-dir", str(root / "boot")], nursery)
            for i in range(args.workers):
                cmd = [*NODE_CLI, "worker", "--data-dir", str(root / f"w{i}"), "--bootstrap", boot_addrs[0],
                       "--model", "minilm", "--capacity", "4", "--price-nanoton", str(PRICE), "--announce-interval-s",
                       "2", "--chain", chain.endpoint, "--local-chain", "--log-level", "WARNING"]  # fmt: skip
                proc, _ = await start_process(cmd, nursery)
                s.workers.append(proc)
                s.commands.append(cmd)
            s.log(f"{args.workers} workers up")
            wallet = await trio.to_thread.run_sync(chain.new_wallet, CLIENT_FUNDS)
            pay = PaymentConfig(chain, wallet, root / "client", policy=SettlementPolicy(deposit_nanoton=10**9))
            async with Node(NodeConfig(bootstrap=boot_addrs, payments=pay)) as client:
                with trio.fail_after(60):
                    while len(await client.find_workers(spec.model_id, use_dht=False)) < args.workers:
                        await trio.sleep(0.2)
                capacity = await _capacity(s, client, spec.model_id, 15 if args.quick else 30)
                rate = args.load * capacity
                s.log(f"capacity {capacity:.0f} jobs/s; load {rate:.0f} jobs/s for {args.minutes} min")
                s.t0 = time.perf_counter()
                async with trio.open_nursery() as side:
                    side.start_soon(_sample_memory, s)
                    side.start_soon(_churn, s, nursery)
                    side.start_soon(_attack, s, boot_addrs[0], spec.model_id)
                    side.start_soon(_black_hole, boot_addrs[0], spec.model_id)
                    await _load(s, client, spec.model_id, rate, time.perf_counter() + args.minutes * 60)
                    side.cancel_scope.cancel()
                clients = [c.job_client for c in (client, s.attacker) if c is not None and c.job_client is not None]
                paid = sum(c.stats.paid_nanoton for c in clients)
                pending = sum(c.payments_late for c in clients)
                acked = {
                    ch.issuer.channel_id: ch.acked
                    for node in (client, s.attacker)
                    if node is not None and node.payments is not None
                    for ch in node.payments.payer.channels.values()
                }
        finally:
            for proc in [*s.workers, boot]:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGKILL)
            nursery.cancel_scope.cancel()
    money = _audit(root, args.workers, acked)
    return _report(s, capacity, rate, paid=paid, pending=pending, money=money)


def _audit(root: Path, workers: int, acked: dict[int, int]) -> dict[str, int]:
    """The money, channel by channel: signed (clients' logs), acknowledged, held (workers' disks)."""
    signed: dict[int, int] = {}
    for name in ("client", "attacker"):
        path = root / name / "issued.log"
        if path.is_file():
            log = VoucherLog(path, read_only=True)
            for record in log.records:  # in order: the last one per channel is its total
                v = SignedSemiChannel.from_record(record)
                signed[v.state.channel_id] = v.state.body.sent
            log.close()
    held: dict[int, int] = {}
    for i in range(workers):
        for c in status_mod.collect(root / f"w{i}")["worker_channels"]:
            held[int(c["channel_id"], 16)] = c["earned_nanoton"]
    out = {"channels": 0, "signed_nanoton": 0, "held_nanoton": 0, "lost_nanoton": 0, "paid_twice_nanoton": 0,
           "unacknowledged_nanoton": 0}  # fmt: skip
    for cid in signed.keys() | held.keys():
        s, h, a = signed.get(cid, 0), held.get(cid, 0), acked.get(cid, 0)
        out["channels"] += 1
        out["signed_nanoton"] += s
        out["held_nanoton"] += h
        out["lost_nanoton"] += max(0, a - h)  # acknowledged as durable, yet not on the worker's disk
        out["paid_twice_nanoton"] += max(0, h - s)  # held beyond anything the client signed
        out["unacknowledged_nanoton"] += max(0, s - max(a, h))  # in the client's log, resent on reconnect
    return out


def _report(s: Soak, capacity: float, rate: float, *, paid: int, pending: int, money: dict[str, int]) -> dict[str, Any]:
    minutes = []
    for m in range(int(s.args.minutes)):
        window = [j for j in s.jobs if m * 60 <= j.t < (m + 1) * 60]
        ok = sorted(j.latency_ms for j in window if j.ok)
        mem = [r for r in s.memory if m * 60 <= r["t"] < (m + 1) * 60]
        minutes.append(
            {
                "minute": m + 1,
                "jobs_ok": len(ok),
                "jobs_failed": len(window) - len(ok),
                "p50_ms": percentile(ok, 50),
                "p99_ms": percentile(ok, 99),
                "rss_mb_max": max((v for r in mem for k, v in r.items() if k != "t" and not math.isnan(v)), default=0),
            }
        )
    ok_all = sorted(j.latency_ms for j in s.jobs if j.ok)
    failed: dict[str, int] = {}
    for j in s.jobs:
        if not j.ok:
            failed[j.code] = failed.get(j.code, 0) + 1
    return {
        "minutes": s.args.minutes,
        "workers": s.args.workers,
        "capacity_jobs_per_s": capacity,
        "offered_jobs_per_s": rate,
        "jobs_ok": len(ok_all),
        "jobs_failed": sum(failed.values()),
        "failed_by_code": failed,
        "latency_ms_p50": percentile(ok_all, 50),
        "latency_ms_p99": percentile(ok_all, 99),
        "paid_by_clients_nanoton": paid,  # acknowledged payments the job clients counted
        "payments_pending": pending,
        "vouchers": money,
        "money_lost_nanoton": money["lost_nanoton"] + money["paid_twice_nanoton"],
        "per_minute": minutes,
        "memory": s.memory,
        "events": s.events,
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    keys = sorted({k for r in result["memory"] for k in r if k != "t"})
    for k in keys:
        a.plot([r["t"] / 60 for r in result["memory"]], [r.get(k, math.nan) for r in result["memory"]], label=k)
    a.set_ylabel("worker RSS (MB)")
    a.legend()
    mins = [m["minute"] for m in result["per_minute"]]
    b.plot(mins, [m["p99_ms"] for m in result["per_minute"]], label="p99")
    b.plot(mins, [m["p50_ms"] for m in result["per_minute"]], label="p50")
    b.set_ylabel("latency (ms)")
    b.set_xlabel("minute")
    b.legend()
    fig.suptitle(
        f"soak: {result['jobs_ok']} jobs ok, {result['jobs_failed']} failed, lost {result['money_lost_nanoton']}"
    )
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--load", type=float, default=0.7, help="share of the measured capacity to offer")
    ap.add_argument("--churn-every-s", type=float, default=180)
    ap.add_argument("--attack-every-s", type=float, default=60)
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--quick", action="store_true", help="3 minutes, churn and attacks every 40 s")
    ap.add_argument("--out", type=Path, default=OUT / "soak.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes, args.churn_every_s, args.attack_every_s = 3, 40, 40
    quiet_libp2p_logs()
    with tempfile.TemporaryDirectory() as tmp, open_local_chain() as chain:
        result = trio.run(run, args, Path(tmp), chain)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    _plot(result, args.out.with_suffix(".png"))
    width = max(len(k) for k in result)
    for key, value in result.items():
        if key not in ("per_minute", "memory", "events"):
            print(f"{key:{width}}  {value}")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if result["money_lost_nanoton"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
