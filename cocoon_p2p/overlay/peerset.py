"""Which peers to be connected to, and when to (re)dial them. Pure policy.

Bootstrap peers are always wanted; peers learnt from announcements are dialled
while we have fewer than ``target_peers`` connections. A failed or lost peer is
retried with exponential backoff and jitter (randomness passed in), so a fleet
restarting together does not hammer its bootstrap peers in lock-step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.core.identity import peer_id_from_str


@dataclass(frozen=True)
class Dial:
    """Command: dial ``peer_id`` at ``addrs`` (multiaddrs ending in /p2p/<id>)."""

    peer_id: bytes
    addrs: tuple[str, ...]


def split_p2p_addr(addr: str) -> tuple[bytes, str]:
    """``/ip4/.../tcp/N/p2p/<id>`` -> (binary PeerId, transport part)."""
    transport, sep, pid = addr.rpartition("/p2p/")
    if not sep or not transport or "/" in pid:
        raise ConfigError(f"multiaddr {addr!r} must end in /p2p/<PeerId>")
    return peer_id_from_str(pid), transport


@dataclass
class _Peer:
    addrs: tuple[str, ...]
    bootstrap: bool
    connected: bool = False
    failures: int = 0
    next_dial_ms: int = 0
    dialing: bool = False
    banned_until_ms: int = 0  # a banned bootstrap peer is not dialled before this


@dataclass
class PeerSet:
    """Connection targets and their backoff state."""

    rng: random.Random
    target_peers: int = 8
    base_backoff_ms: int = 500
    max_backoff_ms: int = 60_000
    max_candidates: int = 1_000
    _peers: dict[bytes, _Peer] = field(default_factory=dict)
    local_peer_id: bytes = b""

    def add_bootstrap(self, addr: str) -> None:
        """Always keep a connection to the peer at ``addr``."""
        pid, _ = split_p2p_addr(addr)
        if pid == self.local_peer_id:
            return
        peer = self._peers.get(pid)
        if peer is None:
            self._peers[pid] = _Peer((addr,), bootstrap=True)
        else:
            peer.bootstrap = True
            peer.addrs = tuple(dict.fromkeys((addr, *peer.addrs)))

    def add_candidate(self, peer_id: bytes, addrs: tuple[str, ...]) -> None:
        """A peer we may connect to (learnt from gossip or the DHT)."""
        if peer_id == self.local_peer_id or not addrs:
            return
        peer = self._peers.get(peer_id)
        if peer is not None:
            if not peer.bootstrap:
                peer.addrs = addrs
            return
        if len(self._peers) >= self.max_candidates:
            return
        self._peers[peer_id] = _Peer(addrs, bootstrap=False)

    def forget(self, peer_id: bytes) -> None:
        """Stop wanting a peer (banned, or gone for good). Bootstrap peers stay."""
        peer = self._peers.get(peer_id)
        if peer is not None and not peer.bootstrap:
            del self._peers[peer_id]

    def on_banned(self, peer_id: bytes, until_ms: int) -> None:
        """``peer_id`` is banned until ``until_ms``: a bootstrap peer is dialled again
        right when its ban ends (never before: a dial would only be hung up on);
        any other peer is forgotten."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if not peer.bootstrap:
            del self._peers[peer_id]
            return
        peer.banned_until_ms = max(peer.banned_until_ms, until_ms)
        peer.failures = 0

    def on_connected(self, peer_id: bytes) -> None:
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.connected, peer.dialing, peer.failures = True, False, 0

    def on_disconnected(self, peer_id: bytes, now_ms: int) -> None:
        peer = self._peers.get(peer_id)
        if peer is not None and peer.connected:
            peer.connected, peer.dialing = False, False
            peer.next_dial_ms = now_ms + self._backoff(0)

    def sync(self, connected: set[bytes], now_ms: int) -> None:
        """Align with the peers connected now. Watching for changes alone misses a
        connection that opened and closed between two looks: its peer would stay
        "connected" here, and never be dialled again."""
        for pid, p in self._peers.items():
            if pid in connected:
                if not p.connected:
                    p.connected, p.dialing, p.failures = True, False, 0
            elif p.connected:
                p.connected, p.dialing = False, False
                p.next_dial_ms = now_ms + self._backoff(0)

    def on_dial_failed(self, peer_id: bytes, now_ms: int) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        peer.dialing = False
        peer.failures += 1
        peer.next_dial_ms = now_ms + self._backoff(peer.failures)

    def _backoff(self, failures: int) -> int:
        ceiling = min(self.max_backoff_ms, self.base_backoff_ms * (2 ** min(failures, 30)))
        return int(ceiling * (0.5 + 0.5 * self.rng.random()))  # "equal jitter"

    def connected_count(self) -> int:
        return sum(p.connected for p in self._peers.values())

    def poll(self, now_ms: int, *, connected_total: int | None = None) -> list[Dial]:
        """Dials that are due now. ``connected_total`` counts all our
        connections (including inbound ones this set does not track)."""
        have = self.connected_count() if connected_total is None else connected_total
        dials: list[Dial] = []
        for pid, p in self._peers.items():
            if p.connected or p.dialing or max(p.next_dial_ms, p.banned_until_ms) > now_ms:
                continue
            if not p.bootstrap and have + len(dials) >= self.target_peers:
                continue
            p.dialing = True
            dials.append(Dial(pid, p.addrs))
        return dials

    def next_deadline_ms(self) -> int | None:
        """When :meth:`poll` may next have work, for a timer."""
        times = [max(p.next_dial_ms, p.banned_until_ms) for p in self._peers.values() if not (p.connected or p.dialing)]
        return min(times) if times else None
