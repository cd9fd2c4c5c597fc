"""Payments behind results: a client hands a job's result on at once and pays for it after.

Jobs finished for one worker gather in a batch for up to ``linger_s`` (``PaymentConfig.pay_linger_s``;
or ``batch_jobs`` jobs), then one payment pays for them all: a voucher costs a signature, two fsyncs and a
round trip, and sent after every job it competes for the CPU with the next one (measured:
+37% on a small job's latency at concurrency 1). The payer (``ClientPayments``) also
coalesces batches that meet into one voucher. A worker's exposure meanwhile is bounded by
the credit it grants: it refuses a job beyond it (``payment``), and
:meth:`BackgroundPayments.settled` sends what lingers at once and lets the client wait for
its vouchers to that worker before sending the job once more. A trio adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.logfields import fields

from .ports import ClientPayments

log = logging.getLogger(__name__)
BATCH_JOBS = 64  # a batch this large goes at once


@dataclass
class _Batch:
    """The costs of jobs for one worker not yet handed to the payer."""

    cost: int = 0
    jobs: int = 0
    hurry: trio.Event = field(default_factory=trio.Event)  # set: stop lingering, pay now


class BackgroundPayments:
    """Payments started and not finished, per worker, run in ``nursery``.
    ``late`` counts the vouchers whose acknowledgement did not come (they are logged, and
    go again when the worker is back or at settlement)."""

    def __init__(
        self,
        payments: ClientPayments,
        nursery: trio.Nursery,
        *,
        linger_s: float,
        batch_jobs: int = BATCH_JOBS,
    ) -> None:
        self.payments = payments
        self.nursery = nursery
        self.linger_s = linger_s
        self.batch_jobs = batch_jobs
        self.late = 0
        self._gathering: dict[bytes, _Batch] = {}  # per worker: the batch still taking jobs
        self._running: dict[bytes, int] = {}  # per worker: batches started and not paid
        self._done: dict[bytes, trio.Event] = {}  # per worker with payments on their way: set when none is

    def pay(self, worker: bytes, cost: int) -> None:
        """Pay ``worker`` ``cost``, behind the caller (with the other jobs that finish meanwhile)."""
        batch = self._gathering.get(worker)
        if batch is None:
            batch = self._gathering[worker] = _Batch()
            if worker not in self._done:
                self._done[worker] = trio.Event()
            self._running[worker] = self._running.get(worker, 0) + 1
            self.nursery.start_soon(self._pay, worker, batch)
        batch.cost += cost
        batch.jobs += 1
        if batch.jobs >= self.batch_jobs or self.linger_s <= 0:
            batch.hurry.set()

    def owing(self, worker: bytes) -> bool:
        """Whether payments to ``worker`` are on their way."""
        return worker in self._done

    async def settled(self, worker: bytes, *, timeout_s: float) -> bool:
        """Pay what lingers for ``worker`` now and wait up to ``timeout_s`` until no payment
        to it is on its way; whether none is."""
        self._hurry(worker)
        done = self._done.get(worker)
        if done is not None:
            with trio.move_on_after(timeout_s):
                await done.wait()
        return worker not in self._done

    async def flush(self) -> None:
        """Pay everything that lingers now and wait until no payment is on its way, to any worker."""
        while self._done:
            for worker in list(self._gathering):
                self._hurry(worker)
            await next(iter(self._done.values())).wait()

    def _hurry(self, worker: bytes) -> None:
        batch = self._gathering.get(worker)
        if batch is not None:
            batch.hurry.set()

    async def _pay(self, worker: bytes, batch: _Batch) -> None:
        try:
            with trio.move_on_after(self.linger_s):
                await batch.hurry.wait()
            del self._gathering[worker]  # jobs from now on gather in the next batch
            await self.payments.pay(worker, batch.cost)
        except CocoonError as exc:
            # The voucher is signed and logged; only its acknowledgement is missing (the
            # worker went away, or did not answer in time). It goes again on reconnect or
            # at settlement.
            self.late += 1
            log.warning("payment not acknowledged yet: %s", exc, extra=fields(peer=worker, nanoton=batch.cost))
        finally:
            if self._gathering.get(worker) is batch:  # cancelled while lingering
                del self._gathering[worker]
            self._running[worker] -= 1
            if not self._running[worker]:
                del self._running[worker]
                self._done.pop(worker).set()
