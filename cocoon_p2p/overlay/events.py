"""What a node tells the program that embeds it: workers seen, peers banned.

The events are plain values; :class:`EventQueue` is the bounded trio queue they
travel in. A consumer that lags loses new events (counted in ``dropped``)
rather than slowing the gossip validator that emits them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import trio

from .announcement import Announcement


@dataclass(frozen=True)
class WorkerSeen:
    """Event: an announcement from ``peer_id`` was accepted."""

    peer_id: bytes
    announcement: Announcement


@dataclass(frozen=True)
class PeerBanned:
    """Event: ``peer_id`` crossed the misbehaviour threshold and was disconnected."""

    peer_id: bytes
    reason: str


@dataclass(frozen=True)
class PeerAttested:
    """Event: ``peer_id``'s TEE evidence passed this client's policy."""

    peer_id: bytes
    tee: str
    measurement: str  # hex digest of the image's registers
    image: str  # the policy's name for it ("" when the policy names none)


@dataclass(frozen=True)
class AttestationRefused:
    """Event: ``peer_id``'s TEE evidence was refused (``reason``: a RefusalReason value)."""

    peer_id: bytes
    reason: str
    message: str


@dataclass(frozen=True)
class FraudJudged:
    """Event: a fraud proof from ``reporter`` against ``accused`` was judged (``outcome``:
    confirmed, trusted, refuted, unverified, malformed, rate-limited, duplicate)."""

    reporter: bytes
    accused: bytes
    outcome: str
    job_id: int
    detail: str


NodeEvent = WorkerSeen | PeerBanned | PeerAttested | AttestationRefused | FraudJudged


class EventQueue:
    """A bounded queue of :data:`NodeEvent`; ``emit`` never blocks."""

    def __init__(self, size: int) -> None:
        self.dropped = 0
        self._send, self._recv = trio.open_memory_channel[NodeEvent](size)

    def emit(self, event: NodeEvent) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1

    async def __aiter__(self) -> AsyncIterator[NodeEvent]:
        async for event in self._recv:
            yield event
