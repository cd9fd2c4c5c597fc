"""The cocoon peer for embedding in a trio program: ``async with Node(config) as node``.

A composition of services, each built by constructor with what it needs:

* transport: a py-libp2p host (:func:`~cocoon_p2p.transport.host.build_host`);
* overlay: :class:`~.overlay.gossip.Gossip` (announcements into the
  :class:`~.overlay.directory.WorkerDirectory`), :class:`~.overlay.dht.CapabilityDht`,
  :class:`~.overlay.guard.PeerGuard` (scores, bans), :class:`~.overlay.dialer.Dialer`
  (stays connected), :class:`~.overlay.advertiser.Advertiser` (what we serve);
* jobs: :class:`~.jobs.client.JobClient` and, once a model is served,
  :class:`~.jobs.worker.JobWorker`, given the overlay and payments through the ports
  of :mod:`.jobs.ports`;
* payments (with ``NodeConfig.payments``): :class:`~.payments.service.PaymentService`;
* attestation: :class:`~.attestation.gate.AttestationGate` (judges workers that
  claim a TEE, for jobs that require one) and, on a confidential worker
  (``NodeConfig.tee``), :class:`~.attestation.keeper.EvidenceKeeper`.

Cancellation: leaving the ``async with`` block (normally, by an exception, or by
cancellation) stops every task the node started and closes the host; nothing
outlives the block. The key file, and the payment state under
``PaymentConfig.data_dir``, are all the node writes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from cocoon_p2p.attestation import evidence as attest_wire
from cocoon_p2p.attestation.gate import AttestationGate, ClientAttestation
from cocoon_p2p.attestation.keeper import EvidenceKeeper, WorkerAttestation
from cocoon_p2p.attestation.verifier import Verdict
from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import ConfigError, NotRunning
from cocoon_p2p.core.identity import Identity, load_or_create_identity
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.metrics import Metric, metric
from cocoon_p2p.execution.backends import Backend
from cocoon_p2p.execution.chat_options import ChatOptions
from cocoon_p2p.execution.engine_runner import EngineRunner
from cocoon_p2p.execution.executor import RunRequest
from cocoon_p2p.execution.limits import InputLimits
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.sampling import Sampling
from cocoon_p2p.execution.tensors import Tensor
from cocoon_p2p.jobs.client import InferenceResult, JobClient, JobFailed
from cocoon_p2p.jobs.frames import NO_WORKERS, JobChunk
from cocoon_p2p.jobs.fraudproof import FraudProof
from cocoon_p2p.jobs.fraudwatch import FraudWatch, RerunResult
from cocoon_p2p.jobs.receiptlog import ReceiptLog
from cocoon_p2p.jobs.serving import EngineWatch
from cocoon_p2p.jobs.spotcheck import SpotCheckPolicy
from cocoon_p2p.jobs.worker import JobWorker
from cocoon_p2p.overlay import protocols
from cocoon_p2p.overlay.advertiser import Advertiser, AdvertiseTimes, ModelCapability
from cocoon_p2p.overlay.capability import CapabilityRecord
from cocoon_p2p.overlay.catalog import CatalogEntry, catalog_name, parse_ref
from cocoon_p2p.overlay.dht import CapabilityDht
from cocoon_p2p.overlay.dialer import Dialer, connect
from cocoon_p2p.overlay.directory import CatalogRow, WorkerDirectory, WorkerOffer
from cocoon_p2p.overlay.events import EventQueue, NodeEvent, PeerBanned, WorkerSeen
from cocoon_p2p.overlay.gossip import Gossip, MeshParams, Subscription, build_pubsub
from cocoon_p2p.overlay.guard import PeerGuard
from cocoon_p2p.overlay.joblimits import JobLimits
from cocoon_p2p.overlay.lan import LanDiscovery
from cocoon_p2p.overlay.peerscore import PeerScores
from cocoon_p2p.overlay.peerset import PeerSet, split_p2p_addr
from cocoon_p2p.payments.service import PaymentConfig, PaymentService
from cocoon_p2p.transport.host import build_host, close_connections, quiet_libp2p_logs
from cocoon_p2p.transport.limits import Admission, ResourceLimits
from cocoon_p2p.transport.nat import NatTraversal
from cocoon_p2p.transport.relay import RelaySettings
from cocoon_p2p.transport.yamux import YamuxStats

__all__ = [
    "ModelCapability",
    "Node",
    "NodeConfig",
    "NodeEvent",
    "PeerBanned",
    "Subscription",
    "WorkerSeen",
    "open_node",
]
log = logging.getLogger(__name__)


def advertised(limits: InputLimits) -> JobLimits:
    """What a client can check of a model's input limits before it sends a job (characters
    and counts; tokens only the worker's tokenizer knows)."""
    return JobLimits(limits.max_items, limits.max_text_chars, limits.max_total_chars, limits.max_new_tokens)


LOOKUP_FALLBACK_TIMEOUT_S = 5.0  # the DHT, asked when gossip knows no worker for a model
FLUSH_PAYMENTS_S = 10.0  # how long a leaving node waits for the vouchers still on their way
CLOSE_TIMEOUT_S = 5.0


@dataclass(kw_only=True)
class NodeConfig:
    """How to run a node. Either ``identity`` or ``key_file`` (or neither: an
    ephemeral identity, for tests). ``payments``: pay and be paid per job."""

    identity: Identity | None = None
    key_file: Path | None = None
    listen_addrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_addrs: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)
    relay: RelaySettings = field(default_factory=RelaySettings)  # NAT traversal (relays: the bootstrap peers)
    mdns: bool = False  # find peers on the local network (mDNS), with or without a bootstrap peer
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
    jobs_per_client: int | None = None  # of those, what one client may hold (None: all)
    limits: ResourceLimits = field(default_factory=ResourceLimits)  # what one peer or IP may hold open
    payments: PaymentConfig | None = None
    tee: WorkerAttestation | None = None  # a confidential worker: where its TEE evidence comes from
    attestation: ClientAttestation = field(default_factory=ClientAttestation)  # judging others' evidence
    spot_checks: SpotCheckPolicy | None = None  # re-check a share of results on other workers
    receipts_file: Path | None = None  # keep paid jobs' receipts here (default: beside the payment state)
    fraud_trusted_reporters: frozenset[bytes] = frozenset()  # act on their fraud proofs without re-running
    fraud_rate_per_min: int = 10  # fraud proofs judged per reporter per minute
    watch_fraud: bool = True  # judge the fraud proofs gossiped by others (ours are published either way)
    quiet_logs: bool = True
    seed: int | None = None  # for the backoff jitter and the router; None: from the OS


class Node:
    """A cocoon peer: libp2p host + gossip discovery + DHT records + jobs (+ payments)."""

    def __init__(self, config: NodeConfig | None = None) -> None:
        self.config = cfg = config or NodeConfig()
        if cfg.identity is not None:
            self.identity = cfg.identity
        elif cfg.key_file is not None:
            self.identity = load_or_create_identity(cfg.key_file)
        else:
            self.identity = Identity.generate()
        if not cfg.listen_addrs:
            raise ConfigError("a node needs at least one listen address")
        self.muxer_stats = YamuxStats()  # every connection's yamux counters, added up
        self.admission = Admission(cfg.limits)  # and what the resource limits refused
        self.host: IHost = build_host(
            self.identity, announce_addrs=cfg.announce_addrs, muxer_stats=self.muxer_stats, admission=self.admission
        )
        self.nat = NatTraversal(self.host, cfg.relay, announce=cfg.announce_addrs, relays=lambda: self.config.bootstrap)
        self.lan = LanDiscovery(self.host, lambda: self.addrs) if cfg.mdns else None
        # Pure state, shared by the services below.
        self.directory = WorkerDirectory()
        self.scores = PeerScores()
        self.peerset = PeerSet(rng=random.Random(cfg.seed), target_peers=cfg.target_peers)
        self.peerset.local_peer_id = self.identity.peer_id
        for addr in cfg.bootstrap:
            self.peerset.add_bootstrap(addr)
            self.scores.protect(split_p2p_addr(addr)[0])  # never banned for long: our way in
        self._events = EventQueue(cfg.event_queue_size)
        # Overlay services.
        self.pubsub, self._gossipsub = build_pubsub(
            self.host,
            MeshParams(
                degree=cfg.gossip_degree,
                degree_low=cfg.gossip_degree_low,
                degree_high=cfg.gossip_degree_high,
                heartbeat_s=cfg.gossip_heartbeat_s,
            ),
        )
        self.guard = PeerGuard(
            self.host,
            self.pubsub,
            scores=self.scores,
            directory=self.directory,
            peerset=self.peerset,
            events=self._events,
        )
        self.gossip = Gossip(
            self.pubsub,
            local_peer_id=self.peer_id,
            directory=self.directory,
            peerset=self.peerset,
            guard=self.guard,
            events=self._events,
        )
        self.dht = CapabilityDht(self.host, server=cfg.dht_server)
        self.dialer = Dialer(
            self.host,
            local_peer_id=self.peer_id,
            peerset=self.peerset,
            guard=self.guard,
            dht=self.dht,
            target_peers=cfg.target_peers,
        )
        self.advertiser = Advertiser(
            self.identity,
            addrs=lambda: self.addrs,
            gossip=self.gossip,
            dht=self.dht,
            times=AdvertiseTimes(
                announce_interval_s=cfg.announce_interval_s,
                announce_ttl_s=cfg.announce_ttl_s,
                record_ttl_s=cfg.record_ttl_s,
            ),
        )
        self.payments: PaymentService | None = None
        if cfg.payments is not None:
            self.payments = PaymentService(
                self.identity,
                self.host,
                cfg.payments,
                peer_addrs=self.directory.addrs_of,
                misbehaved=self.guard.misbehaved,
            )
        self.fraud = FraudWatch(
            self.identity,
            self.gossip,
            self.guard,
            self._events,
            rerun=self._rerun_proof,
            trusted_reporters=cfg.fraud_trusted_reporters,
            cosine_min=(cfg.spot_checks or SpotCheckPolicy()).cosine_min,
            rate_per_min=cfg.fraud_rate_per_min,
        )
        self._rerunning = trio.Lock()
        self.tee_gate = AttestationGate(self.host, cfg.attestation, guard=self.guard, events=self._events)
        self.evidence: EvidenceKeeper | None = None
        if cfg.tee is not None:
            self.evidence = EvidenceKeeper(self.identity, cfg.tee, advertiser=self.advertiser)
        self.job_client: JobClient | None = None
        self.job_worker: JobWorker | None = None
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None

    # ---- identity and addresses -------------------------------------------------

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id

    @property
    def peer_id_str(self) -> str:
        return self.identity.peer_id_str

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs, each ending in ``/p2p/<PeerId>``, that others can dial
        (:meth:`~.transport.nat.NatTraversal.addrs`)."""
        return self.nat.addrs()

    # ---- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Node:
        if self.config.quiet_logs:
            quiet_libp2p_logs()
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await stack.enter_async_context(self.host.run([Multiaddr(a) for a in self.config.listen_addrs]))
            await stack.enter_async_context(background_trio_service(self.pubsub))
            await stack.enter_async_context(background_trio_service(self._gossipsub))
            await stack.enter_async_context(self.dht)
            # On exit, hang up on every peer before the services above stop: py-libp2p's
            # pubsub keeps reading open streams and spawns into its closed nursery
            # otherwise ("Nursery is closed to new arrivals" out of the host's tasks).
            stack.push_async_callback(close_connections, self.host, CLOSE_TIMEOUT_S)
            await self.gossip.join()
            self.host.set_stream_handler(TProtocol(protocols.INFO_PROTOCOL), self.advertiser.handle_info)
            if self.evidence is not None:
                self.host.set_stream_handler(TProtocol(attest_wire.PROTOCOL), self.evidence.handle)
            if self.payments is not None:
                stack.callback(self.payments.close)  # after every task below has stopped
            nursery = self._nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)  # runs before the nursery exits
            if self.payments is not None:
                nursery.start_soon(self.payments.watch)  # the settlement policy, on chain
            self.job_client = JobClient(
                self.host,
                nursery,
                self._job_offers,
                feedback=self.guard,
                payments=self.payments,
                tee=self.tee_gate,
                checks=self.config.spot_checks,
                cheats=self.fraud,
                receipts=self._receipt_log(stack),
                rng=random.Random(self.config.seed),
            )
            await nursery.start(self.nat.run)
            if self.lan is not None:
                await nursery.start(self.lan.run)
            for task in (self.gossip.drain, self.guard.run, self.dialer.run, self.advertiser.run):
                nursery.start_soon(task)
            if self.config.watch_fraud:
                await nursery.start(self.fraud.run)
            if self.evidence is not None:
                nursery.start_soon(self.evidence.run)
                await self.evidence.wait_ready()  # the first announcement carries the claim
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        log.info("listening on %s", " ".join(self.addrs), extra=fields(peer=self.peer_id_str))
        return self

    async def _rerun_proof(self, proof: FraudProof) -> RerunResult | None:
        """A fraud proof's job run here, when we serve its model (else None: no verdict)."""
        served = self.job_worker.models.get(proof.receipt.model_id) if self.job_worker is not None else None
        if served is None:
            return None
        req = RunRequest(inputs=proof.inputs, texts=proof.texts, max_tokens=proof.max_tokens)

        def run() -> RerunResult:
            served.executor.check(req)
            if req.max_tokens > 0:
                stream, _ = served.executor.token_stream(req)
                return (), tuple(token for token, _ in stream)
            return served.executor.run([req])[0].outputs, ()

        async with self._rerunning:  # one at a time, beside the jobs
            return await trio.to_thread.run_sync(run)

    def _receipt_log(self, stack: AsyncExitStack) -> ReceiptLog | None:
        path = self.config.receipts_file
        if path is None and self.config.payments is not None:
            path = self.config.payments.data_dir / "receipts.log"
        if path is None:
            return None
        log_ = ReceiptLog(path)
        stack.callback(log_.close)
        return log_

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.job_client is not None and exc_type is None:  # vouchers still on their way go first
            with trio.move_on_after(FLUSH_PAYMENTS_S) as scope:
                scope.shield = True
                await self.job_client.flush_payments()
        stack, self._stack, self._nursery = self._stack, None, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    def _running(self) -> trio.Nursery:
        if self._nursery is None:
            raise NotRunning("the node is not running: use it inside `async with Node(...)`")
        return self._nursery

    # ---- peers and gossip ---------------------------------------------------------

    async def connect(self, addr: str) -> bytes:
        """Dial the peer at a full multiaddr (``.../p2p/<PeerId>``); return its PeerId."""
        return await connect(self.host, addr)

    def connected_peers(self) -> list[bytes]:
        return self.dialer.connected_peers()

    async def subscribe(self, topic: str, *, queue_size: int = 1024) -> Subscription:
        """Subscribe to a gossip topic; messages arrive in a queue of ``queue_size``
        with a visible drop counter. The pump stops with the node."""
        return await self.gossip.subscribe(topic, self._running(), queue_size=queue_size)

    async def publish(self, topic: str, data: bytes, *, max_wait_s: float = 1.0) -> None:
        """Publish ``data`` on a gossip topic (signed by this node's key); see :meth:`.Gossip.publish`."""
        self._running()
        await self.gossip.publish(topic, data, max_wait_s=max_wait_s)

    async def events(self) -> AsyncIterator[NodeEvent]:
        """Node events (workers seen, peers banned). The queue is bounded: when
        the consumer lags, new events are dropped and counted."""
        async for event in self._events:
            yield event

    async def find_workers(
        self, model_id: bytes, *, use_dht: bool = True, timeout_s: float = 10.0
    ) -> list[WorkerOffer]:
        """Every live worker known for ``model_id``: gossip and DHT merged,
        deduplicated per worker, freshest first. DHT errors only shorten the list."""
        records: list[CapabilityRecord] = []
        if use_dht:
            with trio.move_on_after(timeout_s):
                records = await self.dht.lookup(model_id)
        now = now_ms()
        self.directory.expire(now)
        return self.directory.workers_for(model_id, now_ms=now, extra=records)

    def catalog(self) -> list[CatalogRow]:
        """The named models live workers announce (name, variant, id, workers, lowest price)."""
        return self.directory.catalog(now_ms())

    async def resolve_model(self, ref: str, *, wait_s: float = 0.0) -> bytes:
        """The model id ``ref`` names: a 64-digit hex id, or ``name``, ``name:variant`` or
        ``name@<id prefix>`` as workers announce them (the best-served match: most
        workers, then the lowest price). Waits up to ``wait_s`` for a match to be
        announced. Raises JobFailed ``no-workers`` when none is, LocalProtocolError
        for a malformed reference."""
        parsed = parse_ref(ref)
        with trio.move_on_after(wait_s):
            while not (ids := self.directory.resolve(parsed, now_ms())):
                await trio.sleep(0.1)
        if not (ids := self.directory.resolve(parsed, now_ms())):
            raise JobFailed(NO_WORKERS, f"no worker announces a model named {ref!r}")
        return ids[0]

    # ---- serving ------------------------------------------------------------------

    def set_capabilities(self, capabilities: list[ModelCapability]) -> None:
        """Serve these models: announce them on gossip and publish DHT records, at once."""
        self.advertiser.set_capabilities(capabilities)

    def set_load(self, *, running_jobs: int, free_capacity: dict[bytes, int]) -> None:
        """Report current load; it goes out with the next announcement."""
        self.advertiser.set_load(running_jobs=running_jobs, free_capacity=free_capacity)

    def serve_model(
        self,
        spec: ModelSpec,
        backend: Backend,
        *,
        price_nanoton: int,
        gpu: str = "cpu",
        limits: InputLimits | None = None,
        catalog: CatalogEntry | None = None,
        completion_price_nanoton: int | None = None,
    ) -> None:
        """Serve a hash-checked model at ``price_nanoton`` per unit (and, for a generation
        model, ``completion_price_nanoton`` per generated token; None: the same): accept
        its jobs and advertise it (gossip + DHT).

        ``limits``: what one job may ask (None: derived from the model); bigger jobs
        are refused with ``too-large`` before any work starts. ``catalog``: the name and
        variant it is announced under (None: the spec's public name and variant)."""
        worker = self._job_worker()
        worker.serve(
            spec, backend, price_nanoton=price_nanoton, limits=limits, completion_price_nanoton=completion_price_nanoton
        )
        caps = [c for c in self.advertiser.capabilities if c.model_id != spec.model_id]
        caps.append(
            ModelCapability(
                model_id=spec.model_id,
                backend=backend.name,
                gpu=gpu if backend.device != "cpu" else "cpu",
                max_batch=spec.max_batch,
                price_nanoton=price_nanoton,
                unit=spec.unit,
                capacity=worker.capacity,
                limits=advertised(worker.limits(spec.model_id)),
                catalog=catalog or default_catalog(spec),
                completion_price_nanoton=completion_price_nanoton,
            )
        )
        self.set_capabilities(caps)

    def serve_engine(
        self, runner: EngineRunner, capability: ModelCapability, *, watch: EngineWatch | None = None
    ) -> None:
        """Serve a model an OpenAI-compatible engine runs (:mod:`~.execution.engine_runner`)
        and advertise it under ``capability``; while health checks (``watch``) find the
        engine down, the offer is withdrawn, and put back once it answers again."""

        def on_health(model_id: bytes, up: bool) -> None:
            others = [c for c in self.advertiser.capabilities if c.model_id != model_id]
            self.set_capabilities([*others, capability] if up else others)

        self._job_worker().serve_engine(
            runner, price_nanoton=capability.price_nanoton, capacity=capability.capacity, watch=watch,
            on_health=on_health, completion_price_nanoton=capability.completion_price_nanoton,
        )  # fmt: skip
        on_health(capability.model_id, True)

    def stop_accepting_jobs(self) -> None:
        """New jobs are refused with ``shutting-down``; running ones finish."""
        if self.job_worker is not None:
            self.job_worker.stop_accepting()

    def _job_worker(self) -> JobWorker:
        if self.job_worker is None:
            self.job_worker = JobWorker(
                self.host,
                self._running(),
                capacity=self.config.job_capacity,
                feedback=self.guard,
                load=self.advertiser,
                payments=self.payments,
                per_client=self.config.jobs_per_client,
                identity=self.identity,
            )
        return self.job_worker

    # ---- jobs as a client -----------------------------------------------------------

    async def flush_payments(self) -> None:
        """Wait until every job's payment is sent (a job returns before its voucher goes,
        and the vouchers of jobs finished together are coalesced): before settling."""
        await self._client().flush_payments()

    def _client(self) -> JobClient:
        if self.job_client is None:
            raise NotRunning("the node is not running: use it inside `async with Node(...)`")
        return self.job_client

    async def _job_offers(self, model_id: bytes) -> list[WorkerOffer]:
        offers = await self.find_workers(model_id, use_dht=False)
        return offers or await self.find_workers(model_id, use_dht=True, timeout_s=LOOKUP_FALLBACK_TIMEOUT_S)

    async def infer(
        self,
        model_id: bytes,
        *,
        inputs: tuple[Tensor, ...] = (),
        texts: tuple[str, ...] = (),
        max_price_nanoton: int,
        timeout_s: float = 30.0,
        require_tee: bool = False,
    ) -> InferenceResult:
        """Run one job on the network: the router picks a worker for ``model_id``
        at no more than ``max_price_nanoton`` per unit; retried elsewhere on failure.
        With ``require_tee`` only workers whose TEE evidence passes
        ``NodeConfig.attestation`` are candidates. Raises :class:`~.jobs.client.JobFailed`
        (``no-attested-workers`` when the model has workers but none is attested)."""
        return await self._client().infer(
            model_id,
            inputs=inputs,
            texts=texts,
            max_price=max_price_nanoton,
            timeout_s=timeout_s,
            require_tee=require_tee,
        )

    async def check_attestation(self, peer_id: bytes, *, addrs: tuple[str, ...] = ()) -> Verdict:
        """Ask ``peer_id`` for its TEE evidence and judge it under ``NodeConfig.attestation``
        (or return the verdict that still stands). Never raises for a refusal: read
        ``verdict.accepted`` and ``verdict.reason``."""
        self._running()
        return await self.tee_gate.check(peer_id, addrs or tuple(self.directory.addrs_of(peer_id)))

    async def generate(
        self,
        model_id: bytes,
        prompt: str,
        *,
        max_tokens: int,
        max_price_nanoton: int,
        timeout_s: float = 120.0,
        require_tee: bool = False,
        sampling: Sampling | None = None,
        chat: ChatOptions | None = None,
    ) -> AsyncGenerator[JobChunk | InferenceResult, None]:
        """Generate text: yields each :class:`~.jobs.frames.JobChunk` as the worker
        streams it, then the :class:`~.jobs.client.InferenceResult` (usage and cost).

        ``prompt`` is the full model input (for chat models see
        :func:`~.execution.generation.chatml_prompt`). ``sampling``: temperature, top_p,
        seed, penalties, stop strings, logprobs (None: greedy). ``chat``: for a model an
        engine serves, the chat's messages (the engine applies its model's own template;
        ``prompt`` then only bounds the bill), ``response_format`` and ``tools``; the
        result's ``tool_calls`` holds the calls made. Leaving the loop early cancels the
        job on the worker. Raises :class:`~.jobs.client.JobFailed`.
        """
        stream = self._client().generate(
            model_id,
            prompt,
            max_tokens=max_tokens,
            max_price=max_price_nanoton,
            timeout_s=timeout_s,
            require_tee=require_tee,
            sampling=sampling,
            chat=chat,
        )
        async with aclosing(stream) as items:
            async for item in items:
                yield item

    # ---- metrics ----------------------------------------------------------------------

    def metrics(self) -> list[Metric]:
        """Every service's metrics, as ``/metrics`` exports them."""
        out = [
            metric(
                "cocoon_workers_known",
                "gauge",
                "Workers whose announcement is live",
                len(self.directory.known_peers(now_ms())),
            )
        ]
        out += self.dialer.metrics() + self.gossip.metrics() + self.advertiser.metrics()
        out += self.guard.metrics() + self.dht.metrics() + self.muxer_stats.metrics() + self.admission.metrics()
        out += self.tee_gate.metrics() + self.fraud.metrics() + self.nat.metrics()
        for service in (self.job_worker, self.job_client, self.payments, self.evidence):
            if service is not None:
                out += service.metrics()
        return out


@asynccontextmanager
async def open_node(config: NodeConfig | None = None) -> AsyncIterator[Node]:
    """``async with open_node(cfg) as node``: the same as ``async with Node(cfg)``."""
    async with Node(config) as node:
        yield node


def default_catalog(spec: ModelSpec) -> CatalogEntry:
    """The name and variant a model is announced under when its server names none."""
    return CatalogEntry(catalog_name(spec.public_name or spec.name), catalog_name(spec.variant, 32), spec.kind)
