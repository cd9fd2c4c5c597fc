"""Gossip for the overlay (the trio side): gossipsub, announcement validation, bounded subscriptions.

Announcements are validated inside pubsub, before they are delivered or
forwarded, by :class:`~.directory.WorkerDirectory` (pure): a rejected message
goes no further through the mesh. A stale one (an origin's older announcement:
gossipsub replays its cache to each new subscriber, the origin its own messages
too) is dropped and held against nobody; for any other fault its forwarder is
reported to the :class:`~.guard.PeerGuard`, blamed as the message's origin or as a
mere relay (:func:`~.peerscore.gossip_blame`).

py-libp2p 0.8.1 defects worked around here, each named:

* **Spam protection per forwarder.** It throttles every *forwarder* at 10
  messages/s, so it is off; rate limits are per origin, in the directory.
* **Silent drops at 32.** Its queues drop silently, so publishing waits for
  room, and subscriptions get queues of our own with a visible drop counter.
* **A ban crashed pubsub** (:func:`safe_blacklist_teardown`; the upstream report
  is ``docs/upstream/pubsub-blacklist-teardown-keyerror.md``).

Cancellation: the pumps run in the node's nursery and stop with it; a
cancelled ``publish`` has either handed the message to pubsub or not at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import OutBoundQueueSize

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import NotRunning, ProtocolError
from cocoon_p2p.core.metrics import Metric, metric

from . import protocols
from .directory import WorkerDirectory
from .events import EventQueue, WorkerSeen
from .guard import PeerGuard
from .peerscore import gossip_blame
from .peerset import PeerSet

log = logging.getLogger(__name__)
# Publish waits while a peer's outbound queue is this full (py-libp2p drops at 32).
OUTBOUND_HIGH_WATER = OutBoundQueueSize - 4


@dataclass(frozen=True, kw_only=True)
class MeshParams:
    """gossipsub's mesh degree and heartbeat."""

    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    heartbeat_s: int = 1


def build_pubsub(host: IHost, params: MeshParams) -> tuple[Pubsub, GossipSub]:
    """gossipsub v1.1 on ``host``, not yet running (see :class:`Gossip`), its
    blacklist teardown made safe (:func:`safe_blacklist_teardown`)."""
    gossipsub = GossipSub(
        protocols=[TProtocol(protocols.GOSSIPSUB_PROTOCOL)],
        degree=params.degree,
        degree_low=params.degree_low,
        degree_high=params.degree_high,
        heartbeat_interval=params.heartbeat_s,
        spam_protection_enabled=False,  # per forwarder in py-libp2p: see the module docstring
        do_px=True,  # pruned peers learn others to connect to
    )
    pubsub = Pubsub(host, gossipsub)
    safe_blacklist_teardown(pubsub)
    return pubsub, gossipsub


def safe_blacklist_teardown(pubsub: Pubsub) -> None:
    """Make ``pubsub.add_to_blacklist`` unable to crash pubsub (py-libp2p 0.8.1 defect).

    Its teardown task looks the peer's stream up, awaits ``stream.reset()``, then
    does ``del self.peers[peer]``. Whatever ends the peer during that await (its
    sending loop failing on the reset stream, the dead-peer queue after our
    disconnect) deletes the entry first, and the KeyError ends pubsub's service and
    the node with it. The replacement forgets the peer first, with the library's own
    dead-peer cleanup (idempotent; no await in between), and resets the stream after.
    """

    async def teardown(peer_id: ID) -> None:
        stream = pubsub.peers.get(peer_id)
        pubsub._handle_dead_peer(peer_id)  # peers, outbound queue, router, subscriptions
        if stream is not None:
            try:
                await stream.reset()
            except Exception:  # already gone: nothing left to tell the peer
                pass

    pubsub._teardown_if_connected = teardown  # type: ignore[method-assign]  # this instance only


@dataclass
class GossipStats:
    announcements_accepted: int = 0
    announcements_rejected: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    gossip_drained: int = 0
    gossip_overflows: int = 0


class Subscription:
    """Messages of one gossip topic, in a bounded queue of our own.

    py-libp2p's subscription queue holds 32 messages and drops the rest without
    a trace; a pump task moves each message into this queue as it arrives and
    counts what does not fit in ``dropped``.
    """

    def __init__(self, topic: str, size: int) -> None:
        self.topic = topic
        self.dropped = 0
        self.received = 0
        self._send, self._recv = trio.open_memory_channel[tuple[bytes, bytes]](size)

    def offer(self, origin: bytes, data: bytes) -> None:
        try:
            self._send.send_nowait((origin, data))
            self.received += 1
        except trio.WouldBlock:
            self.dropped += 1

    async def receive(self) -> tuple[bytes, bytes]:
        """The next (origin PeerId, payload). Cancelled: nothing is consumed."""
        return await self._recv.receive()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> tuple[bytes, bytes]:
        return await self.receive()


class Gossip:
    """The node's gossipsub: validates announcements into the directory, publishes, subscribes."""

    def __init__(
        self,
        pubsub: Pubsub,
        *,
        local_peer_id: bytes,
        directory: WorkerDirectory,
        peerset: PeerSet,
        guard: PeerGuard,
        events: EventQueue,
    ) -> None:
        self.pubsub = pubsub
        self.local_peer_id = local_peer_id
        self.directory = directory
        self.peerset = peerset
        self.guard = guard
        self.events = events
        self.stats = GossipStats()
        self._announcements: Any = None

    async def join(self) -> None:
        """Once pubsub runs: validate and subscribe to announcements."""
        await self.pubsub.wait_until_ready()
        self.pubsub.set_topic_validator(protocols.ANNOUNCE_TOPIC, self._validate_announcement, False)
        self._announcements = await self.pubsub.subscribe(protocols.ANNOUNCE_TOPIC)

    async def drain(self) -> None:
        """Keep pubsub's 32-slot queue of announcements empty (run in the node's nursery).

        They were already validated and taken in by the topic validator."""
        if self._announcements is None:
            raise NotRunning("Gossip.join() has not run")
        while True:
            await self._announcements.get()
            self.stats.gossip_drained += 1

    def _validate_announcement(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        if forwarder.to_bytes() == self.local_peer_id:
            return True
        now = now_ms()
        origin = bytes(msg.from_id)
        try:
            ann = self.directory.receive_announcement(msg.data, origin=origin, now_ms=now)
        except ProtocolError as err:
            self.stats.announcements_rejected += 1
            self.stats.rejected_by_code[err.code] = self.stats.rejected_by_code.get(err.code, 0) + 1
            sender = forwarder.to_bytes()
            blame = gossip_blame(err.code, sender=sender, origin=origin)
            log.debug("rejected announcement from %s (%s): %s", forwarder, blame.value if blame else "stale", err)
            if blame is not None:
                self.guard.misbehaved(sender, err, blame=blame)
            return False
        self.stats.announcements_accepted += 1
        self.peerset.add_candidate(ann.peer_id, ann.addrs)
        self.events.emit(WorkerSeen(ann.peer_id, ann))
        return True

    async def subscribe(self, topic: str, nursery: trio.Nursery, *, queue_size: int = 1024) -> Subscription:
        """A subscription to ``topic`` whose pump runs in ``nursery``."""
        raw = await self.pubsub.subscribe(topic)
        sub = Subscription(topic, queue_size)

        async def pump() -> None:
            while True:
                msg = await raw.get()
                sub.offer(bytes(msg.from_id), bytes(msg.data))

        nursery.start_soon(pump)
        return sub

    async def publish(self, topic: str, data: bytes, *, max_wait_s: float = 1.0) -> None:
        """Publish ``data`` (signed by this node's key), waiting up to ``max_wait_s`` for
        room in every peer's outbound queue; a publish that still finds a full queue is
        counted in ``stats.gossip_overflows``, since some peer will likely miss it."""
        queues = self.pubsub.peer_queues
        with trio.move_on_after(max_wait_s):
            while any(len(q) >= OUTBOUND_HIGH_WATER for q in queues.values()):
                await trio.sleep(0.001)
        if any(len(q) >= OutBoundQueueSize for q in queues.values()):
            self.stats.gossip_overflows += 1
        await self.pubsub.publish(topic, data)

    def metrics(self) -> list[Metric]:
        s = self.stats
        return [
            metric(
                "cocoon_announcements_accepted_total", "counter", "Announcements accepted", s.announcements_accepted
            ),
            metric(
                "cocoon_gossip_overflows_total", "counter", "Gossip messages dropped: queue full", s.gossip_overflows
            ),
        ] + [
            metric("cocoon_announcements_rejected_total", "counter", "Announcements rejected", n, code=code)
            for code, n in sorted(s.rejected_by_code.items())
        ]
