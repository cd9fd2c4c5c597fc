"""Crash points: a worker or a client killed (SIGKILL) at each durable write of the payment path.

Real ``cocoon-node`` processes on the local TON chain: a MiniLM worker and a
client that runs one paid job per run (``cocoon-node client``). One of them is
told by ``COCOON_CRASH_AT`` (:mod:`cocoon_p2p.core.crashpoints`) to kill itself
at one point: before or after the write-ahead of a voucher, before or after its
acknowledgement, in the middle of opening or closing a channel. It is then
restarted from its data directory, the client runs a job and settles, the
worker stops (closing what it still holds) and any quarantine is run out. The
audit, per channel: every voucher the client signed is held by the worker and
no more (nothing lost, nothing paid twice), what the worker billed was paid
(except the one job whose voucher died unsigned with its client), every channel
is closed on chain, and the worker's wallet received exactly what it holds.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cocoon_p2p.core.crashpoints import CrashPoint
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain

from .crashnet import Net, audit, ok, run_out_quarantines

P = CrashPoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js"),
]


@dataclass(frozen=True)
class Case:
    """Where to crash, what to do to get there, and what a correct recovery leaves."""

    point: CrashPoint
    warmup_jobs: int  # jobs paid before the run that crashes
    trigger: str  # "job", "settle" (a client run with --settle), "stop" (the worker stops)
    unpaid_jobs: int = 0  # jobs billed whose voucher never existed
    paid_unseen: int = 0  # jobs paid whose result the crashed client never printed
    uncooperative: int = 0  # channels closed through quarantine; every other one cooperatively


CASES = [
    Case(P.PAYER_OPENING_WRITTEN, 0, "job"),
    Case(P.PAYER_DEPOSIT_LANDED, 0, "job"),
    Case(P.PAYER_DEPOSIT_SENT, 0, "job"),
    Case(P.PAYER_VOUCHER_SIGNED, 1, "job", unpaid_jobs=1),
    Case(P.PAYER_VOUCHER_LOGGED, 1, "job", paid_unseen=1),
    Case(P.PAYER_CLOSE_WRITTEN, 1, "settle", paid_unseen=1),  # the run prints after it settles
    Case(P.PAYER_CLOSE_SENT, 1, "settle", paid_unseen=1),
    Case(P.PAYEE_CHANNEL_STORED, 0, "job"),
    Case(P.PAYEE_VOUCHER_RECEIVED, 1, "job"),
    Case(P.PAYEE_VOUCHER_LOGGED, 1, "job"),
    Case(P.PAYEE_CLOSE_SIGNED, 1, "settle", paid_unseen=1),
    Case(P.PAYEE_CLOSE_PROPOSED, 1, "stop"),
    Case(P.PAYEE_UNCOOPERATIVE_WRITTEN, 1, "stop", uncooperative=1),
]
WORKER_SIDE = {p for p in CrashPoint if p.value.startswith("payee-")}
PER_JOB = {P.PAYEE_VOUCHER_RECEIVED, P.PAYEE_VOUCHER_LOGGED}  # reached by every job's voucher, warm-ups' too


@pytest.fixture(scope="module")
def chain() -> Iterator[LocalChain]:
    """Testnet-like: sendBoc only "accepted", blocks every 400 ms, rate limits, failing calls."""
    with open_local_chain(realistic=True) as c:
        yield c


@pytest.mark.parametrize("case", CASES, ids=[c.point.value for c in CASES])
def test_a_kill_at_each_durable_write_loses_nothing_and_pays_nothing_twice(
    case: Case, chain: LocalChain, tmp_path: Path
) -> None:
    net = Net(chain, tmp_path)
    on_worker = case.point in WORKER_SIDE
    # The worker dies at the crash run's voucher, after the warm-ups' (a client run ends soon
    # after it, so its payment is the only one that voucher carries).
    net.start_worker(f"{case.point}@{case.warmup_jobs * (case.point in PER_JOB) + 1}" if on_worker else None)
    try:
        for _ in range(case.warmup_jobs):
            ok(net.client())
        # ---- the crash
        crash = None if on_worker else case.point
        if case.trigger == "stop":
            net.stop_worker()
        else:
            out = net.client(settle=case.trigger == "settle", crash=crash)
            if on_worker and case.point in PER_JOB:  # the result came, its voucher is late
                ok(out)
            if not on_worker:
                assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
                assert f"crash point {case.point.value}" in out.stderr
        if on_worker:
            assert net.worker is not None
            assert net.worker.wait(timeout=90) == -signal.SIGKILL
            assert f"crash point {case.point.value}" in (tmp_path / "worker.err").read_text()
            net.start_worker()
        # ---- recovery: one more job and the client settles; the worker stops, closing the rest
        ok(net.client(settle=True))
        assert net.stop_worker() == 0
        run_out_quarantines(net)
    finally:
        net.kill_all()
    # Billed but unpaid: the job whose voucher died unsigned. A killed worker may also
    # have lost its last job's bill (written in groups, every 50 ms): in the client's favour.
    audit(net, paid_jobs=net.served + case.paid_unseen, unpaid_jobs=case.unpaid_jobs,
          lost_bills=int(case.point in WORKER_SIDE), uncooperative=case.uncooperative)  # fmt: skip
