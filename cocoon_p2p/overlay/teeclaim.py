"""The small TEE claim a worker carries in its announcements and capability records (pure).

Discovery stays cheap: a record says only *that* a worker claims a TEE, which
image (a digest of its measurements) and until when its evidence holds. The
claim proves nothing by itself; a client that requires a TEE asks the worker
for the evidence (``/cocoon/attest/1``, see :mod:`cocoon_p2p.attestation`) and
verifies it before the first job. The claim lets a client skip workers that
claim nothing without asking them.

Wire form: ``[tee, measurement, expires_at_ms, gpu_cc]``: ``tee`` a short name
("tdx"), ``measurement`` the 32-byte SHA-256 over MRTD || RTMR0..3 (48 bytes
each, as in the quote), ``gpu_cc`` whether the worker also reports NVIDIA GPU
confidential-computing evidence.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core import wire
from cocoon_p2p.core.errors import MalformedMessage

_FIELDS = 4
MEASUREMENT_REGISTERS = ("mr_td", "rt_mr0", "rt_mr1", "rt_mr2", "rt_mr3")
REGISTER_BYTES = 48


class TeeKind(enum.Enum):
    """The trusted execution environments a claim can name (the values travel on the wire)."""

    TDX = "tdx"


def measurement_digest(registers: dict[str, bytes]) -> bytes:
    """SHA-256 over MRTD || RTMR0 || RTMR1 || RTMR2 || RTMR3 (48 bytes each): one
    number that names an image, for claims and logs."""
    h = hashlib.sha256()
    for name in MEASUREMENT_REGISTERS:
        value = registers[name]
        if len(value) != REGISTER_BYTES:
            raise ValueError(f"{name}: a TDX measurement register has {REGISTER_BYTES} bytes, not {len(value)}")
        h.update(value)
    return h.digest()


@dataclass(frozen=True)
class TeeClaim:
    """A worker's claim to run in a TEE (unverified until its evidence is)."""

    tee: TeeKind
    measurement: bytes  # measurement_digest() of the image
    expires_at_ms: int  # when the evidence behind the claim runs out
    gpu_cc: bool = False

    def fields(self) -> list[Any]:
        return [self.tee.value, self.measurement, self.expires_at_ms, self.gpu_cc]

    @classmethod
    def parse(cls, obj: Any) -> TeeClaim:
        f = wire.expect_list(obj, _FIELDS, "tee claim")
        try:
            tee = TeeKind(wire.expect_str(f[0], "tee", min_len=1, max_len=16))
        except ValueError as exc:
            raise MalformedMessage(f"tee claim: unknown TEE {f[0]!r}") from exc
        if not isinstance(f[3], bool):
            raise MalformedMessage("tee claim: gpu_cc must be a boolean")
        return cls(
            tee=tee,
            measurement=wire.expect_bytes(f[1], "measurement", min_len=32, max_len=32),
            expires_at_ms=wire.expect_int(f[2], "expires_at_ms"),
            gpu_cc=f[3],
        )

    def valid(self, now_ms: int) -> bool:
        return now_ms < self.expires_at_ms
