"""Peers that break the rules: scored down, then banned and disconnected (the trio side).

:class:`~.peerscore.PeerScores` decides (pure); :class:`PeerGuard` carries its
decisions out. ``misbehaved`` is synchronous, so any service may call it from
anywhere (a gossip validator, a job stream's reader); the disconnect it may
cause runs later in :meth:`PeerGuard.run`'s task, off the caller's path.

A banned peer that is connected (it dialled us again, or its ban began while a
connection was being set up) is hung up on at every :meth:`PeerGuard.sweep`; a
banned bootstrap peer is dialled again when its ban ends, which is short
(:attr:`~.peerscore.PeerScores.protected_ban_ms`), so a node never stays cut off.

Cancellation: ``run`` stops with the node; a disconnect cancelled half-way
leaves the peer banned (the ban is recorded before the disconnect starts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import Pubsub

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import ProtocolError
from cocoon_p2p.core.identity import peer_id_to_str
from cocoon_p2p.core.metrics import Metric, metric

from .directory import WorkerDirectory
from .events import EventQueue, PeerBanned
from .peerscore import Blame, DisconnectPeer, PeerScores
from .peerset import PeerSet

log = logging.getLogger(__name__)
PENDING_DISCONNECTS = 256  # beyond this, bans still apply; their disconnects wait for the next sweep


@dataclass
class GuardStats:
    peers_disconnected: int = 0


class PeerGuard:
    """Scores misbehaviour, bans, disconnects; implements the job layer's ``PeerFeedback``."""

    def __init__(
        self,
        host: IHost,
        pubsub: Pubsub,
        *,
        scores: PeerScores,
        directory: WorkerDirectory,
        peerset: PeerSet,
        events: EventQueue,
    ) -> None:
        self.host = host
        self.pubsub = pubsub
        self.scores = scores
        self.directory = directory
        self.peerset = peerset
        self.events = events
        self.stats = GuardStats()
        self._send, self._recv = trio.open_memory_channel[DisconnectPeer](PENDING_DISCONNECTS)
        self._hanging_up: set[bytes] = set()  # sweep disconnects under way

    # ---- what other services report (PeerFeedback) -------------------------------

    def misbehaved(self, peer: bytes, error: ProtocolError, *, blame: Blame = Blame.ORIGIN) -> None:
        """``peer`` broke a protocol (``blame=RELAY``: it forwarded someone else's bad
        message): score it; past the threshold it is banned and disconnected."""
        command = self.scores.penalize(peer, error, now_ms(), blame=blame)
        if command is not None:
            try:
                self._send.send_nowait(command)
            except trio.WouldBlock:  # the sweep in run() still finds it banned
                log.warning("disconnect queue full; %s waits for the next sweep", peer_id_to_str(peer))

    def worker_lost(self, peer: bytes) -> None:
        """``peer`` went away mid-job: forget its offers until it announces itself again."""
        self.directory.forget(peer)

    def is_banned(self, peer: bytes) -> bool:
        return self.scores.is_banned(peer, now_ms())

    # ---- the task -----------------------------------------------------------------

    async def run(self) -> None:
        """Carry out disconnects as bans happen (run in the node's nursery)."""
        async with trio.open_nursery() as nursery:
            async for command in self._recv:
                nursery.start_soon(self._disconnect, command)

    def sweep(self, connected: set[bytes], nursery: trio.Nursery) -> None:
        """Hang up on every connected peer that is banned (not only those that just
        connected: one that reconnected between two sweeps would stay, cut off from
        gossip after its ban); lift pubsub blacklistings whose ban expired."""
        now = now_ms()
        for pid in connected:
            if pid not in self._hanging_up and self.scores.is_banned(pid, now):
                self._hanging_up.add(pid)
                nursery.start_soon(self._hang_up, pid)
        for banned in list(self.pubsub.blacklisted_peers):
            if not self.scores.is_banned(banned.to_bytes(), now):
                self.pubsub.remove_from_blacklist(banned)
                if banned.to_bytes() in connected:  # it came back before this sweep: pubsub refused it
                    nursery.start_soon(self._rejoin_gossip, banned)

    async def _rejoin_gossip(self, peer: ID) -> None:
        try:
            await self.pubsub.ensure_peer_stream(peer)
        except Exception as exc:  # it left again: the next connection registers it
            log.debug("pubsub stream to %s: %s", peer, exc)

    async def _hang_up(self, peer_id: bytes) -> None:
        try:
            await self.host.disconnect(ID(peer_id))
        except Exception as exc:  # already gone is fine
            log.debug("disconnect %s: %s", peer_id_to_str(peer_id), exc)
        finally:
            self._hanging_up.discard(peer_id)

    async def _disconnect(self, command: DisconnectPeer) -> None:
        log.warning("disconnecting %s: %s", peer_id_to_str(command.peer_id), command.reason)
        self.stats.peers_disconnected += 1
        self.directory.forget(command.peer_id)
        self.peerset.on_banned(command.peer_id, command.until_ms)
        pid = ID(command.peer_id)
        self.pubsub.add_to_blacklist(pid)
        self.events.emit(PeerBanned(command.peer_id, command.reason))
        try:
            await self.host.disconnect(pid)
        except Exception as exc:  # already gone is fine
            log.debug("disconnect %s: %s", pid, exc)

    def metrics(self) -> list[Metric]:
        return [
            metric(
                "cocoon_peers_banned_total",
                "counter",
                "Peers disconnected for misbehaviour",
                self.stats.peers_disconnected,
            ),
            metric(
                "cocoon_stale_relays_excused_total",
                "counter",
                "Stale gossip forwarded by peers that are not its origin, not held against them",
                self.scores.stale_relays_excused,
            ),
            metric(
                "cocoon_events_dropped_total",
                "counter",
                "Node events the program did not read in time",
                self.events.dropped,
            ),
        ]
