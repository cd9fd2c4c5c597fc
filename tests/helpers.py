"""Shared test builders (no I/O)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from cocoon_p2p.core.identity import Identity
from cocoon_p2p.overlay.announcement import Announcement, Offer
from cocoon_p2p.overlay.capability import CapabilityRecord
from cocoon_p2p.overlay.directory import WorkerOffer

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


JOB_PRICE = 7  # nanoton per item, the job tests' workers' price


def x_rows(n: int, seed: int = 0) -> np.ndarray:  # type: ignore[type-arg]
    """``n`` rows for the tiny model's input ``x``."""
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def worker_offer(n: int, *, price: int = 1, running: int | None = 0) -> WorkerOffer:
    """An offer from worker ``n`` (PeerId ``bytes([n]) * 38``), as the router sees one."""
    return WorkerOffer(
        peer_id=bytes([n]) * 38,
        model_id=bytes(32),
        addrs=(),
        backend="onnxruntime",
        gpu="cpu",
        price_nanoton=price,
        unit="item",
        capacity=4,
        free_capacity=4,
        running_jobs=running,
        issued_at_ms=0,
        expires_at_ms=1,
        sources=frozenset({"gossip"}),
    )
