"""Named points on the payment path where a test harness may kill this process.

Money must survive a kill -9 at any moment; the moments that matter are the
durable writes (before and after a write-ahead, before and after an
acknowledgement, in the middle of a close). Each is marked with
:func:`crash_point`. Setting ``COCOON_CRASH_AT=<point>`` (or ``<point>@N``, the
N-th time it is reached) in a node's environment makes it SIGKILL itself there,
after saying so on stderr; ``tests/test_crashpoints.py`` restarts it and checks
that nothing was lost or paid twice and that the chain agrees. Unset, a crash
point costs one dictionary lookup.
"""

from __future__ import annotations

import enum
import os
import signal

ENV = "COCOON_CRASH_AT"


class CrashPoint(enum.StrEnum):
    """Where a node may be killed (client = payer, worker = payee)."""

    PAYER_OPENING_WRITTEN = "payer-opening-written"  # the channel is written down, no deposit sent
    PAYER_DEPOSIT_LANDED = "payer-deposit-landed"  # the contract deployed with the deposit, not initialised
    PAYER_DEPOSIT_SENT = "payer-deposit-sent"  # the contract funded and initialised, the worker not yet told
    PAYER_VOUCHER_SIGNED = "payer-voucher-signed"  # a job's voucher signed, not yet in issued.log
    PAYER_VOUCHER_LOGGED = "payer-voucher-logged"  # in issued.log, not yet sent
    PAYER_CLOSE_WRITTEN = "payer-close-written"  # both signed the close, not yet sent on chain
    PAYER_CLOSE_SENT = "payer-close-sent"  # the cooperative close went on chain
    PAYEE_CHANNEL_STORED = "payee-channel-stored"  # the channel is in the store, not in clients.json
    PAYEE_VOUCHER_RECEIVED = "payee-voucher-received"  # a voucher read, not yet durable
    PAYEE_VOUCHER_LOGGED = "payee-voucher-logged"  # durable, not yet acknowledged
    PAYEE_CLOSE_SIGNED = "payee-close-signed"  # the client's close countersigned and written, no reply yet
    PAYEE_CLOSE_PROPOSED = "payee-close-proposed"  # the worker's own close written down, the client not asked
    PAYEE_UNCOOPERATIVE_WRITTEN = "payee-uncooperative-written"  # an uncooperative close written, not sent


_armed: dict[CrashPoint, int] | None = None  # point -> hits left before the kill


def _parse(spec: str) -> dict[CrashPoint, int]:
    armed: dict[CrashPoint, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition("@")
        try:
            armed[CrashPoint(name)] = int(nth or 1)
        except ValueError:
            known = ", ".join(p.value for p in CrashPoint)
            raise ValueError(f"{ENV}={spec!r}: {item!r} is not <point>[@N] with a point among {known}") from None
    return armed


def crash_point(point: CrashPoint) -> None:
    """Kill this process here (SIGKILL: no cleanup, no flush) if the environment asks for it."""
    global _armed
    if _armed is None:
        _armed = _parse(os.environ.get(ENV, ""))
    left = _armed.get(point)
    if left is None:
        return
    if left > 1:
        _armed[point] = left - 1
        return
    os.write(2, f"crash point {point.value}: killing this process\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
