"""Payments behind results: a client hands a job's result on at once and pays for it after.

Each payment runs as a task of its own; the payer (``ClientPayments``) coalesces those that
meet into one voucher. A worker's exposure meanwhile is bounded by the credit it grants: it
refuses a job beyond it (``payment``), and :meth:`BackgroundPayments.settled` lets the client
wait for its vouchers to that worker before sending the job once more. A trio adapter.
"""

from __future__ import annotations

import logging

import trio
from libp2p.peer.id import ID

from cocoon_p2p.core.errors import CocoonError

from .ports import ClientPayments

log = logging.getLogger(__name__)


class BackgroundPayments:
    """Payments started and not finished, per worker, run in ``nursery``.
    ``late`` counts the vouchers whose acknowledgement did not come (they are logged, and
    go again when the worker is back or at settlement)."""

    def __init__(self, payments: ClientPayments, nursery: trio.Nursery) -> None:
        self.payments = payments
        self.nursery = nursery
        self.late = 0
        self._running: dict[bytes, int] = {}  # per worker: payments started and not finished
        self._done: dict[bytes, trio.Event] = {}  # per worker with payments on their way: set when none is

    def pay(self, worker: bytes, cost: int) -> None:
        """Pay ``worker`` ``cost``, behind the caller."""
        if worker not in self._done:
            self._done[worker] = trio.Event()
        self._running[worker] = self._running.get(worker, 0) + 1
        self.nursery.start_soon(self._pay, worker, cost)

    def owing(self, worker: bytes) -> bool:
        """Whether payments to ``worker`` are on their way."""
        return worker in self._done

    async def settled(self, worker: bytes, *, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until no payment to ``worker`` is on its way; whether none is."""
        done = self._done.get(worker)
        if done is not None:
            with trio.move_on_after(timeout_s):
                await done.wait()
        return worker not in self._done

    async def flush(self) -> None:
        """Wait until no payment is on its way, to any worker."""
        while self._done:
            await next(iter(self._done.values())).wait()

    async def _pay(self, worker: bytes, cost: int) -> None:
        try:
            await self.payments.pay(worker, cost)
        except CocoonError as exc:
            # The voucher is signed and logged; only its acknowledgement is missing (the
            # worker went away, or did not answer in time). It goes again on reconnect or
            # at settlement.
            self.late += 1
            log.warning("payment to %s not acknowledged yet: %s", ID(worker), exc)
        finally:
            self._running[worker] -= 1
            if not self._running[worker]:
                del self._running[worker]
                self._done.pop(worker).set()
