"""The cocoon peer for embedding in a trio program: ``async with Node(config) as node``.

A thin trio adapter. It owns a py-libp2p host (see :mod:`.host`), gossipsub
and the Kademlia DHT, and feeds what arrives into the pure state machines:
:class:`~.directory.WorkerDirectory` (what workers exist), :class:`~.peerscore.PeerScores`
(who misbehaves) and :class:`~.peerset.PeerSet` (whom to stay connected to).
It carries out the commands they return: dial, disconnect, publish.

Cancellation: leaving the ``async with`` block (normally, by an exception, or by
cancellation) stops every task the node started and closes the host; nothing
outlives the block. The key file is the only state the node writes.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.rpc_queue import OutBoundQueueSize
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import ConfigError, ProtocolError
from cocoon_p2p.core.identity import Identity, load_or_create_identity, peer_id_to_str
from cocoon_p2p.execution.backends import Backend
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import Tensor
from cocoon_p2p.jobs import InferenceResult, JobClient, JobFailed, JobWorker
from cocoon_p2p.jobs.frames import JobChunk
from cocoon_p2p.overlay import dht, protocols
from cocoon_p2p.overlay.announcement import Announcement, Offer
from cocoon_p2p.overlay.capability import CapabilityRecord
from cocoon_p2p.overlay.directory import WorkerDirectory, WorkerOffer
from cocoon_p2p.overlay.peerscore import DisconnectPeer, PeerScores
from cocoon_p2p.overlay.peerset import PeerSet
from cocoon_p2p.payments.service import PaymentConfig, PaymentService
from cocoon_p2p.transport.host import build_host, quiet_libp2p_logs
from cocoon_p2p.transport.yamux import YamuxStats

log = logging.getLogger("cocoon_p2p.node")
# Publish waits while a peer's outbound queue is this full (py-libp2p drops at 32).
OUTBOUND_HIGH_WATER = OutBoundQueueSize - 4
# The shortest gap between two of our announcements; receivers refuse gaps under 0.2 s.
MIN_ANNOUNCE_GAP_S = 0.5


@dataclass(frozen=True, kw_only=True)
class ModelCapability:
    """What a worker offers for one model: the terms of its capability record."""

    model_id: bytes
    backend: str
    gpu: str = "cpu"
    gpu_memory_mb: int = 0
    max_batch: int = 1
    price_nanoton: int
    unit: str
    capacity: int = 1


@dataclass(kw_only=True)
class NodeConfig:
    """How to run a node. Either ``identity`` or ``key_file`` (or neither: an
    ephemeral identity, for tests)."""

    identity: Identity | None = None
    key_file: Path | None = None
    listen_addrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_addrs: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)
    dht_server: bool = True
    target_peers: int = 8
    announce_interval_s: float = 10.0
    announce_ttl_s: float = 30.0
    record_ttl_s: float = 3600.0
    gossip_degree: int = 6
    gossip_degree_low: int = 4
    gossip_degree_high: int = 12
    gossip_heartbeat_s: int = 1
    event_queue_size: int = 256
    job_capacity: int = 8  # jobs a worker admits at once before answering "busy"
    quiet_logs: bool = True
    seed: int | None = None  # for the backoff jitter; None: from the OS


@dataclass
class NodeStats:
    """Counters an operator or a test can read (and a metrics endpoint exports)."""

    announcements_sent: int = 0
    announcements_accepted: int = 0
    announcements_rejected: int = 0
    rejected_by_code: dict[str, int] = field(default_factory=dict)
    gossip_drained: int = 0
    gossip_overflows: int = 0
    events_dropped: int = 0
    dials_ok: int = 0
    dials_failed: int = 0
    peers_disconnected: int = 0


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

    def _offer(self, origin: bytes, data: bytes) -> None:
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


@dataclass(frozen=True)
class WorkerSeen:
    """Event: an announcement from ``peer_id`` was accepted."""

    peer_id: bytes
    announcement: Announcement


@dataclass(frozen=True)
class PeerBanned:
    """Event: ``peer_id`` crossed the misbehaviour threshold and was disconnected."""

    peer_id: bytes
    reason: str


NodeEvent = WorkerSeen | PeerBanned


class Node:
    """A cocoon peer: libp2p host + gossip discovery + DHT capability records."""

    def __init__(self, config: NodeConfig | None = None) -> None:
        self.config = config or NodeConfig()
        if self.config.identity is not None:
            self.identity = self.config.identity
        elif self.config.key_file is not None:
            self.identity = load_or_create_identity(self.config.key_file)
        else:
            self.identity = Identity.generate()
        if not self.config.listen_addrs:
            raise ConfigError("a node needs at least one listen address")
        self.stats = NodeStats()
        self.dht_stats = dht.DhtStats()
        self.directory = WorkerDirectory()
        self.scores = PeerScores()
        self.peerset = PeerSet(rng=random.Random(self.config.seed), target_peers=self.config.target_peers)
        self.peerset.local_peer_id = self.identity.peer_id
        for addr in self.config.bootstrap:
            self.peerset.add_bootstrap(addr)
        self._capabilities: tuple[ModelCapability, ...] = ()
        self._free: dict[bytes, int] = {}
        self._running_jobs = 0
        self._changed = trio.Event()
        self._last_announce_ms = 0
        self._events_send, self._events_recv = trio.open_memory_channel[NodeEvent](self.config.event_queue_size)
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self.muxer_stats = YamuxStats()  # every connection's yamux counters, added up
        self.host: IHost = build_host(
            self.identity, announce_addrs=self.config.announce_addrs, muxer_stats=self.muxer_stats
        )
        self.pubsub: Pubsub | None = None
        self.dht: KadDHT | None = None
        self.job_worker: JobWorker | None = None
        self.job_client: JobClient | None = None
        self.payments: PaymentService | None = None

    # ---- identity and addresses -------------------------------------------------

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id

    @property
    def peer_id_str(self) -> str:
        return self.identity.peer_id_str

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs, each ending in ``/p2p/<PeerId>``, that others can dial."""
        return [str(a) for a in self.host.get_addrs()]

    # ---- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Node:
        if self.config.quiet_logs:
            quiet_libp2p_logs()
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await stack.enter_async_context(self.host.run([Multiaddr(a) for a in self.config.listen_addrs]))
            gossipsub = GossipSub(
                protocols=[TProtocol(protocols.GOSSIPSUB_PROTOCOL)],
                degree=self.config.gossip_degree,
                degree_low=self.config.gossip_degree_low,
                degree_high=self.config.gossip_degree_high,
                heartbeat_interval=self.config.gossip_heartbeat_s,
                # py-libp2p's spam protection counts messages per *forwarder*, so it
                # throttles our own and every relay's traffic at 10/s and drops the rest
                # silently. Rate limits are enforced per *origin* in WorkerDirectory.
                spam_protection_enabled=False,
                do_px=True,  # pruned peers learn others to connect to
            )
            self.pubsub = Pubsub(self.host, gossipsub)
            await stack.enter_async_context(background_trio_service(self.pubsub))
            await stack.enter_async_context(background_trio_service(gossipsub))
            self.dht = KadDHT(self.host, DHTMode.SERVER if self.config.dht_server else DHTMode.CLIENT)
            self.dht.register_validator(protocols.DHT_NAMESPACE, dht.CapabilityValidator(self.dht_stats))
            await stack.enter_async_context(background_trio_service(self.dht))
            # On exit, hang up on every peer before the services above stop: py-libp2p's
            # pubsub keeps reading open streams and spawns into its closed nursery
            # otherwise ("Nursery is closed to new arrivals" out of the host's tasks).
            stack.push_async_callback(self._close_network)
            await self.pubsub.wait_until_ready()
            self.host.set_stream_handler(TProtocol(protocols.INFO_PROTOCOL), self._handle_info)
            self.pubsub.set_topic_validator(protocols.ANNOUNCE_TOPIC, self._validate_announcement, False)
            subscription = await self.pubsub.subscribe(protocols.ANNOUNCE_TOPIC)
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(self._nursery.cancel_scope.cancel)  # runs before the nursery exits
            self.job_client = JobClient(self.host, self._nursery, self._job_offers, rng=random.Random(self.config.seed))
            self.job_client.on_misbehaviour = lambda peer, err: self._punish(peer, err, now_ms())
            self.job_client.on_worker_lost = self.directory.forget
            self._nursery.start_soon(self._drain_gossip, subscription)
            self._nursery.start_soon(self._maintain_peers)
            self._nursery.start_soon(self._advertise)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        log.info("node %s listening on %s", self.peer_id_str, " ".join(self.addrs))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack, self._nursery = self._stack, None, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    async def _close_network(self) -> None:
        # Connections only: listeners stay open until the host exits, because
        # gossipsub reads their sockets for our addresses while it winds down.
        network = self.host.get_network()
        gate = getattr(network, "connection_gate", None)
        if gate is not None:  # and no new ones, in or out, while the services stop

            async def refuse(_addr: Multiaddr) -> bool:
                return False

            gate.is_allowed = refuse
        with trio.move_on_after(5):
            for peer in list(network.connections):
                await network.close_peer(peer)

    # ---- public API -------------------------------------------------------------

    async def connect(self, addr: str) -> bytes:
        """Dial the peer at a full multiaddr (``.../p2p/<PeerId>``); return its PeerId."""
        info = info_from_p2p_addr(Multiaddr(addr))
        await self.host.connect(info)
        return info.peer_id.to_bytes()

    def connected_peers(self) -> list[bytes]:
        return [p.to_bytes() for p in self.host.get_connected_peers()]

    def set_capabilities(self, capabilities: list[ModelCapability]) -> None:
        """Serve these models: announce them on gossip and publish DHT records.
        Takes effect at once (an announcement and a DHT publish are triggered)."""
        for c in capabilities:
            if len(c.model_id) != 32:
                raise ConfigError("model_id is the 32-byte sha256 of the model file")
        self._capabilities = tuple(capabilities)
        self._free = {c.model_id: self._free.get(c.model_id, c.capacity) for c in capabilities}
        self._changed.set()

    def set_load(self, *, running_jobs: int, free_capacity: dict[bytes, int]) -> None:
        """Report current load; it goes out with the next announcement (now, if
        the announcement interval allows)."""
        if running_jobs != self._running_jobs or free_capacity != self._free:
            self._running_jobs = running_jobs
            self._free.update(free_capacity)
            self._changed.set()

    # ---- jobs ---------------------------------------------------------------------

    def serve_model(self, spec: ModelSpec, backend: Backend, *, price_nanoton: int, gpu: str = "cpu") -> None:
        """Serve a hash-checked model: accept its jobs and advertise it (gossip + DHT)."""
        worker = self._job_worker()
        worker.serve(spec, backend, price_nanoton=price_nanoton)
        caps = [c for c in self._capabilities if c.model_id != spec.model_id]
        caps.append(
            ModelCapability(
                model_id=spec.model_id,
                backend=backend.name,
                gpu=gpu if backend.device != "cpu" else "cpu",
                max_batch=spec.max_batch,
                price_nanoton=price_nanoton,
                unit=spec.unit,
                capacity=worker.capacity,
            )
        )
        self.set_capabilities(caps)

    def enable_payments(self, config: PaymentConfig) -> PaymentService:
        """Pay and be paid per job through TON payment channels (see :mod:`.payments`):
        as a client, a channel is opened to each worker on first use and every result is
        paid by voucher; as a worker, jobs need an open channel and a paid-up client."""
        assert self.job_client is not None and self._stack is not None, "node is not running"
        service = PaymentService(self.identity, self.host, config)
        self._stack.callback(service.close)

        service.payer.addrs_of = self.directory.addrs_of
        assert self._nursery is not None
        self._nursery.start_soon(service.watch)  # the settlement policy, on chain
        self.job_client.prepare = service.ensure_channel
        self.job_client.pay = service.pay
        worker = self._job_worker()
        worker.admission = service.admission
        worker.on_billed = service.bill
        self.payments = service
        return service

    def stop_accepting_jobs(self) -> None:
        """New jobs are refused with ``shutting-down``; running ones finish."""
        if self.job_worker is not None:
            self.job_worker.accepting = False

    async def infer(
        self,
        model_id: bytes,
        *,
        inputs: tuple[Tensor, ...] = (),
        texts: tuple[str, ...] = (),
        max_price_nanoton: int,
        timeout_s: float = 30.0,
    ) -> InferenceResult:
        """Run one job on the network: the router picks a worker for ``model_id``
        at no more than ``max_price_nanoton`` per unit; retried elsewhere on failure.
        Raises :class:`~.jobs.JobFailed`."""
        assert self.job_client is not None, "node is not running"
        return await self.job_client.infer(
            model_id, inputs=inputs, texts=texts, max_price=max_price_nanoton, timeout_s=timeout_s
        )

    async def generate(
        self,
        model_id: bytes,
        prompt: str,
        *,
        max_tokens: int,
        max_price_nanoton: int,
        timeout_s: float = 120.0,
    ) -> AsyncGenerator[JobChunk | InferenceResult, None]:
        """Generate text: yields each :class:`~.jobframes.JobChunk` as the worker
        streams it, then the :class:`~.jobs.InferenceResult` (usage and cost).

        ``prompt`` is the full model input (for chat models see
        :func:`~.generation.chatml_prompt`). Leaving the loop early cancels the job
        on the worker. Raises :class:`~.jobs.JobFailed`.
        """
        assert self.job_client is not None and self._nursery is not None, "node is not running"
        client = self.job_client
        send, recv = trio.open_memory_channel[JobChunk | InferenceResult | JobFailed](math.inf)
        scope = trio.CancelScope()

        async def run() -> None:
            with scope, send:
                try:
                    result = await client.infer(
                        model_id,
                        texts=(prompt,),
                        max_tokens=max_tokens,
                        max_price=max_price_nanoton,
                        timeout_s=timeout_s,
                        on_chunk=send.send_nowait,
                    )
                    send.send_nowait(result)
                except JobFailed as exc:
                    send.send_nowait(exc)

        self._nursery.start_soon(run)
        try:
            async with recv:
                async for item in recv:
                    if isinstance(item, JobFailed):
                        raise item
                    yield item
        finally:
            scope.cancel()  # synchronous: safe even when the generator is finalised late

    async def _job_offers(self, model_id: bytes) -> list[WorkerOffer]:
        offers = await self.find_workers(model_id, use_dht=False)
        return offers or await self.find_workers(model_id, use_dht=True, timeout_s=5.0)

    def _job_worker(self) -> JobWorker:
        if self.job_worker is None:
            assert self._nursery is not None, "node is not running"
            self.job_worker = JobWorker(self.host, self._nursery, capacity=self.config.job_capacity)
            worker = self.job_worker

            def report() -> None:
                free = max(0, worker.capacity - worker.running)
                self.set_load(running_jobs=worker.running, free_capacity={m: free for m in worker.models})

            worker.on_load_change = report
            worker.on_misbehaviour = lambda peer, err: self._punish(peer, err, now_ms())
        return self.job_worker

    async def find_workers(
        self, model_id: bytes, *, use_dht: bool = True, timeout_s: float = 10.0
    ) -> list[WorkerOffer]:
        """Every live worker known for ``model_id``: gossip and DHT merged,
        deduplicated per worker, freshest first. DHT errors only shorten the list."""
        records: list[CapabilityRecord] = []
        if use_dht and self.dht is not None:
            with trio.move_on_after(timeout_s):
                records = await dht.lookup(self.dht, model_id, self.dht_stats)
        now = now_ms()
        self.directory.expire(now)
        return self.directory.workers_for(model_id, now_ms=now, extra=records)

    async def subscribe(self, topic: str, *, queue_size: int = 1024) -> Subscription:
        """Subscribe to a gossip topic; messages arrive in a queue of ``queue_size``
        with a visible drop counter. The pump stops with the node."""
        assert self.pubsub is not None and self._nursery is not None, "node is not running"
        raw = await self.pubsub.subscribe(topic)
        sub = Subscription(topic, queue_size)

        async def pump() -> None:
            while True:
                msg = await raw.get()
                sub._offer(bytes(msg.from_id), bytes(msg.data))

        self._nursery.start_soon(pump)
        return sub

    async def publish(self, topic: str, data: bytes, *, max_wait_s: float = 1.0) -> None:
        """Publish ``data`` on a gossip topic (signed by this node's key).

        py-libp2p queues at most 32 outbound RPCs per peer and drops the rest
        silently, so a burst waits (up to ``max_wait_s``) for room in every
        peer's queue; a publish that still finds a full queue is counted in
        ``stats.gossip_overflows``, since some peer will likely miss it.
        """
        assert self.pubsub is not None, "node is not running"
        queues = self.pubsub.peer_queues
        with trio.move_on_after(max_wait_s):
            while any(len(q) >= OUTBOUND_HIGH_WATER for q in queues.values()):
                await trio.sleep(0.001)
        if any(len(q) >= OutBoundQueueSize for q in queues.values()):
            self.stats.gossip_overflows += 1
        await self.pubsub.publish(topic, data)

    async def events(self) -> AsyncIterator[NodeEvent]:
        """Node events (workers seen, peers banned). The queue is bounded: when
        the consumer lags, new events are dropped and counted in
        ``stats.events_dropped``."""
        async for ev in self._events_recv:
            yield ev

    # ---- gossip -----------------------------------------------------------------

    def _emit(self, event: NodeEvent) -> None:
        try:
            self._events_send.send_nowait(event)
        except trio.WouldBlock:
            self.stats.events_dropped += 1

    def _validate_announcement(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        # Runs inside pubsub before a message is delivered or forwarded: a
        # rejected message goes no further through the mesh.
        if forwarder.to_bytes() == self.peer_id:
            return True
        now = now_ms()
        try:
            ann = self.directory.receive_announcement(msg.data, origin=bytes(msg.from_id), now_ms=now)
        except ProtocolError as err:
            self.stats.announcements_rejected += 1
            self.stats.rejected_by_code[err.code] = self.stats.rejected_by_code.get(err.code, 0) + 1
            log.debug("rejected announcement from %s: %s", forwarder, err)
            self._punish(forwarder.to_bytes(), err, now)
            return False
        self.stats.announcements_accepted += 1
        self.peerset.add_candidate(ann.peer_id, ann.addrs)
        self._emit(WorkerSeen(ann.peer_id, ann))
        return True

    def _punish(self, peer_id: bytes, err: ProtocolError, now_ms: int) -> None:
        command = self.scores.penalize(peer_id, err, now_ms)
        if command is not None and self._nursery is not None:
            self._nursery.start_soon(self._disconnect, command)

    async def _disconnect(self, command: DisconnectPeer) -> None:
        log.warning("disconnecting %s: %s", peer_id_to_str(command.peer_id), command.reason)
        self.stats.peers_disconnected += 1
        self.directory.forget(command.peer_id)
        self.peerset.forget(command.peer_id)
        pid = ID(command.peer_id)
        if self.pubsub is not None:
            self.pubsub.add_to_blacklist(pid)
        self._emit(PeerBanned(command.peer_id, command.reason))
        try:
            await self.host.disconnect(pid)
        except Exception as exc:  # already gone is fine
            log.debug("disconnect %s: %s", pid, exc)

    async def _drain_gossip(self, subscription: Any) -> None:
        # Messages were already validated and ingested by the topic validator;
        # draining keeps pubsub's 32-slot subscription queue from overflowing.
        while True:
            await subscription.get()
            self.stats.gossip_drained += 1

    # ---- connections ------------------------------------------------------------

    async def _maintain_peers(self) -> None:
        connected: set[bytes] = set()
        next_fill = 0
        async with trio.open_nursery() as dials:
            while True:
                now = now_ms()
                current = set(self.connected_peers())
                for pid in current - connected:
                    if self.scores.is_banned(pid, now):
                        dials.start_soon(self.host.disconnect, ID(pid))
                    self.peerset.on_connected(pid)
                for pid in connected - current:
                    self.peerset.on_disconnected(pid, now)
                connected = current
                if self.pubsub is not None:
                    for banned in list(self.pubsub.blacklisted_peers):
                        if not self.scores.is_banned(banned.to_bytes(), now):
                            self.pubsub.remove_from_blacklist(banned)
                if len(current) < self.config.target_peers and now >= next_fill:
                    # A star around the bootstrap peer starves gossipsub: its mesh
                    # keeps D of the peers and the rest only hear lossy IHAVE gossip.
                    # Fill up to target_peers from peers the DHT and identify taught us.
                    next_fill = now + 2000
                    dials.start_soon(self._learn_candidates)
                for dial in self.peerset.poll(now, connected_total=len(current)):
                    dials.start_soon(self._dial, dial.peer_id, dial.addrs)
                await trio.sleep(0.25)

    async def _learn_candidates(self) -> None:
        if self.dht is not None:
            try:  # Kademlia's join step: a lookup of our own id meets our neighbours
                with trio.move_on_after(10):
                    await self.dht.peer_routing.find_closest_peers_network(self.peer_id)
            except Exception as exc:
                log.debug("self-lookup failed: %s", exc)
        store = self.host.get_peerstore()
        for pid in store.peers_with_addrs():
            raw = pid.to_bytes()
            # Only the lower PeerId dials: two peers dialling each other at once end
            # up with two connections, and py-libp2p closes one of them (we allow one
            # per peer), killing the streams that ran on it.
            if raw <= self.peer_id or self.scores.is_banned(raw, now_ms()):
                continue
            # transport addresses as stored; _dial appends /p2p/<PeerId> itself
            self.peerset.add_candidate(raw, tuple(str(a) for a in store.addrs(pid)))

    async def _dial(self, peer_id: bytes, addrs: tuple[str, ...]) -> None:
        for addr in addrs:
            full = addr if "/p2p/" in addr else f"{addr}/p2p/{peer_id_to_str(peer_id)}"
            try:
                with trio.fail_after(10):
                    await self.connect(full)
            except Exception as exc:
                log.debug("dial %s failed: %s", full, exc)
                continue
            self.stats.dials_ok += 1
            self.peerset.on_connected(peer_id)
            if self.dht is not None:
                await self.dht.routing_table.add_peer(ID(peer_id))
            return
        self.stats.dials_failed += 1
        self.peerset.on_dial_failed(peer_id, now_ms())

    # ---- advertising ------------------------------------------------------------

    def _announcement(self, now_ms: int) -> Announcement:
        offers = tuple(
            Offer(
                model_id=c.model_id,
                backend=c.backend,
                gpu=c.gpu,
                price_nanoton=c.price_nanoton,
                unit=c.unit,
                capacity=c.capacity,
                free_capacity=max(0, min(c.capacity, self._free.get(c.model_id, c.capacity))),
            )
            for c in self._capabilities
        )
        # issued_at is the sequence number: keep it strictly increasing.
        issued = max(now_ms, self._last_announce_ms + 1)
        self._last_announce_ms = issued
        return Announcement.create(
            self.identity,
            now_ms=issued,
            ttl_ms=int(self.config.announce_ttl_s * 1000),
            addrs=tuple(self.addrs),
            offers=offers,
            running_jobs=self._running_jobs,
        )

    async def _advertise(self) -> None:
        next_publish = 0.0
        published: tuple[ModelCapability, ...] | None = None
        while True:
            with trio.move_on_after(self.config.announce_interval_s):
                await self._changed.wait()
            self._changed = trio.Event()
            if not self._capabilities:
                continue
            await self._announce()
            if published != self._capabilities or trio.current_time() >= next_publish:
                published = self._capabilities
                next_publish = trio.current_time() + self.config.record_ttl_s / 2
                await self._publish_records()
            # Load changes come in bursts (every job start and end): announce at most
            # once per gap, well above the receivers' per-origin limit (the
            # directory's min_interval_ms), as gossip delivery can bunch messages.
            await trio.sleep(max(self.config.announce_interval_s / 10, MIN_ANNOUNCE_GAP_S))

    async def _announce(self) -> None:
        assert self.pubsub is not None
        data = self._announcement(now_ms()).encode()
        await self.publish(protocols.ANNOUNCE_TOPIC, data)
        self.stats.announcements_sent += 1

    async def _publish_records(self) -> None:
        """Put one record per model in the DHT and provide the model's key."""
        assert self.dht is not None
        now = now_ms()
        for c in self._capabilities:
            rec = CapabilityRecord.create(
                self.identity,
                now_ms=now,
                ttl_ms=int(self.config.record_ttl_s * 1000),
                model_id=c.model_id,
                backend=c.backend,
                gpu=c.gpu,
                gpu_memory_mb=c.gpu_memory_mb,
                max_batch=c.max_batch,
                price_nanoton=c.price_nanoton,
                unit=c.unit,
                capacity=c.capacity,
                addrs=tuple(self.addrs),
            )
            try:
                await dht.publish(self.dht, rec)
            except Exception as exc:  # e.g. no DHT peer yet: the next round retries
                log.info("DHT publish of %s failed: %s", c.model_id.hex()[:12], exc)
                continue
            self.dht_stats.records_published += 1

    # ---- /cocoon/info/1 ---------------------------------------------------------

    async def _handle_info(self, stream: Any) -> None:
        """Answer with our current signed announcement (or an empty frame for a
        pure client): a direct way to learn a peer's offers without gossip."""
        try:
            data = self._announcement(now_ms()).encode() if self._capabilities else b""
            await stream.write(data)
        finally:
            await stream.close()


@asynccontextmanager
async def open_node(config: NodeConfig | None = None) -> AsyncIterator[Node]:
    """``async with open_node(cfg) as node``: the same as ``async with Node(cfg)``."""
    async with Node(config) as node:
        yield node
