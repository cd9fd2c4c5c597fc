"""Collateral: what a quote is verified against (Intel's TCB info, QE identity, CRLs), and its cache.

Collateral is signed by Intel, so where it came from does not matter (a PCCS, Intel's
PCS, an offline bundle, or the worker that sends it along with its quote): dcap-qvl
checks its signatures and validity at the verification time. It is per platform
family (FMSPC) and changes about monthly: a client keeps it until the earliest
``nextUpdate`` of its parts. Pure (fetching from a PCCS is :mod:`.pccs`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from .errors import AttestationError, RefusalReason

MAX_COLLATERAL_BYTES = 64 * 1024
MAX_CACHED = 256


def qvl() -> Any:
    """The dcap_qvl module, imported on first use: its package imports importlib.metadata,
    which loads socket, and pure modules load no I/O library at import."""
    import dcap_qvl

    return dcap_qvl


def _unix(stamp: Any, what: str) -> int:
    if not isinstance(stamp, str):
        raise AttestationError(RefusalReason.NO_COLLATERAL, f"collateral: {what} has no date")
    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except ValueError as exc:
        raise AttestationError(RefusalReason.NO_COLLATERAL, f"collateral: {what}: bad date {stamp!r}") from exc


@dataclass(frozen=True)
class Collateral:
    """One platform family's collateral, as dcap-qvl's JSON (``QuoteCollateralV3``)."""

    text: str
    fmspc: str  # upper-case hex, as in the TCB info
    issued_at: int  # unix seconds: the latest issueDate of its parts
    next_update: int  # unix seconds: the earliest nextUpdate of its parts

    @classmethod
    def from_json(cls, text: str) -> Collateral:
        """Parse and check the shape; AttestationError(NO_COLLATERAL) when it is not collateral."""
        if len(text) > MAX_COLLATERAL_BYTES:
            raise AttestationError(RefusalReason.NO_COLLATERAL, f"collateral over {MAX_COLLATERAL_BYTES} bytes")
        try:
            parsed = qvl().QuoteCollateralV3.from_json(text)
            parts = json.loads(text)
            tcb = json.loads(parts["tcb_info"])
            qe = json.loads(parts["qe_identity"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AttestationError(RefusalReason.NO_COLLATERAL, f"not collateral: {exc}") from exc
        fmspc = tcb.get("fmspc")
        if not isinstance(fmspc, str):
            raise AttestationError(RefusalReason.NO_COLLATERAL, "collateral: the TCB info names no FMSPC")
        collateral = cls(
            text=text,
            fmspc=fmspc.upper(),
            issued_at=max(_unix(tcb.get("issueDate"), "tcb_info"), _unix(qe.get("issueDate"), "qe_identity")),
            next_update=min(_unix(tcb.get("nextUpdate"), "tcb_info"), _unix(qe.get("nextUpdate"), "qe_identity")),
        )
        collateral.__dict__["for_qvl"] = parsed  # the cached_property's slot: parsed once, not twice
        return collateral

    @cached_property
    def for_qvl(self) -> Any:
        """dcap-qvl's parsed form, made once (parsing costs about a quarter of a verification)."""
        return qvl().QuoteCollateralV3.from_json(self.text)

    def fresh(self, now_s: int) -> bool:
        return self.issued_at <= now_s < self.next_update


class CollateralCache:
    """Collateral by FMSPC, kept until its ``nextUpdate``; bounded (oldest out first)."""

    def __init__(self, max_entries: int = MAX_CACHED) -> None:
        self._entries: OrderedDict[str, Collateral] = OrderedDict()
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, fmspc: str, now_s: int) -> Collateral | None:
        """Fresh collateral for this platform family, or None (a miss: fetch it)."""
        entry = self._entries.get(fmspc.upper())
        if entry is not None and entry.fresh(now_s):
            self.hits += 1
            return entry
        self.misses += 1
        return None

    def put(self, collateral: Collateral) -> None:
        """Keep ``collateral`` unless a newer one for its FMSPC is already here."""
        have = self._entries.get(collateral.fmspc)
        if have is not None and have.issued_at > collateral.issued_at:
            return
        self._entries[collateral.fmspc] = collateral
        self._entries.move_to_end(collateral.fmspc)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
