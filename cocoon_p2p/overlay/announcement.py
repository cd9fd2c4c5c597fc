"""Worker announcements for the gossip topic: who I am, where, what I serve, how loaded.

Wire format (version 1), a canonical msgpack array::

    [1, peer_id, addrs, offers, running_jobs, issued_at_ms, expires_at_ms(, tee), signature]
    offer = [model_id, backend, gpu, price_nanoton, unit, capacity, free_capacity(, limits(, catalog(,
             completion_price_nanoton)))]

``limits`` (:mod:`.joblimits`) is optional: an offer without it is read as one
that says nothing of its limits (as every offer did before it existed); it is nil
when a ``catalog`` entry (:mod:`.catalog`: the model's name and variant) follows, and the
catalog is nil when a completion price (per generated token, when it differs from the
price per unit: :class:`~cocoon_p2p.core.pricing.Price`) follows. So is
``tee`` (:mod:`.teeclaim`), the worker's claim to run in a TEE; absent, it claims none.

``issued_at_ms`` doubles as the origin's sequence number: a receiver keeps the
newest per origin and rejects anything not newer (replays). The signature is by
the PeerId's key over ``b"cocoon/announce/1\\0"`` + the canonical fields. Pure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core import signed, wire
from cocoon_p2p.core.errors import MalformedMessage
from cocoon_p2p.core.identity import PEER_ID_BYTES, Identity, peer_id_to_str
from cocoon_p2p.core.pricing import Price

from .catalog import CatalogEntry
from .joblimits import JobLimits
from .teeclaim import TeeClaim

VERSION = 1
DOMAIN = b"cocoon/announce/1"
MAX_ANNOUNCEMENT_BYTES = 4096
MAX_OFFERS = 16
MAX_TTL_MS = 10 * 60 * 1000
_FIELDS = 8
_OFFER_FIELDS = 7


@dataclass(frozen=True, kw_only=True)
class Offer:
    """A model a worker serves, its price and its load."""

    model_id: bytes
    backend: str
    gpu: str
    price_nanoton: int
    unit: str
    capacity: int
    free_capacity: int
    limits: JobLimits | None = None  # what one job may ask (None: not said)
    catalog: CatalogEntry | None = None  # the model's public name and variant (None: not said)
    completion_price_nanoton: int | None = None  # per generated token (None: price_nanoton)

    @property
    def price(self) -> Price:
        """What the offer charges per input unit and per generated token."""
        return Price.of(self.price_nanoton, self.completion_price_nanoton)

    def _fields(self) -> list[Any]:
        fields = [self.model_id, self.backend, self.gpu, self.price_nanoton, self.unit, self.capacity,
                  self.free_capacity]  # fmt: skip
        limits = self.limits.fields() if self.limits is not None else None
        catalog = self.catalog.fields() if self.catalog is not None else None
        if self.completion_price_nanoton is not None:
            return fields + [limits, catalog, self.completion_price_nanoton]
        if catalog is not None:
            return fields + [limits, catalog]
        return fields + [limits] if limits is not None else fields

    @classmethod
    def _parse(cls, obj: Any) -> Offer:
        # limits, then catalog, then the completion price: each optional, nil when a later one follows
        extra = min(max(len(obj) - _OFFER_FIELDS, 0), 3) if isinstance(obj, list) else 0
        f = wire.expect_list(obj, _OFFER_FIELDS + extra, "offer")
        if (extra == 1 and f[7] is None) or (extra == 2 and f[8] is None):
            raise MalformedMessage("offer: a trailing nil")
        capacity = wire.expect_int(f[5], "capacity", lo=1, hi=1 << 20)
        return cls(
            model_id=wire.expect_bytes(f[0], "model_id", min_len=32, max_len=32),
            backend=wire.expect_str(f[1], "backend", min_len=1, max_len=64),
            gpu=wire.expect_str(f[2], "gpu", min_len=1, max_len=64),
            price_nanoton=wire.expect_int(f[3], "price_nanoton"),
            unit=wire.expect_str(f[4], "unit", min_len=1, max_len=64),
            capacity=capacity,
            free_capacity=wire.expect_int(f[6], "free_capacity", hi=capacity),
            limits=JobLimits.parse(f[7]) if extra and f[7] is not None else None,
            catalog=CatalogEntry.parse(f[8]) if extra >= 2 and f[8] is not None else None,
            completion_price_nanoton=wire.expect_int(f[9], "completion_price_nanoton") if extra == 3 else None,
        )


@dataclass(frozen=True, kw_only=True)
class Announcement:
    """A signed, expiring statement by a worker about itself."""

    peer_id: bytes
    addrs: tuple[str, ...]
    offers: tuple[Offer, ...]
    running_jobs: int
    issued_at_ms: int
    expires_at_ms: int
    tee: TeeClaim | None = None
    signature: bytes = b""

    @classmethod
    def create(
        cls,
        ident: Identity,
        *,
        now_ms: int,
        ttl_ms: int,
        addrs: tuple[str, ...],
        offers: tuple[Offer, ...],
        running_jobs: int,
        tee: TeeClaim | None = None,
    ) -> Announcement:
        ann = cls(
            peer_id=ident.peer_id,
            addrs=tuple(addrs),
            offers=tuple(offers),
            running_jobs=running_jobs,
            issued_at_ms=now_ms,
            expires_at_ms=now_ms + ttl_ms,
            tee=tee,
        )
        for offer in ann.offers:  # validate our own output with the receiver's rules
            Offer._parse(offer._fields())
        return dataclasses.replace(ann, signature=signed.sign(ident, DOMAIN, ann._unsigned()))

    @property
    def peer_id_str(self) -> str:
        return peer_id_to_str(self.peer_id)

    def _unsigned(self) -> list[Any]:
        fields = [
            VERSION,
            self.peer_id,
            list(self.addrs),
            [o._fields() for o in self.offers],
            self.running_jobs,
            self.issued_at_ms,
            self.expires_at_ms,
        ]
        return fields + [self.tee.fields()] if self.tee is not None else fields

    def encode(self) -> bytes:
        data = wire.pack([*self._unsigned(), self.signature])
        if len(data) > MAX_ANNOUNCEMENT_BYTES:
            raise MalformedMessage(f"announcement of {len(data)} bytes exceeds {MAX_ANNOUNCEMENT_BYTES}")
        return data


def decode(data: bytes, *, now_ms: int) -> Announcement:
    """Parse and validate an announcement: size, shape, canonical form, window, signature."""
    raw = wire.unpack(data, max_size=MAX_ANNOUNCEMENT_BYTES, what="announcement")
    with_tee = isinstance(raw, list) and len(raw) == _FIELDS + 1
    obj = wire.expect_list(raw, _FIELDS + with_tee, "announcement")
    if obj[0] != VERSION:
        raise MalformedMessage(f"announcement: unknown version {obj[0]!r}", code="version")
    offers_raw = obj[3]
    if not isinstance(offers_raw, list) or len(offers_raw) > MAX_OFFERS:
        raise MalformedMessage(f"announcement: expected at most {MAX_OFFERS} offers")
    ann = Announcement(
        peer_id=wire.expect_bytes(obj[1], "peer_id", min_len=PEER_ID_BYTES, max_len=PEER_ID_BYTES),
        addrs=wire.expect_str_list(obj[2], "addrs", max_items=8, max_len=200),
        offers=tuple(Offer._parse(o) for o in offers_raw),
        running_jobs=wire.expect_int(obj[4], "running_jobs", hi=1 << 20),
        issued_at_ms=wire.expect_int(obj[5], "issued_at_ms"),
        expires_at_ms=wire.expect_int(obj[6], "expires_at_ms"),
        tee=TeeClaim.parse(obj[7]) if with_tee else None,
        signature=wire.expect_bytes(obj[-1], "signature", min_len=64, max_len=64),
    )
    signed.check_window(ann.issued_at_ms, ann.expires_at_ms, now_ms, max_ttl_ms=MAX_TTL_MS, what="announcement")
    signed.verify(ann.peer_id, DOMAIN, ann._unsigned(), ann.signature)
    return ann
