"""Shared test builders (no I/O)."""

from __future__ import annotations

import hashlib
from typing import Any

from cocoon_p2p.core.identity import Identity
from cocoon_p2p.overlay.announcement import Announcement, Offer
from cocoon_p2p.overlay.capability import CapabilityRecord

NOW = 1_790_000_000_000  # a fixed "now" in ms
MODEL = hashlib.sha256(b"model-a").digest()
MODEL_B = hashlib.sha256(b"model-b").digest()


def ident(n: int) -> Identity:
    return Identity(bytes([n]) * 32)


def record(who: Identity, *, now: int = NOW, ttl: int = 60_000, model: bytes = MODEL, **over: Any) -> CapabilityRecord:
    fields: dict[str, Any] = dict(
        model_id=model,
        backend="onnxruntime",
        gpu="cpu",
        gpu_memory_mb=0,
        max_batch=8,
        price_nanoton=1000,
        unit="item",
        capacity=4,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{who.peer_id_str}",),
    )
    fields.update(over)
    return CapabilityRecord.create(who, now_ms=now, ttl_ms=ttl, **fields)


def offer(model: bytes = MODEL, **over: Any) -> Offer:
    fields: dict[str, Any] = dict(
        model_id=model, backend="onnxruntime", gpu="cpu", price_nanoton=1000, unit="item", capacity=4, free_capacity=3
    )
    fields.update(over)
    return Offer(**fields)


def announcement(
    who: Identity, *, now: int = NOW, ttl: int = 30_000, offers: tuple[Offer, ...] | None = None, running_jobs: int = 1
) -> Announcement:
    return Announcement.create(
        who,
        now_ms=now,
        ttl_ms=ttl,
        addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{who.peer_id_str}",),
        offers=offers if offers is not None else (offer(),),
        running_jobs=running_jobs,
    )
