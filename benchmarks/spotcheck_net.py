"""The network of the spot-check benchmark (:mod:`benchmarks.spotchecks`): worker processes
and fresh clients, with a record of every run a client gets back.

A worker is a :class:`~cocoon_p2p.node.Node` in a process of its own, as workers run (the
client's event loop never waits on a worker's model): ``python -m benchmarks.spotcheck_net
MODEL... [--bootstrap ADDR] [--cheat-rate R]`` prints its address, then ``serving``, serves
until its stdin closes, then prints one JSON line of what it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import RateLimited, ReplayedMessage
from cocoon_p2p.core.identity import peer_id_from_str
from cocoon_p2p.execution.backends import Backend
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2
from cocoon_p2p.execution.generation import chatml_prompt
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.jobs.checks import CaughtCheating, CheatReport
from cocoon_p2p.jobs.client import JobClient, JobFailed
from cocoon_p2p.jobs.frames import JobResult
from cocoon_p2p.jobs.receipts import Receipt
from cocoon_p2p.jobs.spotcheck import SpotCheckPolicy
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.overlay.directory import WorkerOffer
from cocoon_p2p.overlay.peerscore import PENALTIES, RELAY_EXCUSED
from cocoon_p2p.overlay.protocols import INFO_PROTOCOL
from cocoon_p2p.testing.cheating import CheatingBackend
from cocoon_p2p.transport.host import quiet_libp2p_logs

PRICE = 1
MODELS = ("minilm", "smollm2")


@dataclass
class LoopLag:
    """How late a 0.1 s sleep wakes up in this process: the event loop's worst delay
    (gossip that waits that long may arrive expired)."""

    worst_s: float = 0.0
    over_1s: int = 0

    async def watch(self) -> None:
        while True:
            t = trio.current_time()
            await trio.sleep(0.1)
            late = trio.current_time() - t - 0.1
            self.worst_s = max(self.worst_s, round(late, 3))
            self.over_1s += late > 1.0


def ignore_stale_gossip() -> None:
    """Stop scoring stale gossip (expired, replayed, over its rate) in this process.

    On a loaded 2-core machine, py-libp2p's replays and late deliveries got honest workers
    banned by fresh clients within seconds (and once the cheater, before its first job):
    an overlay matter, reported, that would decide who gets the jobs here. What this
    benchmark measures, a wrong result costing a ban, is scored as ever."""
    for code in RELAY_EXCUSED:
        PENALTIES[code] = 0.0


async def serve_worker(models: list[str], bootstrap: str | None, cheat_rate: float) -> None:
    """A worker process: print its address as soon as it listens, then ``serving`` once it
    serves ``models`` (one onnxruntime thread each); serve until stdin closes, then print
    what it ran as one JSON line. It judges no fraud proofs: a ban stays with the client
    that caught the cheater."""
    quiet_libp2p_logs()
    ignore_stale_gossip()
    # Fresh clients ask for the announcement (/cocoon/info/1); a long lifetime keeps one that
    # a busy machine delivered late from counting as expired against its sender.
    cfg = NodeConfig(bootstrap=[bootstrap] if bootstrap else [], announce_interval_s=5.0, announce_ttl_s=120)
    cfg.job_capacity, cfg.watch_fraud = 64, False
    cheats: list[CheatingBackend] = []

    def load() -> list[tuple[ModelSpec, Backend]]:
        served: list[tuple[ModelSpec, Backend]] = []
        for name in models:
            spec = ensure_minilm() if name == "minilm" else ensure_smollm2()
            backend: Backend = OnnxRuntimeBackend(spec.path, threads=1)
            if cheat_rate and spec.kind == "embedding":
                cheats.append(CheatingBackend(backend, rate=cheat_rate, seed=18))
                backend = cheats[-1]
            served.append((spec, backend))
        return served

    lag = LoopLag()
    async with Node(cfg) as node, trio.open_nursery() as nursery:
        print(node.addrs[0], flush=True)  # the others may join through us while we load
        for spec, backend in await trio.to_thread.run_sync(load):  # not on the event loop: seconds
            node.serve_model(spec, backend, price_nanoton=PRICE)
        print("serving", flush=True)
        nursery.start_soon(lag.watch)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the benchmark closes our stdin
        jobs = node.job_worker.stats.jobs_ok if node.job_worker else 0
        lies = sum(c.cheated_runs for c in cheats)
        said = {"peer": node.peer_id_str, "models": models, "cheat_rate": cheat_rate, "jobs_ok": jobs, "lied_on": lies}
        said["loop_lag"] = asdict(lag)
        print(json.dumps(said), flush=True)
        nursery.cancel_scope.cancel()


async def _line(stream: trio.abc.ReceiveStream) -> str:
    """One line of a worker's stdout (a byte at a time: nothing past it is consumed)."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)
        if not chunk:
            raise RuntimeError("a worker process exited early")
        line += chunk
    return line.decode().strip()


@dataclass(frozen=True)
class Worker:
    """A worker process: its address, PeerId and the models it serves."""

    proc: trio.Process
    addr: str
    peer: bytes
    models: tuple[bytes, ...]


@dataclass
class Network:
    """Worker processes; the first started is everyone's bootstrap peer. ``final``: what
    each said of its jobs as it stopped."""

    workers: list[Worker] = field(default_factory=list)
    bootstrap: str = ""
    cheater: bytes | None = None
    final: list[dict[str, Any]] = field(default_factory=list)
    procs: list[trio.Process] = field(default_factory=list)
    _listening: trio.Event = field(default_factory=trio.Event)  # the bootstrap peer's address is known

    def serving(self, model: bytes) -> list[bytes]:
        """The running workers that serve ``model``."""
        return [w.peer for w in self.workers if model in w.models]

    async def start(self, specs: list[ModelSpec], *, cheat_rate: float = 0.0) -> None:
        """Start a worker serving ``specs`` (lying on ``cheat_rate`` of its embedding runs);
        return once it serves. Workers started together load their models together."""
        first = not self.procs
        names = ["minilm" if spec.kind == "embedding" else "smollm2" for spec in specs]
        cmd = [sys.executable, "-m", "benchmarks.spotcheck_net", *names, "--cheat-rate", str(cheat_rate)]
        if not first:
            await self._listening.wait()
            cmd += ["--bootstrap", self.bootstrap]
        proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.procs.append(proc)
        assert proc.stdout is not None
        with trio.fail_after(300):  # loading the models, on a busy machine
            addr = await _line(proc.stdout)
            if first:
                self.bootstrap = addr
                self._listening.set()
            if await _line(proc.stdout) != "serving":
                raise RuntimeError(f"worker {addr} did not start serving")
        peer = peer_id_from_str(addr.rsplit("/p2p/", 1)[1])
        self.workers.append(Worker(proc, addr, peer, tuple(spec.model_id for spec in specs)))
        if cheat_rate:
            self.cheater = peer

    async def stop(self, peer: bytes) -> None:
        """Stop a worker and keep what it said of its jobs."""
        proc = next(w.proc for w in self.workers if w.peer == peer)
        self.workers = [w for w in self.workers if w.peer != peer]
        assert proc.stdin is not None and proc.stdout is not None
        await proc.stdin.aclose()
        with trio.move_on_after(30):
            self.final.append(json.loads(await _line(proc.stdout)))
            await proc.wait()


@asynccontextmanager
async def open_network() -> AsyncIterator[Network]:
    """An empty network; every worker started in it is stopped (killed if it must) on exit."""
    ignore_stale_gossip()  # for the clients, in this process
    net = Network()
    try:
        yield net
        async with trio.open_nursery() as nursery:
            for w in list(net.workers):
                nursery.start_soon(net.stop, w.peer)
    finally:
        for proc in net.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


class _Condemned:
    """The spot checks' report port, noting whom they found wrong before passing it on."""

    def __init__(self, inner: CheatReport | None) -> None:
        self.inner = inner
        self.workers: list[bytes] = []

    async def caught(self, cheat: CaughtCheating) -> None:
        self.workers.append(cheat.wrong.worker)
        if self.inner is not None:
            await self.inner.caught(cheat)


class RunLog:
    """Every run a client's jobs and checks got back, recorded where they all pass
    (``JobClient.run_on``): counts per worker, and each request's runs, keyed by the
    identity of its texts tuple (which a job and its check share); and whom its spot
    checks found wrong (``condemned``)."""

    def __init__(self, client: JobClient) -> None:
        self.condemned: list[bytes] = []
        if client.checks is not None:
            report = client.checks.report = _Condemned(client.checks.report)
            self.condemned = report.workers
        self.per_worker: Counter[bytes] = Counter()
        self.failures: Counter[tuple[str, bytes]] = Counter()  # runs that failed, by error code and worker
        self.by_request: dict[int, list[tuple[JobResult, bool]]] = defaultdict(list)  # (result, a verify job)
        inner = client.run_on

        async def run_on(offer: WorkerOffer, **kw: Any) -> tuple[JobResult, int, Receipt | None]:
            try:
                out = await inner(offer, **kw)
            except JobFailed as exc:
                self.failures[exc.code, offer.peer_id] += 1
                raise
            self.per_worker[offer.peer_id] += 1
            self.by_request[id(kw.get("texts"))].append((out[0], bool(kw.get("verify_tokens"))))
            return out

        setattr(client, "run_on", run_on)  # noqa: B010 (an instance attribute over the method)

    def failed_runs(self, net: Network) -> dict[str, int]:
        """Runs that failed, by error code and by whom: the cheater, an honest worker, or
        one no longer running."""

        def who(peer: bytes) -> str:
            running = any(w.peer == peer for w in net.workers)
            return "cheater" if peer == net.cheater else "honest" if running else "gone"

        out: Counter[str] = Counter()
        for (code, peer), n in self.failures.items():
            out[f"{code} ({who(peer)})"] += n
        return dict(out)


@asynccontextmanager
async def open_client(net: Network, model: bytes, *, rate: float, seed: int) -> AsyncIterator[tuple[Node, RunLog]]:
    """A fresh client (new PeerId) checking ``rate`` of its jobs, once it knows every worker."""
    cfg = NodeConfig(bootstrap=[net.bootstrap], spot_checks=SpotCheckPolicy(rate=rate), seed=seed)
    cfg.watch_fraud = False
    want = set(net.serving(model))
    async with Node(cfg) as client:
        with trio.fail_after(60):
            for w in net.workers:  # their announcements now, not at their next round
                await client.connect(w.addr)
                stream = await client.host.new_stream(ID(w.peer), [TProtocol(INFO_PROTOCOL)])
                data = b""
                with contextlib.suppress(StreamEOF):  # the worker's FIN ends its answer
                    while chunk := await stream.read(1 << 16):
                        data += chunk
                await stream.close()
                with contextlib.suppress(ReplayedMessage, RateLimited):  # gossip brought it first
                    client.directory.receive_announcement(data, origin=w.peer, now_ms=now_ms())
            while want - {o.peer_id for o in client.directory.workers_for(model, now_ms=now_ms())}:
                await trio.sleep(0.05)
        # A stopped worker's last announcement still circulates a while: a client would lose
        # one job to it and then forget it; we forget it first.
        for offer in client.directory.workers_for(model, now_ms=now_ms()):
            if offer.peer_id not in want:
                client.directory.forget(offer.peer_id)
        assert client.job_client is not None
        yield client, RunLog(client.job_client)


async def warm_verifiers(net: Network, spec: ModelSpec) -> None:
    """A verify job on each worker, untimed: a worker builds its verifier on its first."""
    async with open_client(net, spec.model_id, rate=0.0, seed=0) as (client, _):
        assert client.job_client is not None
        prompt = chatml_prompt([{"role": "user", "content": "Say hello."}])
        run = partial(client.job_client.run_on, model_id=spec.model_id, texts=(prompt,), max_tokens=4, max_price=PRICE)
        async with trio.open_nursery() as nursery:
            for offer in client.directory.workers_for(spec.model_id, now_ms=now_ms()):
                nursery.start_soon(partial(run, offer, deadline_ms=now_ms() + 300_000, verify_tokens=(1, 2)))


def check_counters(client: Node, workers: list[bytes]) -> dict[str, int]:
    """A client's spot-check counters, and how many of ``workers`` it has banned."""
    c = client.job_client.checks if client.job_client else None
    assert c is not None
    banned = sum(client.guard.is_banned(p) for p in workers)
    return {"checks": c.checks, "failed": c.failed, "skipped": c.skipped, "honest_banned": banned}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.spotcheck_net", description="a benchmark worker")
    ap.add_argument("models", nargs="+", choices=MODELS)
    ap.add_argument("--bootstrap", help="the peer to join through (none: this is the first)")
    ap.add_argument("--cheat-rate", type=float, default=0.0, help="lie on this share of embedding runs")
    args = ap.parse_args(argv)
    trio.run(serve_worker, args.models, args.bootstrap, args.cheat_rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
