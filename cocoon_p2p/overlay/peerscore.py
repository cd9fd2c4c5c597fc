"""Peer scoring: misbehaviour costs points; below a threshold a peer is disconnected
and banned for a while. Scores decay back towards zero, so honest peers that
occasionally relay a stale message are never banned. Pure: time is passed in.

**Stale gossip costs nobody.** An origin's older signed message (expired, or not
newer than one already held) is what gossipsub delivers routinely: it replays its
message cache, newest heartbeat first, to every peer that subscribes (the origin
its own messages too), answers IWANT from it without validating again, and several
mesh paths deliver one message at different times. :func:`gossip_blame` drops such
messages without a score, whoever forwarded them.

**Origin or relay.** A gossip message has an origin (its signer) and a forwarder
(the peer that handed it to us). What else goes wrong with it (over its origin's
rate) may be bunched delivery, not malice: so each peer may forward some such
messages for free (``relay_allowance`` at once, ``relay_refill_per_s`` after that);
beyond that, a flood, they cost what they cost an origin. Forgeries (bad
signatures, another peer's identity, malformed or oversized messages) cost a relay
as much as an origin: honest relays validate before they forward.

**Protected peers.** A node cannot do without its configured bootstrap peers:
their bans last at most ``protected_ban_ms``, so a node never shuts itself out of
the network for long, whatever it was sent.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from cocoon_p2p.core.errors import ProtocolError

# Penalty per error code: forgeries cost most, staleness (which honest relays
# can cause through reordering) least.
PENALTIES: dict[str, float] = {
    "bad-signature": 50.0,
    "forged-evidence": 100.0,
    # A result a spot check found wrong (a third worker broke the tie), or a fraud proof
    # its reporter forged: banned at once. A refuted accusation costs less: an honest
    # client can be fooled by a lying reference worker.
    "wrong-result": 100.0,
    "proof-mismatch": 100.0,
    "false-accusation": 25.0,  # a TEE quote that fails its signatures or names another peer: banned at once
    "foreign-key": 40.0,
    "malformed": 25.0,
    "too-large": 25.0,
    "bad-peer-id": 25.0,
    "version": 5.0,
    # Small: an origin's bursts reach us bunched; only a flood (dozens a minute)
    # should add up to a ban.
    "rate-limited": 2.0,
    "expired": 5.0,
    "replayed": 2.0,
}
DEFAULT_PENALTY = 10.0
# What an honest relay cannot help forwarding (see the module docstring).
RELAY_EXCUSED = frozenset({"expired", "replayed", "rate-limited"})
# Gossip that is merely old: dropped (not forwarded), held against nobody.
STALE_GOSSIP = frozenset({"expired", "replayed"})
# Gossip over its origin's rate: messages a cache replay or a slow link bunched, from the
# origin as from a relay; free within the forwarder's allowance, like a relay's stale gossip.
BUNCHED_GOSSIP = frozenset({"rate-limited"})


class Blame(enum.Enum):
    """Whose message a penalty is for."""

    ORIGIN = "origin"  # the peer's own message (or its own protocol stream)
    RELAY = "relay"  # a message signed by someone else, that the peer forwarded


def gossip_blame(code: str, *, sender: bytes, origin: bytes) -> Blame | None:
    """Whom a gossip message that failed validation with error ``code`` is held against,
    ``sender`` having handed us a message signed by ``origin``: nobody (None) when it is
    merely stale; :attr:`Blame.RELAY` (free within the allowance) when it is over its
    origin's rate; otherwise the origin when it sent it itself, else the relay."""
    if code in STALE_GOSSIP:
        return None
    if code in BUNCHED_GOSSIP or sender != origin:
        return Blame.RELAY
    return Blame.ORIGIN


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
class _Allowance:
    tokens: float
    at_ms: int


@dataclass
class PeerScores:
    """Per-peer misbehaviour scores (0 is neutral, negative is bad)."""

    threshold: float = -100.0
    half_life_ms: int = 60_000
    ban_ms: int = 5 * 60_000
    protected_ban_ms: int = 30_000
    relay_allowance: int = 100
    relay_refill_per_s: float = 5.0
    max_tracked: int = 100_000
    stale_relays_excused: int = 0
    _scores: dict[bytes, _Score] = field(default_factory=dict)
    _banned: dict[bytes, int] = field(default_factory=dict)
    _protected: set[bytes] = field(default_factory=set)
    _allowances: dict[bytes, _Allowance] = field(default_factory=dict)

    def protect(self, peer_id: bytes) -> None:
        """``peer_id`` is one we cannot do without (a bootstrap peer): it is still
        scored, but banned for at most ``protected_ban_ms``."""
        self._protected.add(peer_id)

    def score(self, peer_id: bytes, now_ms: int) -> float:
        s = self._scores.get(peer_id)
        if s is None:
            return 0.0
        return s.value * math.pow(0.5, max(0, now_ms - s.at_ms) / self.half_life_ms)

    def penalize(
        self, peer_id: bytes, error: ProtocolError, now_ms: int, *, blame: Blame = Blame.ORIGIN
    ) -> DisconnectPeer | None:
        """Record that ``peer_id`` sent (``blame=ORIGIN``) or forwarded (``RELAY``)
        something that raised ``error``.

        Returns a DisconnectPeer command when the peer crosses the threshold.
        """
        if blame is Blame.RELAY and error.code in RELAY_EXCUSED and self._excuse(peer_id, now_ms):
            self.stale_relays_excused += 1
            return None
        value = self.score(peer_id, now_ms) - PENALTIES.get(error.code, DEFAULT_PENALTY)
        if len(self._scores) >= self.max_tracked and peer_id not in self._scores:
            self._scores = {p: s for p, s in self._scores.items() if self.score(p, now_ms) < -1.0}
        self._scores[peer_id] = _Score(value, now_ms)
        if value <= self.threshold:
            ban_ms = min(self.ban_ms, self.protected_ban_ms) if peer_id in self._protected else self.ban_ms
            until = now_ms + ban_ms
            self._banned[peer_id] = until
            del self._scores[peer_id]
            return DisconnectPeer(peer_id, f"score {value:.0f} after {error.code} ({blame.value})", until)
        return None

    def _excuse(self, peer_id: bytes, now_ms: int) -> bool:
        """Spend one of the peer's free stale relays, if it has one left (a token bucket)."""
        held = self._allowances.get(peer_id)
        if held is None:
            if len(self._allowances) >= self.max_tracked:  # a full allowance is as good as none
                full = float(self.relay_allowance)
                self._allowances = {p: a for p, a in self._allowances.items() if self._tokens(a, now_ms) < full}
            held = self._allowances[peer_id] = _Allowance(float(self.relay_allowance), now_ms)
        tokens = self._tokens(held, now_ms)
        if tokens < 1.0:
            return False
        held.tokens, held.at_ms = tokens - 1.0, now_ms
        return True

    def _tokens(self, held: _Allowance, now_ms: int) -> float:
        refill = max(0, now_ms - held.at_ms) * self.relay_refill_per_s / 1000
        return min(float(self.relay_allowance), held.tokens + refill)

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
