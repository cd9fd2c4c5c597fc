"""The worker directory: what a peer knows about workers, from gossip and the DHT.

A sans-IO store. Gossip announcements and DHT capability records go in (as bytes
or as already-verified records); the merged list of workers for a model comes
out, one row per (worker, model), the freshest information first. It enforces
per-origin replay protection and rate limits and bounds its own memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter

from cocoon_p2p.core.errors import ForeignKey, RateLimited, ReplayedMessage
from cocoon_p2p.core.pricing import Price

from . import announcement as ann_mod
from .announcement import Announcement
from .capability import CapabilityRecord
from .catalog import CatalogEntry, ModelRef
from .joblimits import JobLimits
from .teeclaim import TeeClaim


@dataclass(frozen=True, kw_only=True)
class WorkerOffer:
    """One worker's offer of one model, as merged from every source."""

    peer_id: bytes
    model_id: bytes
    addrs: tuple[str, ...]
    backend: str
    gpu: str
    price_nanoton: int
    unit: str
    capacity: int
    free_capacity: int | None  # None: only known from the DHT, which carries no load
    running_jobs: int | None
    issued_at_ms: int
    expires_at_ms: int
    sources: frozenset[str]  # {"gossip", "dht"}
    gpu_memory_mb: int | None = None
    max_batch: int | None = None
    limits: JobLimits | None = None  # what one job may ask (None: not advertised; only gossip says)
    tee: TeeClaim | None = None  # the worker's claim to run in a TEE (unverified)
    catalog: CatalogEntry | None = None  # the name and variant it offers the model under (only gossip says)
    completion_price_nanoton: int | None = None  # per generated token (None: price_nanoton)

    @property
    def price(self) -> Price:
        """What the worker charges per input unit and per generated token."""
        return Price.of(self.price_nanoton, self.completion_price_nanoton)


@dataclass(frozen=True)
class CatalogRow:
    """A named model on the network: how many live workers offer it, from what price."""

    entry: CatalogEntry
    model_id: bytes
    unit: str
    workers: int
    min_price_nanoton: int
    backends: frozenset[str]
    min_completion_price_nanoton: int = 0  # the lowest price per generated token


MAX_CACHED_MODELS = 1024
_GOSSIP, _DHT, _BOTH = frozenset({"gossip"}), frozenset({"dht"}), frozenset({"gossip", "dht"})


@dataclass
class _Origin:
    announcement: Announcement
    accepted_at_ms: int
    credit: float  # announcements it may still send at once (the rate limit's token bucket)


@dataclass
class _CachedOffers:
    built_ms: int  # entries are judged live or expired at this time
    valid_until_ms: int  # the first expiry among the entries it was built from
    rows: dict[bytes, WorkerOffer]  # by worker
    offers: list[WorkerOffer] | None = None  # the rows, freshest first (None: sort again)


@dataclass
class WorkerDirectory:
    """Known workers, keyed by PeerId. ``min_interval_ms`` is the fastest sustained
    rate at which one origin's announcements are accepted, ``max_burst`` how many may
    arrive at once (gossip bunches them: a cache replayed to a new peer, a slow
    link catching up); ``max_workers`` bounds memory."""

    max_workers: int = 10_000
    min_interval_ms: int = 200
    max_burst: int = 4
    _origins: dict[bytes, _Origin] = field(default_factory=dict)
    _records: dict[tuple[bytes, bytes], CapabilityRecord] = field(default_factory=dict)
    # A client asks for a model's offers on every job, and a scan costs O(workers known):
    # the answer is kept per model until the directory changes or an entry in it expires.
    _next_expiry_ms: int = 0  # no entry expires before this (0: unknown, scan)
    _offers: dict[bytes, _CachedOffers] = field(default_factory=dict)
    # The newest announcement time of peers forgotten (banned, lost): a replay of an older
    # one arriving later (gossip caches keep them) must not bring back their stale terms.
    _forgotten: dict[bytes, int] = field(default_factory=dict)

    def receive_announcement(self, data: bytes, *, origin: bytes | None, now_ms: int) -> Announcement:
        """Verify and store a gossiped announcement.

        ``origin`` is the PeerId that gossipsub says authored the message; it must
        be the announcement's own PeerId (nobody re-publishes another's
        announcement under their own name). Raises a RemoteProtocolError
        subclass when the message must be rejected.
        """
        return self.accept(ann_mod.decode(data, now_ms=now_ms), origin=origin, now_ms=now_ms)

    def accept(self, ann: Announcement, *, origin: bytes | None, now_ms: int) -> Announcement:
        """Store an announcement already decoded and verified (:meth:`receive_announcement`
        without the signature check: for a caller that verified these bytes before, such as
        a simulator delivering one message to many peers)."""
        if origin is not None and origin != ann.peer_id:
            raise ForeignKey("announcement published by a peer other than its signer")
        known = self._origins.get(ann.peer_id)
        credit = float(self.max_burst)
        if known is None and ann.issued_at_ms <= self._forgotten.get(ann.peer_id, -1):
            raise ReplayedMessage("announcement is not newer than one already held")
        if known is not None:
            if ann.issued_at_ms <= known.announcement.issued_at_ms:
                raise ReplayedMessage("announcement is not newer than the one already held")
            if self.min_interval_ms > 0:  # 0: no rate limit
                earned = max(0, now_ms - known.accepted_at_ms) / self.min_interval_ms
                credit = min(credit, known.credit + earned)
            if credit < 1.0:
                raise RateLimited("origin announces faster than allowed")
        elif len(self._origins) >= self.max_workers:
            self.expire(now_ms)
            if len(self._origins) >= self.max_workers:
                oldest = min(self._origins, key=lambda p: self._origins[p].announcement.expires_at_ms)
                del self._origins[oldest]
                self._changed()  # the cached answers hold its rows
        self._origins[ann.peer_id] = _Origin(ann, now_ms, credit - 1.0)
        self._forgotten.pop(ann.peer_id, None)
        models = {o.model_id for o in ann.offers}
        if known is not None:
            models.update(o.model_id for o in known.announcement.offers)
        self._patch(ann.peer_id, models, ann.expires_at_ms)
        return ann

    def _changed(self, expires_at_ms: int | None = None) -> None:
        self._offers.clear()
        if expires_at_ms is not None and self._next_expiry_ms:
            self._next_expiry_ms = min(self._next_expiry_ms, expires_at_ms)

    def _patch(self, peer_id: bytes, models: set[bytes], expires_at_ms: int) -> None:
        """One worker's entries changed for ``models``: its row in each cached answer is
        built again, the rest kept (a gateway hears thousands of load announcements between
        two jobs; rebuilding every row after each cost O(workers) a job)."""
        if self._next_expiry_ms:
            self._next_expiry_ms = min(self._next_expiry_ms, expires_at_ms)
        for model_id in models:
            cached = self._offers.get(model_id)
            if cached is None:
                continue
            row, first_expiry = self._row(peer_id, model_id, cached.built_ms)
            if row is None:
                cached.rows.pop(peer_id, None)
            else:
                cached.rows[peer_id] = row
            cached.valid_until_ms = min(cached.valid_until_ms, first_expiry)
            cached.offers = None

    def add_record(self, rec: CapabilityRecord) -> None:
        """Store a verified DHT capability record, keeping the newest per key."""
        key = (rec.peer_id, rec.model_id)
        held = self._records.get(key)
        if held is None or rec.issued_at_ms > held.issued_at_ms:
            if held is None and len(self._records) >= self.max_workers * 4:
                oldest = min(self._records, key=lambda k: self._records[k].expires_at_ms)
                del self._records[oldest]
                self._changed()  # the cached answers hold its rows
            self._records[key] = rec
            self._patch(rec.peer_id, {rec.model_id}, rec.expires_at_ms)

    def expire(self, now_ms: int) -> None:
        """Forget whatever has expired."""
        if now_ms < self._next_expiry_ms:
            return
        self._origins = {p: o for p, o in self._origins.items() if o.announcement.expires_at_ms > now_ms}
        self._records = {k: r for k, r in self._records.items() if r.expires_at_ms > now_ms}
        expiries = [o.announcement.expires_at_ms for o in self._origins.values()]
        expiries += [r.expires_at_ms for r in self._records.values()]
        self._next_expiry_ms = min(expiries, default=2**63)
        self._changed()

    def forget(self, peer_id: bytes) -> None:
        """Drop everything known about a peer (e.g. when it is banned), but how new its
        newest announcement was."""
        origin = self._origins.pop(peer_id, None)
        if origin is not None:
            if len(self._forgotten) >= self.max_workers:
                self._forgotten.pop(next(iter(self._forgotten)))  # the longest forgotten
            self._forgotten[peer_id] = origin.announcement.issued_at_ms
        self._records = {k: r for k, r in self._records.items() if k[0] != peer_id}
        self._changed()

    def announcement_of(self, peer_id: bytes) -> Announcement | None:
        origin = self._origins.get(peer_id)
        return origin.announcement if origin else None

    def addrs_of(self, peer_id: bytes) -> list[str]:
        """The addresses a peer announces now (none if unknown): where a restarted worker is."""
        ann = self.announcement_of(peer_id)
        return list(ann.addrs) if ann is not None else []

    def known_peers(self, now_ms: int) -> list[Announcement]:
        """Live announcements, freshest first (candidates to connect to)."""
        live = [o.announcement for o in self._origins.values() if o.announcement.expires_at_ms > now_ms]
        return sorted(live, key=lambda a: -a.issued_at_ms)

    def catalog(self, now_ms: int) -> list[CatalogRow]:
        """Every named model live workers announce: one row per (name, variant, model id),
        most workers first, then by name."""
        rows: dict[tuple[CatalogEntry, bytes], CatalogRow] = {}
        for origin in self._origins.values():
            a = origin.announcement
            if a.expires_at_ms <= now_ms:
                continue
            for o in a.offers:
                if o.catalog is None:
                    continue
                key = (o.catalog, o.model_id)
                row = rows.get(key)
                price = o.price
                rows[key] = CatalogRow(
                    o.catalog,
                    o.model_id,
                    o.unit,
                    (row.workers if row else 0) + 1,
                    min(row.min_price_nanoton, price.unit) if row else price.unit,
                    (row.backends if row else frozenset()) | {o.backend},
                    min(row.min_completion_price_nanoton, price.completion) if row else price.completion,
                )
        return sorted(rows.values(), key=lambda r: (-r.workers, r.entry.name, r.entry.variant, r.model_id))

    def resolve(self, ref: ModelRef, now_ms: int) -> list[bytes]:
        """The model ids live workers offer that match ``ref``, best first (most workers,
        then the lowest price). A model id resolves to itself, offered or not."""
        if ref.model_id is not None:
            return [ref.model_id]
        rows = [r for r in self.catalog(now_ms) if ref.matches(r.model_id, r.entry)]
        rows.sort(key=lambda r: (-r.workers, r.min_price_nanoton, r.model_id))
        return list(dict.fromkeys(r.model_id for r in rows))

    def workers_for(self, model_id: bytes, *, now_ms: int, extra: Iterable[CapabilityRecord] = ()) -> list[WorkerOffer]:
        """All live offers of ``model_id``, gossip and DHT merged per worker.

        The fresher source supplies the offer's terms; the gossip source alone
        supplies live load. Sorted freshest first, then by PeerId for stability.
        """
        for rec in extra:
            self.add_record(rec)
        cached = self._offers.get(model_id)
        if cached is None or not cached.built_ms <= now_ms < cached.valid_until_ms:
            live = (o.announcement for o in self._origins.values() if o.announcement.expires_at_ms > now_ms)
            peers = {a.peer_id for a in live if any(x.model_id == model_id for x in a.offers)}
            peers.update(p for (p, m), r in self._records.items() if m == model_id and r.expires_at_ms > now_ms)
            valid_until, rows = 2**63, {}
            for peer_id in peers:
                row, first_expiry = self._row(peer_id, model_id, now_ms)
                if row is not None:
                    rows[peer_id] = row
                    valid_until = min(valid_until, first_expiry)
            if len(self._offers) >= MAX_CACHED_MODELS:
                self._offers.clear()
            cached = self._offers[model_id] = _CachedOffers(now_ms, valid_until, rows)
        if cached.offers is None:  # freshest first, then by PeerId: two stable sorts in C
            cached.offers = sorted(cached.rows.values(), key=attrgetter("peer_id"))
            cached.offers.sort(key=attrgetter("issued_at_ms"), reverse=True)
        return list(cached.offers)

    def _row(self, peer_id: bytes, model_id: bytes, now_ms: int) -> tuple[WorkerOffer | None, int]:
        """``peer_id``'s offer of ``model_id`` live at ``now_ms``, gossip and DHT merged (the
        fresher source gives the terms, gossip alone the load), or None; and the first
        expiry among the entries it was built from."""
        have: WorkerOffer | None = None
        first_expiry = 2**63
        origin = self._origins.get(peer_id)
        if origin is not None and origin.announcement.expires_at_ms > now_ms:
            a = origin.announcement
            for o in a.offers:
                if o.model_id == model_id:
                    first_expiry = min(first_expiry, a.expires_at_ms)
                    have = WorkerOffer(
                        peer_id=a.peer_id,
                        model_id=model_id,
                        addrs=a.addrs,
                        backend=o.backend,
                        gpu=o.gpu,
                        price_nanoton=o.price_nanoton,
                        unit=o.unit,
                        capacity=o.capacity,
                        free_capacity=o.free_capacity,
                        running_jobs=a.running_jobs,
                        issued_at_ms=a.issued_at_ms,
                        expires_at_ms=a.expires_at_ms,
                        sources=_GOSSIP,
                        limits=o.limits,
                        tee=a.tee,
                        catalog=o.catalog,
                        completion_price_nanoton=o.completion_price_nanoton,
                    )
        r = self._records.get((peer_id, model_id))
        if r is None or r.expires_at_ms <= now_ms:
            return have, first_expiry
        base = have if have is not None and have.issued_at_ms >= r.issued_at_ms else r
        merged = WorkerOffer(
            peer_id=peer_id,
            model_id=model_id,
            addrs=base.addrs,
            backend=base.backend,
            gpu=base.gpu,
            price_nanoton=base.price_nanoton,
            unit=base.unit,
            capacity=base.capacity,
            free_capacity=have.free_capacity if have else None,
            running_jobs=have.running_jobs if have else None,
            issued_at_ms=base.issued_at_ms,
            expires_at_ms=base.expires_at_ms,
            sources=_BOTH if have else _DHT,
            gpu_memory_mb=r.gpu_memory_mb,
            max_batch=r.max_batch,
            limits=have.limits if have else None,
            tee=base.tee,
            catalog=have.catalog if have else None,
            completion_price_nanoton=base.completion_price_nanoton,
        )
        return merged, min(first_expiry, r.expires_at_ms)
