"""``/cocoon/attest/1``: a client asks a worker for its evidence, once per peer (pure codecs).

One request/response per stream, canonical msgpack, sizes bounded before parsing::

    request  = [1]
    evidence = [1, tee, source, quote, collateral | nil, produced_at_ms, expires_at_ms, gpu | nil]

``quote`` is the raw TDX quote (at most 16 KiB); ``collateral`` the worker's copy of
Intel's collateral for its platform as dcap-qvl JSON (optional: Intel signs it, so a
client may use it, or its own); ``gpu`` a JSON object with NVIDIA GPU
confidential-computing evidence, reported as a separate claim. Nothing here is
trusted until :mod:`.verifier` has judged the quote and its binding to the peer
on this very connection.
"""

from __future__ import annotations

from dataclasses import dataclass

from cocoon_p2p.core import wire
from cocoon_p2p.core.errors import MalformedMessage

from .collateral import MAX_COLLATERAL_BYTES
from .verifier import MAX_QUOTE_BYTES

PROTOCOL = "/cocoon/attest/1"
VERSION = 1
MAX_REQUEST_BYTES = 16
MAX_GPU_CLAIM_BYTES = 4096
MAX_EVIDENCE_BYTES = MAX_QUOTE_BYTES + MAX_COLLATERAL_BYTES + MAX_GPU_CLAIM_BYTES + 512
_FIELDS = 8


def encode_request() -> bytes:
    return wire.pack([VERSION])


def decode_request(data: bytes) -> None:
    """Check a request; MalformedMessage for anything but ``[1]``."""
    obj = wire.expect_list(wire.unpack(data, max_size=MAX_REQUEST_BYTES, what="attest request"), 1, "attest request")
    if obj[0] != VERSION:
        raise MalformedMessage(f"attest request: unknown version {obj[0]!r}", code="version")


@dataclass(frozen=True)
class Evidence:
    """A worker's evidence as it travels (unverified)."""

    tee: str
    source: str  # where the quote came from: "configfs-tsm", "dstack", "file"
    quote: bytes
    collateral: str | None
    produced_at_ms: int
    expires_at_ms: int
    gpu: str | None = None

    def encode(self) -> bytes:
        data = wire.pack(
            [
                VERSION,
                self.tee,
                self.source,
                self.quote,
                self.collateral,
                self.produced_at_ms,
                self.expires_at_ms,
                self.gpu,
            ]
        )
        if len(data) > MAX_EVIDENCE_BYTES:
            raise MalformedMessage(f"evidence of {len(data)} bytes exceeds {MAX_EVIDENCE_BYTES}")
        decode_evidence(data)  # our own output passes the receiver's rules, or fails here
        return data


def decode_evidence(data: bytes) -> Evidence:
    """Parse evidence: size, shape and field bounds. MalformedMessage otherwise."""
    obj = wire.expect_list(wire.unpack(data, max_size=MAX_EVIDENCE_BYTES, what="evidence"), _FIELDS, "evidence")
    if obj[0] != VERSION:
        raise MalformedMessage(f"evidence: unknown version {obj[0]!r}", code="version")
    ev = Evidence(
        tee=wire.expect_str(obj[1], "tee", min_len=1, max_len=16),
        source=wire.expect_str(obj[2], "source", min_len=1, max_len=64),
        quote=wire.expect_bytes(obj[3], "quote", min_len=48, max_len=MAX_QUOTE_BYTES),
        collateral=None if obj[4] is None else wire.expect_str(obj[4], "collateral", max_len=MAX_COLLATERAL_BYTES),
        produced_at_ms=wire.expect_int(obj[5], "produced_at_ms"),
        expires_at_ms=wire.expect_int(obj[6], "expires_at_ms"),
        gpu=None if obj[7] is None else wire.expect_str(obj[7], "gpu", max_len=MAX_GPU_CLAIM_BYTES),
    )
    if ev.expires_at_ms <= ev.produced_at_ms:
        raise MalformedMessage("evidence: expires before it was produced")
    return ev
