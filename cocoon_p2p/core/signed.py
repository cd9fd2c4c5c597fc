"""What every signed, expiring message of ours shares: domain-separated
signatures over the canonical field encoding, and the validity window check."""

from __future__ import annotations

from typing import Any

from . import identity, wire
from .errors import ExpiredMessage, MalformedMessage

# How far a sender's clock may run ahead of ours before we call its message bogus.
MAX_CLOCK_SKEW_MS = 60_000


def payload(domain: bytes, fields: list[Any]) -> bytes:
    """Bytes that a signature covers: a domain tag, then the canonical fields.

    The domain tag keeps a signature made for one message kind from being
    replayed as another.
    """
    return domain + b"\x00" + wire.pack(fields)


def sign(ident: identity.Identity, domain: bytes, fields: list[Any]) -> bytes:
    return ident.sign(payload(domain, fields))


def verify(peer_id: bytes, domain: bytes, fields: list[Any], signature: bytes) -> None:
    identity.verify(peer_id, payload(domain, fields), signature)


def check_window(issued_at_ms: int, expires_at_ms: int, now_ms: int, *, max_ttl_ms: int, what: str) -> None:
    """Raise unless ``issued_at <= now < expires_at`` (allowing clock skew) and the
    lifetime is at most ``max_ttl_ms``."""
    if expires_at_ms <= issued_at_ms:
        raise MalformedMessage(f"{what}: expires before it is issued")
    if expires_at_ms - issued_at_ms > max_ttl_ms:
        raise MalformedMessage(f"{what}: lifetime exceeds {max_ttl_ms} ms")
    if issued_at_ms > now_ms + MAX_CLOCK_SKEW_MS:
        raise ExpiredMessage(f"{what}: issued in the future")
    if now_ms >= expires_at_ms:
        raise ExpiredMessage(f"{what}: expired {now_ms - expires_at_ms} ms ago")
