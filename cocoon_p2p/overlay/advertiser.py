"""Telling the network what this worker serves (the trio side): announcements and DHT records.

A worker's terms (:class:`ModelCapability`) and load go out as signed
announcements on gossip (every ``announce_interval_s``, and soon after a
change) and as signed capability records in the DHT (when the terms change,
and at half their lifetime). ``/cocoon/info/1`` answers with the current
announcement, a direct way to learn a peer's offers without gossip.

Cancellation: :meth:`Advertiser.run` stops with the node; what it had
published stays valid until it expires.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.core.metrics import Metric, metric

from . import protocols
from .announcement import Announcement, Offer
from .capability import CapabilityRecord
from .catalog import CatalogEntry
from .dht import CapabilityDht
from .gossip import Gossip
from .joblimits import JobLimits
from .teeclaim import TeeClaim

log = logging.getLogger(__name__)
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
    limits: JobLimits | None = None  # what one job may ask; announced in gossip offers
    catalog: CatalogEntry | None = None  # the model's public name and variant; announced in gossip offers
    completion_price_nanoton: int | None = None  # per generated token (None: price_nanoton)


@dataclass(frozen=True, kw_only=True)
class AdvertiseTimes:
    """How often, and for how long, what we publish holds."""

    announce_interval_s: float = 10.0
    announce_ttl_s: float = 30.0
    record_ttl_s: float = 3600.0


class Advertiser:
    """Publishes this node's capabilities and load; implements the job layer's ``LoadReport``."""

    def __init__(
        self,
        identity: Identity,
        *,
        addrs: Callable[[], list[str]],
        gossip: Gossip,
        dht: CapabilityDht,
        times: AdvertiseTimes,
    ) -> None:
        self.identity = identity
        self.addrs = addrs
        self.gossip = gossip
        self.dht = dht
        self.times = times
        self.announcements_sent = 0
        self._capabilities: tuple[ModelCapability, ...] = ()
        self._free: dict[bytes, int] = {}
        self._running_jobs = 0
        self._tee: TeeClaim | None = None
        self._changed = trio.Event()
        self._last_announce_ms = 0

    @property
    def capabilities(self) -> tuple[ModelCapability, ...]:
        return self._capabilities

    def set_capabilities(self, capabilities: list[ModelCapability]) -> None:
        """Serve these models: announce them on gossip and publish DHT records, at once."""
        for c in capabilities:
            if len(c.model_id) != 32:
                raise ConfigError("model_id is the 32-byte sha256 of the model file")
        self._capabilities = tuple(capabilities)
        self._free = {c.model_id: self._free.get(c.model_id, c.capacity) for c in capabilities}
        self._changed.set()

    @property
    def tee_claim(self) -> TeeClaim | None:
        return self._tee

    def set_tee_claim(self, claim: TeeClaim | None) -> None:
        """Claim a TEE (or stop claiming one) in announcements and records, from the next
        announcement on; records are republished with it."""
        if claim != self._tee:
            self._tee = claim
            self._changed.set()

    def set_load(self, *, running_jobs: int, free_capacity: dict[bytes, int]) -> None:
        """Report current load; it goes out with the next announcement (now, if the gap allows)."""
        if running_jobs != self._running_jobs or any(self._free.get(m) != f for m, f in free_capacity.items()):
            self._running_jobs = running_jobs
            self._free.update(free_capacity)
            self._changed.set()

    def announcement(self, now: int) -> Announcement:
        """Our signed announcement as of ``now`` (ms); its issue time only ever grows."""
        offers = tuple(
            Offer(
                model_id=c.model_id,
                backend=c.backend,
                gpu=c.gpu,
                price_nanoton=c.price_nanoton,
                unit=c.unit,
                capacity=c.capacity,
                free_capacity=max(0, min(c.capacity, self._free.get(c.model_id, c.capacity))),
                limits=c.limits,
                catalog=c.catalog,
                completion_price_nanoton=c.completion_price_nanoton,
            )
            for c in self._capabilities
        )
        issued = max(now, self._last_announce_ms + 1)  # issued_at is the sequence number
        self._last_announce_ms = issued
        return Announcement.create(
            self.identity,
            now_ms=issued,
            ttl_ms=int(self.times.announce_ttl_s * 1000),
            addrs=tuple(self.addrs()),
            offers=offers,
            running_jobs=self._running_jobs,
            tee=self._tee,
        )

    async def run(self) -> None:
        """Announce on every change and interval; refresh DHT records (run in the node's nursery)."""
        next_publish = 0.0
        # Records are republished when what they say changes: the offer, the TEE claim,
        # or the addresses (a relay slot gained or lost, an address AutoNAT confirmed).
        published: tuple[tuple[ModelCapability, ...], TeeClaim | None, tuple[str, ...]] | None = None
        while True:
            with trio.move_on_after(self.times.announce_interval_s):
                await self._changed.wait()
            self._changed = trio.Event()
            if not self._capabilities:
                continue
            await self.gossip.publish(protocols.ANNOUNCE_TOPIC, self.announcement(now_ms()).encode())
            self.announcements_sent += 1
            now_says = (self._capabilities, self._tee, tuple(self.addrs()))
            if published != now_says or trio.current_time() >= next_publish:
                published = now_says
                next_publish = trio.current_time() + self.times.record_ttl_s / 2
                await self._publish_records()
            # Load changes come in bursts (every job start and end): announce at most
            # once per gap, well above the receivers' per-origin limit (the
            # directory's min_interval_ms), as gossip delivery can bunch messages.
            await trio.sleep(max(self.times.announce_interval_s / 10, MIN_ANNOUNCE_GAP_S))

    async def _publish_records(self) -> None:
        """One record per model in the DHT, and the model's key provided."""
        now = now_ms()
        for c in self._capabilities:
            rec = CapabilityRecord.create(
                self.identity,
                now_ms=now,
                ttl_ms=int(self.times.record_ttl_s * 1000),
                model_id=c.model_id,
                backend=c.backend,
                gpu=c.gpu,
                gpu_memory_mb=c.gpu_memory_mb,
                max_batch=c.max_batch,
                price_nanoton=c.price_nanoton,
                unit=c.unit,
                capacity=c.capacity,
                addrs=tuple(self.addrs()),
                tee=self._tee,
                completion_price_nanoton=c.completion_price_nanoton,
            )
            await self.dht.publish(rec)

    async def handle_info(self, stream: Any) -> None:
        """``/cocoon/info/1``: our current announcement, or an empty frame for a pure client."""
        try:
            data = self.announcement(now_ms()).encode() if self._capabilities else b""
            await stream.write(data)
        finally:
            await stream.close()

    def metrics(self) -> list[Metric]:
        return [
            metric("cocoon_announcements_sent_total", "counter", "Announcements published", self.announcements_sent)
        ]
