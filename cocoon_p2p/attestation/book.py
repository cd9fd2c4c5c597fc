"""A client's verdicts per peer: who is attested, until when, and who is refused (pure).

A verdict stands until the earliest of: the policy's ``verdict_ttl_s``, the end of
the evidence's stated life, and the collateral's ``nextUpdate`` (after which the
platform's TCB status may have changed). A refusal keeps the peer out of TEE jobs
for ``refused_for_s``; then it may be asked again (a worker may have been updated).
Bounded: beyond ``max_peers`` the entries that ran out go first, then the oldest.
"""

from __future__ import annotations

import enum
from collections import Counter, OrderedDict
from dataclasses import dataclass

from .errors import RefusalReason
from .verifier import Verdict

REFUSED_FOR_S = 600.0
MAX_PEERS = 4096


class TeeStanding(enum.Enum):
    """What a client knows of a peer's attestation now."""

    UNKNOWN = "unknown"  # never asked, or the verdict ran out: ask
    ATTESTED = "attested"
    REFUSED = "refused"  # refused recently: not asked again until the time is up


@dataclass(frozen=True)
class _Entry:
    verdict: Verdict
    until_s: float


class VerdictBook:
    """Verdicts by PeerId. Time is passed in (seconds); nothing here reads a clock."""

    def __init__(self, *, verdict_ttl_s: float, refused_for_s: float = REFUSED_FOR_S, max_peers: int = MAX_PEERS):
        self.verdict_ttl_s = verdict_ttl_s
        self.refused_for_s = refused_for_s
        self.max_peers = max_peers
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.accepted_total = 0
        self.refused_total: Counter[RefusalReason] = Counter()

    def standing(self, peer: bytes, now_s: float) -> TeeStanding:
        entry = self._entries.get(peer)
        if entry is None or now_s >= entry.until_s:
            return TeeStanding.UNKNOWN
        return TeeStanding.ATTESTED if entry.verdict.accepted else TeeStanding.REFUSED

    def verdict(self, peer: bytes, now_s: float) -> Verdict | None:
        """The standing verdict on ``peer`` (accepted or refused), None when there is none."""
        entry = self._entries.get(peer)
        return entry.verdict if entry is not None and now_s < entry.until_s else None

    def record(self, peer: bytes, verdict: Verdict, now_s: float, *, evidence_expires_s: float | None = None) -> None:
        """Keep ``verdict`` on ``peer`` for as long as it stands."""
        if verdict.accepted:
            self.accepted_total += 1
            until = now_s + self.verdict_ttl_s
            if evidence_expires_s is not None:
                until = min(until, evidence_expires_s)
            if verdict.collateral_next_update is not None:  # as long again as it had left when judged
                until = min(until, now_s + verdict.collateral_next_update - verdict.verified_at)
        else:
            assert verdict.reason is not None
            self.refused_total[verdict.reason] += 1
            until = now_s + self.refused_for_s
        self._entries[peer] = _Entry(verdict, until)
        self._entries.move_to_end(peer)
        if len(self._entries) > self.max_peers:
            self._entries = OrderedDict((p, e) for p, e in self._entries.items() if e.until_s > now_s)
            while len(self._entries) > self.max_peers:
                self._entries.popitem(last=False)

    def attested_count(self, now_s: float) -> int:
        return sum(1 for e in self._entries.values() if e.verdict.accepted and now_s < e.until_s)
