"""Staying connected (the trio side): dial what :class:`~.peerset.PeerSet` asks for.

The pure :class:`~.peerset.PeerSet` decides whom to dial and when to back off;
:class:`Dialer` watches the host's connections, feeds them to it, and carries
out its dials. It also fills the peer set from the DHT and identify: a star
around the bootstrap peer starves gossipsub (its mesh keeps D of the peers and
the rest only hear lossy IHAVE gossip), so a node dials up to ``target_peers``.

Cancellation: :meth:`Dialer.run` stops with the node, and the dials it started
with it; a dial cancelled half-way leaves at most a connection py-libp2p
tears down on exit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.identity import peer_id_to_str
from cocoon_p2p.core.metrics import Metric, metric

from .dht import CapabilityDht
from .guard import PeerGuard
from .peerset import PeerSet

log = logging.getLogger(__name__)
POLL_S = 0.25
FILL_EVERY_MS = 2000
DIAL_TIMEOUT_S = 10.0
SELF_LOOKUP_TIMEOUT_S = 10.0


@dataclass
class DialStats:
    dials_ok: int = 0
    dials_failed: int = 0


async def connect(host: IHost, addr: str) -> bytes:
    """Dial the peer at a full multiaddr (``.../p2p/<PeerId>``); return its PeerId."""
    info = info_from_p2p_addr(Multiaddr(addr))
    await host.connect(info)
    return bytes(info.peer_id.to_bytes())


class Dialer:
    """Keeps the node connected to ``target_peers`` peers."""

    def __init__(
        self,
        host: IHost,
        *,
        local_peer_id: bytes,
        peerset: PeerSet,
        guard: PeerGuard,
        dht: CapabilityDht,
        target_peers: int,
    ) -> None:
        self.host = host
        self.local_peer_id = local_peer_id
        self.peerset = peerset
        self.guard = guard
        self.dht = dht
        self.target_peers = target_peers
        self.stats = DialStats()

    def connected_peers(self) -> list[bytes]:
        return [p.to_bytes() for p in self.host.get_connected_peers()]

    async def run(self) -> None:
        """Watch connections and dial as the peer set says (run in the node's nursery)."""
        next_fill = 0
        async with trio.open_nursery() as dials:
            while True:
                now = now_ms()
                current = set(self.connected_peers())
                self.guard.sweep(current, dials)
                self.peerset.sync(current, now)
                if len(current) < self.target_peers and now >= next_fill:
                    next_fill = now + FILL_EVERY_MS
                    dials.start_soon(self._learn_candidates)
                for dial in self.peerset.poll(now, connected_total=len(current)):
                    dials.start_soon(self._dial, dial.peer_id, dial.addrs)
                await trio.sleep(POLL_S)

    async def _learn_candidates(self) -> None:
        try:
            with trio.move_on_after(SELF_LOOKUP_TIMEOUT_S):
                await self.dht.meet_neighbours(self.local_peer_id)
        except Exception as exc:
            log.debug("self-lookup failed: %s", exc)
        store = self.host.get_peerstore()
        for pid in store.peers_with_addrs():
            raw = pid.to_bytes()
            # Only the lower PeerId dials: two peers dialling each other at once end
            # up with two connections, and py-libp2p closes one of them (we allow one
            # per peer), killing the streams that ran on it.
            if raw <= self.local_peer_id or self.guard.is_banned(raw):
                continue
            # transport addresses as stored; _dial appends /p2p/<PeerId> itself
            self.peerset.add_candidate(raw, tuple(str(a) for a in store.addrs(pid)))

    async def _dial(self, peer_id: bytes, addrs: tuple[str, ...]) -> None:
        for addr in addrs:
            full = addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id_to_str(peer_id)}"
            try:
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await connect(self.host, full)
            except Exception as exc:
                log.debug("dial %s failed: %s", full, exc)
                continue
            self.stats.dials_ok += 1
            self.peerset.on_connected(peer_id)
            await self.dht.add_peer(peer_id)
            return
        self.stats.dials_failed += 1
        self.peerset.on_dial_failed(peer_id, now_ms())

    def metrics(self) -> list[Metric]:
        return [
            metric("cocoon_peers_connected", "gauge", "Peers with an open connection", len(self.connected_peers())),
            metric("cocoon_dials_total", "counter", "Outbound dials", self.stats.dials_ok, outcome="ok"),
            metric("cocoon_dials_total", "counter", "Outbound dials", self.stats.dials_failed, outcome="failed"),
        ]
