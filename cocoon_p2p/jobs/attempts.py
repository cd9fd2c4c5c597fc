"""The client's retry policy for one job (pure: no trio; time passed in).

A job goes to one worker at a time, chosen by the :class:`~.routing.Router`;
when an attempt fails, :class:`JobAttempts` decides what happens next:

* another worker may be tried only after a *retryable* failure (:func:`retryable`):
  the worker's own refusals that another worker may not share (busy, backend,
  shutting-down, unknown-model, price) and the client's own worker-lost and
  payment-setup. Anything else (bad-input, too-large, deadline, cancelled,
  payment) would fail the same way elsewhere, and ends the job;
* a job that already streamed chunks to its caller is never retried: the caller
  has seen part of one answer;
* each worker is tried at most once, at most ``max_attempts`` in all, and no
  attempt starts at or after the deadline;
* ``busy`` is backpressure, not a fault: the job waits a short, growing, jittered
  back-off (:data:`BUSY_BACKOFF_S` doubling to :data:`MAX_BUSY_BACKOFF_S`) and may go to
  any worker again, that one included, without using up an attempt (at most
  :data:`MAX_BUSY` times; the deadline bounds it too). Cooling a busy worker down for
  seconds would turn a burst of jobs into ``no-workers`` for everyone;
* a worker that refuses the job because it is closing our payment channel
  (``channel-ended``) is tried once more, on a new channel, without a cool-down;
* every failure is reported to the router (the worker cools down); a worker
  lost mid-job is also to be forgotten until it announces itself again
  (:attr:`AfterFailure.forget_worker`: the caller tells its directory);
* an attempt that ran into the job's deadline (:meth:`JobAttempts.timed_out`)
  cools its worker down for longer; one cancelled by the caller
  (:meth:`JobAttempts.interrupted`) does not.

:class:`~.client.JobClient` drives one of these per job over real streams; the
simulator (``cocoon_p2p.simulations``) drives the same class in virtual time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from cocoon_p2p.core.errors import CocoonError, LocalProtocolError
from cocoon_p2p.overlay.directory import WorkerOffer

from . import frames as jf
from .routing import Router

# Codes after which another worker may succeed with the same request.
RETRYABLE = frozenset(
    {jf.BUSY, jf.BACKEND, jf.SHUTTING_DOWN, jf.UNKNOWN_MODEL, jf.PRICE, jf.WORKER_LOST, jf.PAYMENT_SETUP}
)
ATTEMPTS = "attempts"  # the attempts ran out without a failure code (none was made)
BUSY_BACKOFF_S = 0.005  # the first wait after a busy refusal (a small job frees its slot in milliseconds)
MAX_BUSY_BACKOFF_S = 0.2
MAX_BUSY = 100  # busy refusals one job waits out: ~20 s of back-off at most


def retryable(code: str) -> bool:
    """Whether a job whose attempt failed with ``code`` may go to another worker."""
    return code in RETRYABLE


class JobFailed(CocoonError):
    """A job ended without a result. ``code`` is the worker's error code or one the
    client notes itself (``worker-lost``, ``payment-setup``, ``no-workers``,
    ``deadline``); ``retryable`` says another worker may succeed."""

    def __init__(self, code: str, message: str, *, worker: bytes | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.worker = worker

    @property
    def retryable(self) -> bool:
        return retryable(self.code)


@dataclass(frozen=True)
class AfterFailure:
    """What a failed attempt leads to: whether the job may go on elsewhere
    (subject to :meth:`JobAttempts.stop`), and whether the worker is to be
    forgotten until it announces itself again."""

    retry: bool
    forget_worker: bool
    wait_s: float = 0.0  # before the next attempt (after ``busy``: the back-off)


class JobAttempts:
    """One job's attempts: which worker next, what a failure means, when to stop.

    Use: ``while (why := a.stop(now)) is None``: ``offer = a.choose(offers, now)``
    (None: no eligible worker, the job ends with ``no-workers``), then
    ``a.started(peer)`` and one of :meth:`succeeded`, :meth:`failed` or
    :meth:`interrupted` for that attempt.
    """

    def __init__(self, router: Router, *, max_price: int, max_attempts: int = 3, deadline: float = math.inf) -> None:
        if max_attempts < 1:
            raise LocalProtocolError(f"a job needs at least one attempt, not {max_attempts}")
        self.router = router
        self.max_price = max_price
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.tried: set[bytes] = set()
        self.count = 0  # attempts started
        self.busy = 0  # of them refused busy (they use up no attempt)
        self.last_code: str | None = None  # of the last failed attempt
        self._ended: str | None = None  # a failure that ends the job
        self._renewed: set[bytes] = set()  # workers retried after they ended our channel

    @property
    def exclude(self) -> frozenset[bytes]:
        """Workers this job must not go to again."""
        return frozenset(self.tried)

    def stop(self, now: float) -> str | None:
        """Why no further attempt may start (a failure code), or None: choose a worker."""
        if self._ended is not None:
            return self._ended
        if now >= self.deadline:
            return jf.DEADLINE
        if self.count - self.busy >= self.max_attempts:
            return self.last_code or ATTEMPTS
        return None

    def choose(self, offers: Iterable[WorkerOffer], now: float) -> WorkerOffer | None:
        """The router's choice for the next attempt among workers not tried yet; None when none is eligible."""
        return self.router.choose(offers, max_price=self.max_price, now=now, exclude=self.exclude)

    def started(self, peer: bytes) -> None:
        """An attempt on ``peer`` begins (whoever chose it)."""
        self.tried.add(peer)
        self.count += 1
        self.router.started(peer)

    def succeeded(self, peer: bytes, elapsed_s: float, *, compute_us: int = 0) -> None:
        """The attempt on ``peer`` brought a result after ``elapsed_s``; ``compute_us`` is
        the worker's own figure for the run (JobResult.compute_us, 0 when not given)."""
        self.router.finished(peer, elapsed_s, service_s=compute_us / 1e6 if compute_us else None)

    def failed(self, peer: bytes, code: str, now: float, *, streamed: bool = False) -> AfterFailure:
        """The attempt on ``peer`` failed with ``code``; ``streamed``: chunks of it already
        reached the caller."""
        self.last_code = code
        if code == jf.CHANNEL_ENDED and peer not in self._renewed and not streamed:
            # Not the worker's fault: our channel there is closing. Once the caller has
            # stopped using it, the same worker may take the job on a new channel.
            self._renewed.add(peer)
            self.tried.discard(peer)
            self.router.failed(peer, now, cooldown_s=0)
            return AfterFailure(retry=True, forget_worker=False)
        if code == jf.BUSY and not streamed and self.busy < MAX_BUSY:
            wait = min(MAX_BUSY_BACKOFF_S, BUSY_BACKOFF_S * 2.0 ** min(self.busy, 16))
            wait *= self.router.rng.uniform(0.5, 1.0)  # jittered: refused together, not back together
            self.busy += 1
            self.tried.discard(peer)
            self.router.failed(peer, now, cooldown_s=wait)
            return AfterFailure(retry=True, forget_worker=False, wait_s=wait)
        self.router.failed(peer, now)
        retry = retryable(code) and not streamed
        if not retry:
            self._ended = code
        return AfterFailure(retry=retry, forget_worker=code == jf.WORKER_LOST)

    def interrupted(self, peer: bytes, now: float) -> None:
        """The attempt on ``peer`` was cancelled from outside (the caller): not the
        worker's fault, so no cool-down."""
        self.router.failed(peer, now, cooldown_s=0)

    def timed_out(self, peer: bytes, now: float) -> None:
        """The job's deadline ran out while ``peer`` had it: whether the worker swallowed
        the job or is just too slow for it, the client's next jobs go elsewhere for a
        while (:meth:`Router.timed_out`)."""
        self.router.timed_out(peer, now)
