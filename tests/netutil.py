"""Helpers for tests that run real peers on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

import trio
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.validator import BlankValidator
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from cocoon_p2p.core.identity import Identity
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.overlay import protocols
from cocoon_p2p.transport.host import build_host


def fast_config(**over: object) -> NodeConfig:
    cfg = NodeConfig(announce_interval_s=0.5, announce_ttl_s=10, quiet_logs=True)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


@asynccontextmanager
async def open_nodes(n: int, **over: object) -> AsyncIterator[list[Node]]:
    """``n`` nodes; the first is the bootstrap peer of the others."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(Node(fast_config(**over)))
        nodes = [first]
        for _ in range(n - 1):
            nodes.append(await stack.enter_async_context(Node(fast_config(bootstrap=[first.addrs[0]], **over))))
        await wait_for(lambda: all(len(x.connected_peers()) >= 1 and x.pubsub and x.pubsub.peers for x in nodes))
        yield nodes


async def wait_for(cond: Callable[[], bool], timeout: float = 15.0, step: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(step)


@asynccontextmanager
async def open_raw_peer(ident: Identity) -> AsyncIterator[tuple[object, Pubsub, KadDHT]]:
    """A bare libp2p peer with gossipsub and a DHT that accepts anything under
    /cocoon/: the tool of a misbehaving peer, which skips our checks."""
    host = build_host(ident)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
        gs = GossipSub(
            protocols=[protocols.GOSSIPSUB_PROTOCOL],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,
            spam_protection_enabled=False,
        )
        pubsub = Pubsub(host, gs)
        await stack.enter_async_context(background_trio_service(pubsub))
        await stack.enter_async_context(background_trio_service(gs))
        dht = KadDHT(host, DHTMode.SERVER)
        dht.register_validator(protocols.DHT_NAMESPACE, BlankValidator())
        await stack.enter_async_context(background_trio_service(dht))
        await pubsub.wait_until_ready()
        yield host, pubsub, dht


def stop_processes(procs: Iterable[subprocess.Popen[str]], *, timeout_s: float = 30) -> None:
    """SIGTERM each process still running (a node settles and exits), SIGKILL it after ``timeout_s``."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
