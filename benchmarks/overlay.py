"""Overlay-core benchmarks: connect, stream RPC, throughput, DHT lookup, gossip."""

from __future__ import annotations

import hashlib
import statistics
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from cocoon_p2p.core.identity import Identity
from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.node import ModelCapability, Node, NodeConfig
from cocoon_p2p.overlay.announcement import Announcement, Offer
from cocoon_p2p.overlay.directory import WorkerDirectory

from . import noise_baseline

ECHO = TProtocol("/cocoon/bench-echo/1")
SINK = TProtocol("/cocoon/bench-sink/1")
LOOPBACK = [Multiaddr("/ip4/127.0.0.1/tcp/0")]


def _cfg(**over: Any) -> NodeConfig:
    cfg = NodeConfig(announce_interval_s=1.0, announce_ttl_s=10.0)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


async def bench_connect(n: int) -> dict[str, float]:
    """Time to connect (TCP + Noise + yamux) to a fresh peer, ours vs py-libp2p defaults."""
    ours: list[float] = []
    stock: list[float] = []
    async with Node(_cfg()) as target:
        addr = info_from_p2p_addr(Multiaddr(target.addrs[0]))
        for _ in range(n):
            async with Node(_cfg()) as dialer:
                t = time.perf_counter()
                await dialer.connect(target.addrs[0])
                ours.append((time.perf_counter() - t) * 1000)
        for _ in range(max(3, n // 4)):
            host = new_host(key_pair=create_new_key_pair())
            async with host.run(LOOPBACK):
                t = time.perf_counter()
                await host.connect(addr)
                stock.append((time.perf_counter() - t) * 1000)
    return {
        "connect_ms_p50": statistics.median(ours),
        "connect_ms_p99": percentile(ours, 99),
        "connect_ms_p50_pylibp2p_default": statistics.median(stock),
    }


async def bench_stream_rpc(n: int) -> dict[str, float]:
    """New stream + protocol negotiation + 200 B round trip, on one connection."""
    async with Node(_cfg()) as a, Node(_cfg()) as b:

        async def echo(stream: Any) -> None:
            data = await stream.read(200)
            await stream.write(data)
            await stream.close()

        b.host.set_stream_handler(ECHO, echo)
        await a.connect(b.addrs[0])
        times = []
        for _ in range(n):
            t = time.perf_counter()
            s = await a.host.new_stream(ID(b.peer_id), [ECHO])
            await s.write(b"x" * 200)
            got = b""
            while len(got) < 200:
                got += await s.read(200 - len(got))
            await s.close()
            times.append((time.perf_counter() - t) * 1000)
    return {"rpc_ms_p50": statistics.median(times), "rpc_ms_p99": percentile(times, 99)}


CHUNK = 65536  # bytes per application write


async def bench_throughput(per_round: int, rounds: int) -> dict[str, float]:
    """One libp2p stream (Noise + yamux) vs bare trio + noiseprotocol XX, same bytes.

    The two alternate for ``rounds`` rounds and the medians are compared: this
    machine's speed drifts by 10-20% within a minute, which a single pair of
    runs, one after the other, reads as a difference between the stacks.
    """
    ours: list[float] = []
    base: list[float] = []
    async with Node(_cfg()) as a, Node(_cfg()) as b:
        got = [0]

        async def sink(stream: Any) -> None:
            while True:
                chunk = await stream.read(1 << 20)
                if not chunk:
                    break
                got[0] += len(chunk)
                if got[0] >= per_round:
                    got[0] -= per_round
                    await stream.write(b"ok")

        b.host.set_stream_handler(SINK, sink)
        await a.connect(b.addrs[0])
        s = await a.host.new_stream(ID(b.peer_id), [SINK])
        chunk = b"\x5a" * CHUNK
        for _ in range(rounds):
            t = time.perf_counter()
            sent = 0
            while sent < per_round:
                await s.write(chunk)
                sent += len(chunk)
            await s.read(2)
            ours.append(per_round / (time.perf_counter() - t) / 1e6)
            base.append((await noise_baseline.measure(per_round))["mb_per_s"])
        await s.close()
    return {
        "stream_mb_s": statistics.median(ours),
        "baseline_mb_s": statistics.median(base),
        "stream_vs_baseline": statistics.median(ours) / statistics.median(base),
        "stream_vs_baseline_min": min(o / b for o, b in zip(ours, base, strict=True)),
        "stream_vs_baseline_max": max(o / b for o, b in zip(ours, base, strict=True)),
    }


async def _network(stack: AsyncExitStack, n: int) -> list[Node]:
    first = await stack.enter_async_context(Node(_cfg()))
    nodes = [first]
    for _ in range(n - 1):
        nodes.append(await stack.enter_async_context(Node(_cfg(bootstrap=[first.addrs[0]]))))
    with trio.fail_after(60):
        while not all(x.pubsub and x.pubsub.peers for x in nodes):
            await trio.sleep(0.05)
    await trio.sleep(2)  # heartbeats: meshes form
    return nodes


async def bench_dht(n_peers: int, lookups: int) -> dict[str, float]:
    """Publish capability records from 3 workers, then time lookups from the others."""
    async with AsyncExitStack() as stack:
        nodes = await _network(stack, n_peers)
        model = hashlib.sha256(b"bench model").digest()
        for w in nodes[1:4]:
            w.set_capabilities([ModelCapability(model_id=model, backend="onnxruntime", price_nanoton=1, unit="item")])
        with trio.fail_after(60):
            while sum(w.dht.stats.records_published for w in nodes[1:4]) < 3:
                await trio.sleep(0.05)
        times, found = [], []
        for i in range(lookups):
            client = nodes[4 + i % (n_peers - 4)]
            client.directory.forget(b"")  # keep gossip out: measure the DHT path alone
            t = time.perf_counter()
            records = await _dht_only(client, model)
            times.append((time.perf_counter() - t) * 1000)
            found.append(records)
    return {
        "dht_lookup_ms_p50": statistics.median(times),
        "dht_lookup_ms_p99": percentile(times, 99),
        "dht_workers_found_min": min(found),
        "dht_peers": n_peers,
    }


async def _dht_only(node: Node, model: bytes) -> int:
    return len(await node.dht.lookup(model))


async def bench_gossip(n_peers: int, rate: float, seconds: float) -> dict[str, float]:
    """One publisher at ``rate`` msg/s; delivery count and latency at every other peer."""
    topic = "/cocoon/bench/1"
    async with AsyncExitStack() as stack:
        nodes = await _network(stack, n_peers)
        subs = [await n.subscribe(topic, queue_size=4096) for n in nodes]
        # Measure the steady state: every mesh holds at least D_lo peers (heartbeats graft).
        t0 = trio.current_time()
        want = min(4, n_peers - 1)
        with trio.move_on_after(60):
            while min(len(n.pubsub.router.mesh.get(topic, ())) for n in nodes if n.pubsub) < want:  # type: ignore[attr-defined]
                await trio.sleep(0.1)
        mesh_ready_s = trio.current_time() - t0
        latencies: list[float] = []
        count = int(rate * seconds)

        async def collect(sub: Any) -> None:
            while True:
                _origin, data = await sub.receive()
                latencies.append((time.time() - float(data.split(b"|")[1])) * 1000)

        cpu0 = time.process_time()
        async with trio.open_nursery() as nursery:
            for sub in subs[1:]:
                nursery.start_soon(collect, sub)
            start = trio.current_time()
            for i in range(count):
                await trio.sleep_until(start + i / rate)
                await nodes[0].publish(topic, f"{i}|{time.time()!r}".encode())
            with trio.move_on_after(10):
                while len(latencies) < count * (n_peers - 1):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        cpu = time.process_time() - cpu0
        expected = count * (n_peers - 1)
    return {
        f"gossip_{int(rate)}_delivered": len(latencies) / expected,
        f"gossip_{int(rate)}_ms_p50": statistics.median(latencies) if latencies else -1,
        f"gossip_{int(rate)}_ms_p99": percentile(latencies, 99) if latencies else -1,
        f"gossip_{int(rate)}_messages": expected,
        f"gossip_{int(rate)}_mesh_ready_s": mesh_ready_s,
        # All peers share this one process: CPU per delivered message says where the
        # latency comes from once the interpreter is saturated.
        f"gossip_{int(rate)}_cpu_ms_per_delivery": cpu * 1000 / max(len(latencies), 1),
    }


async def bench_directory(workers: int, rounds: int) -> dict[str, float]:
    """A gateway's view of ``workers`` workers of one model, a load announcement arriving
    between two jobs' lookups (``workers_for``): ours patches that worker's row; the
    baseline, the directory before (every row rebuilt after any change), is the same
    directory with its cache dropped. Alternating rounds, the same announcements."""
    model = hashlib.sha256(b"bench-model").digest()
    idents = [Identity(hashlib.sha256(i.to_bytes(4, "big")).digest()) for i in range(workers)]
    offer = Offer(model_id=model, backend="onnxruntime", gpu="cpu", price_nanoton=1000, unit="item", capacity=8,
                  free_capacity=8)  # fmt: skip
    now = 1_790_000_000_000

    def ann(i: int, t: int, running: int) -> Announcement:
        addr = f"/ip4/10.0.0.1/tcp/4001/p2p/{idents[i].peer_id_str}"
        return Announcement.create(idents[i], now_ms=t, ttl_ms=60_000, addrs=(addr,), offers=(offer,),
                                   running_jobs=running)  # fmt: skip

    d = WorkerDirectory(min_interval_ms=0, max_workers=2 * workers)
    for i in range(workers):
        d.accept(ann(i, now, 0), origin=None, now_ms=now)
    loads = [ann(i % workers, now + 1 + i, i % 8) for i in range(2 * rounds)]
    ours: list[float] = []
    rebuilt: list[float] = []
    for r, load in enumerate(loads):
        t_ms = load.issued_at_ms
        t = time.perf_counter()
        d.accept(load, origin=None, now_ms=t_ms)
        if r % 2:
            d._offers.clear()  # the baseline: nothing kept across a change
        offers = d.workers_for(model, now_ms=t_ms)
        (rebuilt if r % 2 else ours).append((time.perf_counter() - t) * 1e6)
        assert len(offers) == workers
    return {
        f"directory_{workers}_us_p50": statistics.median(ours),
        f"directory_{workers}_us_p50_rebuilt": statistics.median(rebuilt),
        f"directory_{workers}_speedup": statistics.median(rebuilt) / statistics.median(ours),
    }


BENCHES: list[tuple[str, Callable[[bool], Any]]] = [
    ("directory_3000", lambda quick: bench_directory(3000, 50 if quick else 300)),
    ("connect", lambda quick: bench_connect(10 if quick else 40)),
    ("stream_rpc", lambda quick: bench_stream_rpc(100 if quick else 500)),
    ("throughput", lambda quick: bench_throughput(16 << 20, 3 if quick else 15)),
    ("dht_20", lambda quick: bench_dht(20, 10 if quick else 30)),
    ("gossip_20_at_10", lambda quick: bench_gossip(20, 10, 3 if quick else 10)),
    ("gossip_20_at_100", lambda quick: bench_gossip(20, 100, 2 if quick else 5)),
]
