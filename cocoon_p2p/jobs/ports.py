"""What the job services need from the layers beside them, declared here and passed in.

The job client and worker are composed by constructor: the node hands them an
object for each port below. Payments and the overlay implement these
structurally (they never import this module's callers, and the job layer never
imports them), so either side can be replaced, or left out, without the other
knowing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from cocoon_p2p.core.errors import ProtocolError
from cocoon_p2p.overlay.directory import WorkerOffer

# Workers that serve a model, as the client's router sees them (gossip + DHT).
OfferSource = Callable[[bytes], Awaitable[list[WorkerOffer]]]


class ClientPayments(Protocol):
    """How a client pays for jobs (implemented by :class:`~cocoon_p2p.payments.service.PaymentService`)."""

    @property
    def pay_linger_s(self) -> float:
        """How long finished jobs gather before one payment pays for them all."""
        ...

    async def ensure_channel(self, worker: bytes) -> object:
        """Make sure a channel to ``worker`` is open before a job is sent; raise to skip the worker."""
        ...

    async def pay(self, worker: bytes, cost: int) -> object:
        """Pay ``cost`` nanoton for a finished job; raise when the payment failed."""
        ...

    async def channel_ended(self, worker: bytes) -> None:
        """``worker`` refused a job because it is closing our channel: stop using it (the
        next :meth:`ensure_channel` opens a new one); raise if that could not be done."""
        ...

    async def settle(self, worker: bytes, *, uncooperative_if_gone: bool = False) -> object:
        """Close our channel to ``worker`` on chain (alone, when it cannot be reached and
        ``uncooperative_if_gone``); raise if that could not be started."""
        ...


class WorkerPayments(Protocol):
    """How a worker gets paid (implemented by :class:`~cocoon_p2p.payments.service.PaymentService`)."""

    def admission(self, client: bytes) -> str | None:
        """Why a job from ``client`` must be refused now (no channel, owes too much), or None."""
        ...

    def bill(self, client: bytes, cost: int) -> None:
        """Record ``cost`` nanoton owed by ``client`` for a job whose result was sent."""
        ...


class PeerFeedback(Protocol):
    """What the job services tell the overlay about peers.

    Implemented by :class:`~cocoon_p2p.overlay.guard.PeerGuard`."""

    def misbehaved(self, peer: bytes, error: ProtocolError) -> None:
        """``peer`` broke the job protocol: score it down (and maybe disconnect it)."""
        ...

    def worker_lost(self, peer: bytes) -> None:
        """``peer`` went away mid-job or could not be reached: stop routing to it until it announces again."""
        ...


class LoadReport(Protocol):
    """Where a worker reports its load (implemented by :class:`~cocoon_p2p.overlay.advertiser.Advertiser`)."""

    def set_load(self, *, running_jobs: int, free_capacity: dict[bytes, int]) -> None: ...


class TeeGate(Protocol):
    """Which workers are attested to run in a TEE under the client's policy
    (implemented by :class:`~cocoon_p2p.attestation.gate.AttestationGate`)."""

    async def attested(self, offers: list[WorkerOffer]) -> list[WorkerOffer]:
        """The subset of ``offers`` whose worker is attested now (it may ask workers first)."""
        ...
