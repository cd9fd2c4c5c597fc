"""Capability records: what a worker can run, signed and expiring, for the DHT.

A worker publishes one record per model under ``/cocoon/<model-hex>/<peer-id>``
and announces itself as a provider of the model's multihash, so a client finds
every worker of a model with one provider lookup (a key per model), then reads
and verifies each worker's record. Pure data and codecs: no I/O.

Wire format (version 1), a canonical msgpack array::

    [1, peer_id, model_id, backend, gpu, gpu_memory_mb, max_batch,
     price_nanoton, unit, capacity, addrs, issued_at_ms, expires_at_ms(, tee(, completion_price)), signature]

``tee`` (:mod:`.teeclaim`) is optional: the worker's claim to run in a TEE; nil when a
completion price (per generated token, when it differs from ``price_nanoton``) follows.

The signature is Ed25519 by the PeerId's key over ``b"cocoon/capability/1\\0"``
followed by the canonical encoding of every field before it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core import signed, wire
from cocoon_p2p.core.errors import ForeignKey, MalformedMessage
from cocoon_p2p.core.identity import PEER_ID_BYTES, Identity, peer_id_from_str, peer_id_to_str
from cocoon_p2p.core.pricing import Price

from .teeclaim import TeeClaim

VERSION = 1
DOMAIN = b"cocoon/capability/1"
NAMESPACE = "cocoon"
MAX_RECORD_BYTES = 2048
MAX_TTL_MS = 24 * 3600 * 1000
MAX_ADDRS = 8
MAX_ADDR_LEN = 200
MAX_NAME_LEN = 64
_FIELDS = 14
# multihash header for sha2-256 (code 0x12, length 32): provider keys are real multihashes.
_SHA256_MULTIHASH = b"\x12\x20"


@dataclass(frozen=True, kw_only=True)
class CapabilityRecord:
    """One worker's offer for one model. Build with :meth:`create`, parse with :func:`decode`."""

    peer_id: bytes
    model_id: bytes  # sha256 of the ONNX file
    backend: str  # "tensorrt", "onnxruntime", ...
    gpu: str  # GPU name, or "cpu"
    gpu_memory_mb: int
    max_batch: int
    price_nanoton: int  # per unit of work
    unit: str  # "token", "item", ...
    capacity: int  # jobs it runs at once
    addrs: tuple[str, ...]
    issued_at_ms: int  # also the record's sequence number: newer wins
    expires_at_ms: int
    tee: TeeClaim | None = None
    completion_price_nanoton: int | None = None  # per generated token (None: price_nanoton)
    signature: bytes = b""

    @property
    def price(self) -> Price:
        """What the worker charges per input unit and per generated token."""
        return Price.of(self.price_nanoton, self.completion_price_nanoton)

    @classmethod
    def create(cls, ident: Identity, *, ttl_ms: int, now_ms: int, **fields: Any) -> CapabilityRecord:
        """A record for ``ident``'s PeerId, signed, valid from ``now_ms`` for ``ttl_ms``."""
        rec = cls(peer_id=ident.peer_id, issued_at_ms=now_ms, expires_at_ms=now_ms + ttl_ms, **fields)
        rec._check_fields()
        return dataclasses.replace(rec, signature=signed.sign(ident, DOMAIN, rec._unsigned()))

    @property
    def peer_id_str(self) -> str:
        return peer_id_to_str(self.peer_id)

    def _unsigned(self) -> list[Any]:
        fields = [
            VERSION,
            self.peer_id,
            self.model_id,
            self.backend,
            self.gpu,
            self.gpu_memory_mb,
            self.max_batch,
            self.price_nanoton,
            self.unit,
            self.capacity,
            list(self.addrs),
            self.issued_at_ms,
            self.expires_at_ms,
        ]
        tee = self.tee.fields() if self.tee is not None else None
        if self.completion_price_nanoton is not None:
            return fields + [tee, self.completion_price_nanoton]
        return fields + [tee] if tee is not None else fields

    def _check_fields(self) -> None:
        wire.expect_bytes(self.peer_id, "peer_id", min_len=PEER_ID_BYTES, max_len=PEER_ID_BYTES)
        wire.expect_bytes(self.model_id, "model_id", min_len=32, max_len=32)
        for name in ("backend", "gpu", "unit"):
            wire.expect_str(getattr(self, name), name, min_len=1, max_len=MAX_NAME_LEN)
        for name in ("gpu_memory_mb", "price_nanoton"):
            wire.expect_int(getattr(self, name), name)
        if self.completion_price_nanoton is not None:
            wire.expect_int(self.completion_price_nanoton, "completion_price_nanoton")
        for name in ("max_batch", "capacity"):
            wire.expect_int(getattr(self, name), name, lo=1, hi=1 << 20)
        if not isinstance(self.addrs, tuple):
            raise MalformedMessage("addrs: expected a tuple of multiaddrs")
        wire.expect_str_list(list(self.addrs), "addrs", max_items=MAX_ADDRS, max_len=MAX_ADDR_LEN)

    def encode(self) -> bytes:
        data = wire.pack([*self._unsigned(), self.signature])
        if len(data) > MAX_RECORD_BYTES:
            raise MalformedMessage(f"capability record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
        return data

    def dht_key(self) -> str:
        return dht_key(self.model_id, self.peer_id)


def decode(data: bytes, *, now_ms: int) -> CapabilityRecord:
    """Parse and fully validate a record: size, shape, canonical form, signature, expiry."""
    raw = wire.unpack(data, max_size=MAX_RECORD_BYTES, what="capability record")
    extra = min(max(len(raw) - _FIELDS, 0), 2) if isinstance(raw, list) else 0  # tee, then completion price
    obj = wire.expect_list(raw, _FIELDS + extra, "capability record")
    if extra == 1 and obj[13] is None:
        raise MalformedMessage("capability record: a trailing nil")
    if obj[0] != VERSION:
        raise MalformedMessage(f"capability record: unknown version {obj[0]!r}", code="version")
    rec = CapabilityRecord(
        peer_id=obj[1],
        model_id=obj[2],
        backend=obj[3],
        gpu=obj[4],
        gpu_memory_mb=obj[5],
        max_batch=obj[6],
        price_nanoton=obj[7],
        unit=obj[8],
        capacity=obj[9],
        addrs=wire.expect_str_list(obj[10], "addrs", max_items=MAX_ADDRS, max_len=MAX_ADDR_LEN),
        issued_at_ms=wire.expect_int(obj[11], "issued_at_ms"),
        expires_at_ms=wire.expect_int(obj[12], "expires_at_ms"),
        tee=TeeClaim.parse(obj[13]) if extra and obj[13] is not None else None,
        completion_price_nanoton=obj[14] if extra == 2 else None,
        signature=wire.expect_bytes(obj[-1], "signature", min_len=64, max_len=64),
    )
    rec._check_fields()
    signed.check_window(rec.issued_at_ms, rec.expires_at_ms, now_ms, max_ttl_ms=MAX_TTL_MS, what="capability record")
    signed.verify(rec.peer_id, DOMAIN, rec._unsigned(), rec.signature)
    return rec


def dht_key(model_id: bytes, peer_id: bytes) -> str:
    """DHT value key of one worker's record for one model."""
    return f"/{NAMESPACE}/{model_id.hex()}/{peer_id_to_str(peer_id)}"


def provider_key(model_id: bytes) -> str:
    """The model's sha2-256 multihash in hex: the DHT provider key for the model."""
    return (_SHA256_MULTIHASH + model_id).hex()


def decode_for_key(key: str, data: bytes, *, now_ms: int) -> CapabilityRecord:
    """Validate a DHT (key, value) pair: the record must be valid *and* stored
    under its own key, so nobody can park a record under another worker's or
    model's name."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "" or parts[1] != NAMESPACE:
        raise ForeignKey(f"key {key[:100]!r} is not in the /{NAMESPACE}/ namespace")
    try:
        model_id = bytes.fromhex(parts[2])
    except ValueError as exc:
        raise ForeignKey("key does not name a model id") from exc
    peer_id = peer_id_from_str(parts[3])
    rec = decode(data, now_ms=now_ms)
    if rec.model_id != model_id or rec.peer_id != peer_id:
        raise ForeignKey("record is stored under another worker's or model's key")
    return rec


def select_newest(records: list[CapabilityRecord]) -> int:
    """Index of the record to keep among versions of the same key: the newest."""
    if not records:
        raise ValueError("no records to select from")
    return max(range(len(records)), key=lambda i: (records[i].issued_at_ms, records[i].expires_at_ms))
