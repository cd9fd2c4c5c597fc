"""When a worker makes fresh evidence: a small clock-driven machine, pure (time is an argument).

A quote has no expiry of its own; clients accept one only up to their policy's
maximum age. So the worker treats its evidence as good for ``lifetime_s`` after
it was made, makes a new one ``refresh_before_s`` before that, and after a
failure retries ``retry_s`` later, doubling the wait on each further failure
up to a quarter of the lifetime (a broken quoting service is not hammered, and
is retried several times before the evidence in hand runs out)::

    state      | due(now)                 | produced(now)  | failed(now)
    -----------+--------------------------+----------------+--------------------
    MISSING    | yes, unless backing off  | -> FRESH       | retry later
    FRESH      | no                       | -> FRESH       | retry later
    STALE      | yes, unless backing off  | -> FRESH       | retry later
    EXPIRED    | yes, unless backing off  | -> FRESH       | retry later

The states follow from the clock (:meth:`EvidenceSchedule.state`); the machine
only remembers when its evidence expires and when it may try again. The trio
service that makes quotes in a thread is written elsewhere; it asks
:meth:`~EvidenceSchedule.wait_s` how long to sleep.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RefreshPolicy:
    """How long evidence stands and how eagerly it is remade (seconds)."""

    lifetime_s: float = 3600.0  # a made quote is served this long (keep it under the clients' maximum age)
    refresh_before_s: float = 600.0  # start remaking it this long before it runs out
    retry_s: float = 30.0  # first wait after a failure; doubled per further failure

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lifetime_s) and self.lifetime_s > 0):
            raise ValueError("lifetime_s must be positive")
        if not 0 <= self.refresh_before_s < self.lifetime_s:
            raise ValueError("refresh_before_s must be at least 0 and below lifetime_s")
        if not (math.isfinite(self.retry_s) and self.retry_s > 0):
            raise ValueError("retry_s must be positive")

    @property
    def max_retry_s(self) -> float:
        """The longest wait between attempts: a quarter of the lifetime, never below ``retry_s``."""
        return max(self.retry_s, self.lifetime_s / 4)

    def retry_delay_s(self, failures: int) -> float:
        """The wait after ``failures`` consecutive failures (1 for the first)."""
        if failures < 1:
            raise ValueError("failures counts from 1")
        # 2**63 already exceeds any cap; capping the exponent keeps the float finite
        return min(self.retry_s * 2.0 ** min(failures - 1, 63), self.max_retry_s)


class EvidenceState(enum.Enum):
    """Where the worker's evidence stands at some time (the values are metric labels)."""

    MISSING = "missing"  # none made yet
    FRESH = "fresh"  # valid, not yet in the refresh window
    STALE = "stale"  # valid, but in the refresh window: a new one is wanted
    EXPIRED = "expired"  # made once, past its lifetime: not to be served


class EvidenceSchedule:
    """The refresh machine of one worker's evidence. ``now`` is any monotonic clock, the same on every call."""

    def __init__(self, policy: RefreshPolicy | None = None) -> None:
        self.policy = policy or RefreshPolicy()
        self._expires_at: float | None = None
        self._retry_at: float | None = None
        self._failures = 0

    @property
    def expires_at(self) -> float | None:
        """When the evidence in hand stops being served; None before the first success."""
        return self._expires_at

    @property
    def retry_at(self) -> float | None:
        """When the next attempt may start after a failure; None when not backing off."""
        return self._retry_at

    @property
    def failures(self) -> int:
        """Consecutive failures since the last success."""
        return self._failures

    def state(self, now: float) -> EvidenceState:
        """The evidence's state at ``now``."""
        if self._expires_at is None:
            return EvidenceState.MISSING
        if now >= self._expires_at:
            return EvidenceState.EXPIRED
        if now >= self._expires_at - self.policy.refresh_before_s:
            return EvidenceState.STALE
        return EvidenceState.FRESH

    def valid(self, now: float) -> bool:
        """Whether the evidence in hand may be served at ``now``."""
        return self.state(now) in (EvidenceState.FRESH, EvidenceState.STALE)

    def due(self, now: float) -> bool:
        """Whether to start making evidence at ``now``: none or stale or expired, and not backing off."""
        if self._retry_at is not None and now < self._retry_at:
            return False
        return self.state(now) is not EvidenceState.FRESH

    def wait_s(self, now: float) -> float:
        """Seconds from ``now`` until :meth:`due` turns true (0 when it is already)."""
        if self.due(now):
            return 0.0
        starts = [] if self._retry_at is None else [self._retry_at]
        if self._expires_at is not None:
            starts.append(self._expires_at - self.policy.refresh_before_s)
        return max(0.0, max(starts) - now)

    def produced(self, now: float) -> None:
        """Record evidence made at ``now``: it stands until ``now + lifetime_s``; failures are forgotten."""
        self._expires_at = now + self.policy.lifetime_s
        self._retry_at = None
        self._failures = 0

    def failed(self, now: float) -> None:
        """Record a failed attempt at ``now``: the next one waits, longer after each failure in a row."""
        self._failures += 1
        self._retry_at = now + self.policy.retry_delay_s(self._failures)
