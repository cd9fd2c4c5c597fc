"""Real peers on 127.0.0.1: py-libp2p hosts with TCP, Noise and yamux."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
import textwrap

import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network import swarm as libp2p_swarm
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from multiaddr import Multiaddr

from cocoon_p2p.core.identity import Identity
from cocoon_p2p.node import ModelCapability, Node, PeerBanned, WorkerSeen
from cocoon_p2p.overlay import capability, protocols

from .helpers import announcement, record
from .netutil import fast_config, open_nodes, open_raw_peer, wait_for

MODEL = hashlib.sha256(b"test model").digest()
CAP = ModelCapability(model_id=MODEL, backend="onnxruntime", price_nanoton=1500, unit="item", capacity=2)


async def test_connect_does_not_wait_for_happy_eyeballs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Make py-libp2p's fixed post-dial wait an hour: a connect that completes at
    # all proves our host does not sit out that wait after a successful dial.
    monkeypatch.setattr(libp2p_swarm, "_HAPPY_EYEBALLS_DELAY", 3600.0)
    async with Node(fast_config()) as a, Node(fast_config()) as b:
        with trio.fail_after(20):
            assert await a.connect(b.addrs[0]) == b.peer_id
        # Control: a host with py-libp2p's default connection settings does wait.
        kp = create_new_key_pair()
        plain = new_host(key_pair=kp)
        async with plain.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with trio.move_on_after(3) as scope:
                await plain.connect(info_from_p2p_addr(Multiaddr(b.addrs[0])))
            assert scope.cancelled_caught


async def test_identity_persists_across_restart(tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = tmp_path / "node.key"
    async with Node(fast_config(key_file=key)) as first:
        pid = first.peer_id_str
        assert all(a.endswith(f"/p2p/{pid}") for a in first.addrs)
    async with Node(fast_config(key_file=key)) as second:
        assert second.peer_id_str == pid


async def test_identify_advertises_cocoon_protocols() -> None:
    async with Node(fast_config()) as a, Node(fast_config()) as b:
        await a.connect(b.addrs[0])

        def seen() -> list[str]:
            try:
                return list(a.host.get_peerstore().get_protocols(ID(b.peer_id)))
            except Exception:
                return []

        await wait_for(lambda: protocols.INFO_PROTOCOL in seen())
        assert protocols.GOSSIPSUB_PROTOCOL in seen()
        assert any(p.startswith("/ipfs/kad/") for p in seen())


async def test_plaintext_peers_cannot_connect() -> None:
    async with Node(fast_config()) as node:
        kp = create_new_key_pair()
        insecure = new_host(key_pair=kp, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(kp)})
        async with insecure.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with pytest.raises(Exception):  # noqa: B017 - any failure: no common security protocol
                with trio.fail_after(15):
                    await insecure.connect(info_from_p2p_addr(Multiaddr(node.addrs[0])))
        assert node.connected_peers() == []


async def test_discovery_over_gossip_and_dht() -> None:
    async with open_nodes(4) as (boot, worker, client, other):
        events: list[object] = []

        async def watch() -> None:
            async for ev in client.events():
                events.append(ev)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            worker.set_capabilities([CAP])
            await wait_for(lambda: any(isinstance(e, WorkerSeen) and e.peer_id == worker.peer_id for e in events))
            nursery.cancel_scope.cancel()
        gossip_only = await client.find_workers(MODEL, use_dht=False)
        assert [w.peer_id for w in gossip_only] == [worker.peer_id]
        assert gossip_only[0].free_capacity == 2 and gossip_only[0].price_nanoton == 1500

        worker.set_load(running_jobs=1, free_capacity={MODEL: 1})
        await wait_for(lambda: client.directory.workers_for(MODEL, now_ms=_now())[0].free_capacity == 1)

        # A fresh directory (a client that missed the gossip) finds it in the DHT alone.
        await wait_for(lambda: worker.dht.stats.records_published >= 1)
        other.directory.forget(worker.peer_id)
        rows = await other.find_workers(MODEL)
        assert [w.peer_id for w in rows] == [worker.peer_id]
        assert "dht" in rows[0].sources and rows[0].max_batch == 1


def _now() -> int:
    import time

    return int(time.time() * 1000)


async def test_misbehaving_gossip_peer_is_banned() -> None:
    victim_cfg = fast_config()
    async with Node(victim_cfg) as victim, open_raw_peer(Identity.generate()) as (host, pubsub, _dht):
        await host.connect(info_from_p2p_addr(Multiaddr(victim.addrs[0])))
        await pubsub.subscribe(protocols.ANNOUNCE_TOPIC)
        banned: list[PeerBanned] = []

        async def watch() -> None:
            async for ev in victim.events():
                if isinstance(ev, PeerBanned):
                    banned.append(ev)

        someone_else = Identity.generate()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await wait_for(lambda: protocols.ANNOUNCE_TOPIC in victim.pubsub.peer_topics)  # type: ignore[union-attr]
            await trio.sleep(1.2)  # one heartbeat: the mesh forms
            good = announcement(someone_else, now=_now())
            forged = dataclasses.replace(good, running_jobs=7).encode()  # signature no longer matches
            for payload in [b"\x93garbage", forged, good.encode(), forged, forged]:
                await pubsub.publish(protocols.ANNOUNCE_TOPIC, payload)
                await trio.sleep(0.05)
            await wait_for(lambda: bool(banned))
            nursery.cancel_scope.cancel()
        assert banned[0].peer_id == host.get_id().to_bytes()
        assert victim.gossip.stats.rejected_by_code.get("bad-signature", 0) >= 1
        assert victim.gossip.stats.rejected_by_code.get("foreign-key", 0) + victim.gossip.stats.rejected_by_code.get(
            "malformed", 0
        )
        assert victim.directory.known_peers(_now()) == []  # nothing from the attacker was accepted
        await wait_for(lambda: host.get_id().to_bytes() not in victim.connected_peers())


async def test_dht_refuses_forged_records() -> None:
    async with Node(fast_config()) as victim, open_raw_peer(Identity.generate()) as (host, _pubsub, dht):
        await host.connect(info_from_p2p_addr(Multiaddr(victim.addrs[0])))
        await dht.routing_table.add_peer(ID(victim.peer_id))
        honest = Identity.generate()
        rec = record(honest, now=_now())
        forged = dataclasses.replace(rec, price_nanoton=1).encode()
        await dht.put_value(rec.dht_key(), forged)  # the attacker's DHT has no validator for us
        stolen_key = capability.dht_key(rec.model_id, host.get_id().to_bytes())  # honest record, wrong key
        await dht.put_value(stolen_key, rec.encode())
        await dht.put_value(rec.dht_key(), rec.encode())  # the genuine record is accepted
        await wait_for(lambda: victim.dht.stats.records_rejected >= 2)
        store = victim.dht.kad.value_store
        await wait_for(lambda: store.get(rec.dht_key().encode()) is not None)
        assert store.get(rec.dht_key().encode()).value == rec.encode()
        assert store.get(stolen_key.encode()) is None


@pytest.mark.parametrize(("queue", "expect_got", "expect_dropped"), [(1024, 60, 0), (10, 10, 50)])
async def test_gossip_burst_is_not_capped_and_drops_are_counted(
    queue: int, expect_got: int, expect_dropped: int
) -> None:
    # py-libp2p's default spam protection silently drops a publisher's own
    # messages beyond 10/s, and its 32-slot subscription queue drops silently
    # too. Our nodes turn the former off (rate limits are per origin, in the
    # directory) and pump messages into a queue of our own with a drop counter.
    async with open_nodes(2) as (a, b):
        topic = "/cocoon/test/1"
        sub = await b.subscribe(topic, queue_size=queue)
        await a.subscribe(topic)
        await wait_for(lambda: topic in a.pubsub.peer_topics)  # type: ignore[union-attr]
        await trio.sleep(1.2)  # a heartbeat: b joins a's mesh
        for i in range(60):
            await a.publish(topic, f"m{i}".encode())
        await wait_for(lambda: sub.received + sub.dropped >= 60)
        got = [await sub.receive() for _ in range(sub.received)]
        assert len(got) == expect_got and sub.dropped == expect_dropped
        assert {origin for origin, _ in got} == {a.peer_id}


def test_clean_shutdown_prints_no_tracebacks() -> None:
    script = textwrap.dedent(
        """
        import trio
        from cocoon_p2p.node import Node, NodeConfig
        async def main():
            async with Node(NodeConfig()) as a, Node(NodeConfig(bootstrap=[])) as b:
                await a.connect(b.addrs[0])
                await trio.sleep(1.5)
        trio.run(main)
        print("done")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert "Traceback" not in out.stderr and "LifecycleError" not in out.stderr, out.stderr


async def _flood(node: Node, topic: str) -> None:
    while True:
        await node.publish(topic, b"x" * 200)
        await trio.sleep(0.002)


async def test_shutdown_while_gossip_flows() -> None:
    # Peers that leave while messages still arrive: py-libp2p's pubsub stopped
    # before the host's connection tasks did and spawned into its closed nursery
    # ("Nursery is closed to new arrivals"). Node now hangs up first.
    for _ in range(3):
        async with open_nodes(4) as nodes:
            topic = "/cocoon/test/1"
            for n in nodes:
                await n.subscribe(topic, queue_size=4096)
            await trio.sleep(1.2)
            async with trio.open_nursery() as nursery:
                for n in nodes:
                    nursery.start_soon(_flood, n, topic)
                await trio.sleep(0.3)
                nursery.cancel_scope.cancel()


async def test_py_libp2p_auto_connector_stays_off() -> None:
    # Left on, it dials up to 150 peers from the peerstore, from both sides at
    # once; the resulting duplicate connections get closed with their streams.
    async with open_nodes(3) as nodes:
        for n in nodes:
            connector = n.host.get_network().auto_connector  # type: ignore[attr-defined]
            assert connector._started is False
            await connector.maybe_connect()  # what a disconnect would trigger: a no-op
        await trio.sleep(1)
        assert all(len(n.connected_peers()) <= 2 for n in nodes)
