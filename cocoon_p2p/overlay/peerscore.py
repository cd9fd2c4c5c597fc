"""Peer scoring: misbehaviour costs points; below a threshold a peer is disconnected
and banned for a while. Scores decay back towards zero, so honest peers that
occasionally relay a stale message are never banned. Pure: time is passed in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cocoon_p2p.core.errors import ProtocolError

# Penalty per error code: forgeries cost most, staleness (which honest relays
# can cause through reordering) least.
PENALTIES: dict[str, float] = {
    "bad-signature": 50.0,
    "foreign-key": 40.0,
    "malformed": 25.0,
    "too-large": 25.0,
    "bad-peer-id": 25.0,
    "version": 5.0,
    # Small: the forwarder of a bursty origin gets this too; only a flood
    # (dozens a minute) should add up to a ban.
    "rate-limited": 2.0,
    "expired": 5.0,
    "replayed": 2.0,
}
DEFAULT_PENALTY = 10.0


@dataclass(frozen=True)
class DisconnectPeer:
    """Command: close every connection to ``peer_id`` and refuse it until ``until_ms``."""

    peer_id: bytes
    reason: str
    until_ms: int


@dataclass
class _Score:
    value: float
    at_ms: int


@dataclass
class PeerScores:
    """Per-peer misbehaviour scores (0 is neutral, negative is bad)."""

    threshold: float = -100.0
    half_life_ms: int = 60_000
    ban_ms: int = 5 * 60_000
    max_tracked: int = 100_000
    _scores: dict[bytes, _Score] = field(default_factory=dict)
    _banned: dict[bytes, int] = field(default_factory=dict)

    def score(self, peer_id: bytes, now_ms: int) -> float:
        s = self._scores.get(peer_id)
        if s is None:
            return 0.0
        return s.value * math.pow(0.5, max(0, now_ms - s.at_ms) / self.half_life_ms)

    def penalize(self, peer_id: bytes, error: ProtocolError, now_ms: int) -> DisconnectPeer | None:
        """Record that ``peer_id`` sent something that raised ``error``.

        Returns a DisconnectPeer command when the peer crosses the threshold.
        """
        value = self.score(peer_id, now_ms) - PENALTIES.get(error.code, DEFAULT_PENALTY)
        if len(self._scores) >= self.max_tracked and peer_id not in self._scores:
            self._scores = {p: s for p, s in self._scores.items() if self.score(p, now_ms) < -1.0}
        self._scores[peer_id] = _Score(value, now_ms)
        if value <= self.threshold:
            until = now_ms + self.ban_ms
            self._banned[peer_id] = until
            del self._scores[peer_id]
            return DisconnectPeer(peer_id, f"score {value:.0f} after {error.code}", until)
        return None

    def is_banned(self, peer_id: bytes, now_ms: int) -> bool:
        until = self._banned.get(peer_id)
        if until is None:
            return False
        if now_ms >= until:
            del self._banned[peer_id]
            return False
        return True

    def banned(self, now_ms: int) -> list[bytes]:
        """Peers banned at ``now_ms`` (expired bans are dropped)."""
        return [p for p in list(self._banned) if self.is_banned(p, now_ms)]
