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

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cocoon_p2p.core.crashpoints import ENV, CrashPoint
from cocoon_p2p.payments.chain import Wallet, raw_address, read_channel
from cocoon_p2p.payments.channelstate import ChannelState, CloseOutcome
from cocoon_p2p.payments.settlement import UNINITED
from cocoon_p2p.payments.store import ChannelStore
from cocoon_p2p.payments.voucherlog import VoucherLog
from cocoon_p2p.payments.vouchers import SignedSemiChannel
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain

CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]
TON = 1_000_000_000
PRICE = 2_500_000  # per token
JOB = 4 * PRICE  # a job ("crash points": [CLS] crash points [SEP]) costs 0.01 TON: far above any forward fee
QUARANTINE_S = 60
DEPOSIT = TON // 2
FORWARD_FEE_MAX = TON // 1000
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


@pytest.fixture(scope="module")
def chain() -> Iterator[LocalChain]:
    """Testnet-like: sendBoc only "accepted", blocks every 400 ms, rate limits, failing calls."""
    with open_local_chain(realistic=True) as c:
        yield c


@dataclass
class Net:
    """One case's worker process, client folder, and what the client runs printed."""

    chain: LocalChain
    root: Path
    worker: subprocess.Popen[bytes] | None = None
    addr: str = ""
    served: int = 0  # client runs that printed their job's result
    logs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for role, text in (
            ("worker", f"credit_nanoton = {10 * JOB}\nwatch_interval_s = 1.0\n"),
            ("client", f"quarantine_s = {QUARANTINE_S}\ndeposit_nanoton = {DEPOSIT}\n"),
        ):
            (self.root / role).mkdir(parents=True)
            (self.root / role / f"{role}.toml").write_text(text)

    def _common(self, role: str) -> list[str]:
        return ["--config", str(self.root / role / f"{role}.toml"), "--data-dir", str(self.root / role),
                "--chain", self.chain.endpoint, "--chain-api-key", f"crash-{role}", "--local-chain",
                "--log-level", "WARNING"]  # fmt: skip

    def start_worker(self, crash: CrashPoint | None = None) -> None:
        cmd = [*CLI, "worker", *self._common("worker"), "--model", "minilm", "--backend", "onnxruntime",
               "--price-nanoton", str(PRICE), "--announce-interval-s", "0.5"]  # fmt: skip
        if self.addr:
            cmd += ["--listen", self.addr.split("/p2p/")[0]]  # same address: the client finds it again
        env = {**os.environ, ENV: crash.value} if crash else {k: v for k, v in os.environ.items() if k != ENV}
        err = (self.root / "worker.err").open("ab")
        self.worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
        addr = _wait_line(self.worker, b"listening ")
        assert not self.addr or addr == self.addr
        self.addr = addr
        _wait_line(self.worker, b"serving ")

    def stop_worker(self) -> int:
        """SIGTERM: the worker drains, closes the channels holding its earnings, exits."""
        assert self.worker is not None
        self.worker.send_signal(signal.SIGTERM)
        return self.worker.wait(timeout=90)

    def client(self, *, settle: bool = False, crash: CrashPoint | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*CLI, "client", "embed", "crash points", "--model", "minilm", *self._common("client"),
               "--bootstrap", self.addr, "--max-price-nanoton", str(PRICE), "--wait-s", "30"]  # fmt: skip
        env = {**os.environ, ENV: crash.value} if crash else {k: v for k, v in os.environ.items() if k != ENV}
        out = subprocess.run(cmd + (["--settle"] if settle else []), capture_output=True, text=True, env=env,
                             timeout=180)  # fmt: skip
        self.logs.append(out.stderr)
        print(f"---- client run (exit {out.returncode}):\n{out.stderr[-2000:]}")  # shown when a case fails
        if "served by" in out.stderr:
            self.served += 1
        return out

    def worker_store(self) -> ChannelStore:
        return ChannelStore(self.root / "worker" / "payments" / "channels", read_only=True)


def _wait_line(proc: subprocess.Popen[bytes], prefix: bytes, timeout_s: float = 120) -> str:
    """The rest of the first stdout line of ``proc`` starting with ``prefix``."""
    assert proc.stdout is not None
    fd, buf = proc.stdout.fileno(), b""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        assert chunk, f"the process ended before printing {prefix!r}"
        buf += chunk
        for line in buf.split(b"\n")[:-1]:
            if line.startswith(prefix):
                return line.split()[1].decode()
    raise AssertionError(f"no {prefix!r} line within {timeout_s} s")


def _ok(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("case", CASES, ids=[c.point.value for c in CASES])
def test_a_kill_at_each_durable_write_loses_nothing_and_pays_nothing_twice(
    case: Case, chain: LocalChain, tmp_path: Path
) -> None:
    net = Net(chain, tmp_path)
    on_worker = case.point in WORKER_SIDE
    net.start_worker(case.point if on_worker else None)
    try:
        for _ in range(case.warmup_jobs):
            _ok(net.client())
        # ---- the crash
        crash = None if on_worker else case.point
        if case.trigger == "stop":
            net.stop_worker()
        else:
            out = net.client(settle=case.trigger == "settle", crash=crash)
            if not on_worker:
                assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
                assert f"crash point {case.point.value}" in out.stderr
        if on_worker:
            assert net.worker is not None
            assert net.worker.wait(timeout=90) == -signal.SIGKILL
            assert f"crash point {case.point.value}" in (tmp_path / "worker.err").read_text()
            net.start_worker()
        # ---- recovery: one more job and the client settles; the worker stops, closing the rest
        _ok(net.client(settle=True))
        assert net.stop_worker() == 0
        _run_out_quarantines(net)
    finally:
        if net.worker is not None and net.worker.poll() is None:
            net.worker.kill()
    _audit(net, case)


def _run_out_quarantines(net: Net) -> None:
    """Channels in an uncooperative close: move the chain's clock past the quarantine and let a
    restarted worker finish them."""
    store = net.worker_store()
    waiting = [cid for cid in store.unsettled() if store.state(cid) is ChannelState.CLOSING_UNCOOPERATIVE]
    store.close()
    if not waiting:
        return
    net.chain.advance(QUARANTINE_S + 5)
    net.start_worker()
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            store = net.worker_store()
            left = [cid for cid in waiting if store.state(cid) is not ChannelState.CLOSED]
            store.close()
            if not left:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"channels {left} never finished closing")
    finally:
        assert net.stop_worker() == 0


def _audit(net: Net, case: Case) -> None:
    net.chain.settle()  # every message sent has landed
    signed: dict[int, int] = {}  # channel -> the total of the newest voucher the client signed
    log = VoucherLog(net.root / "client" / "payments" / "issued.log", read_only=True)
    for record in log.records:
        v = SignedSemiChannel.from_record(record)
        signed[v.state.channel_id] = v.state.body.sent
    log.close()
    wallet = Wallet.load_or_create(net.root / "worker" / "wallet.json").address
    payouts: dict[str, int] = {}
    for tx in net.chain.transactions(wallet, limit=100):
        if tx.in_source:
            payouts[tx.in_source] = payouts.get(tx.in_source, 0) + tx.in_value
    store = net.worker_store()
    try:
        held = {cid: store.earned(cid) for cid in store.channels}
        billed = {cid: store.billed(cid) for cid in store.channels}
        assert set(signed) <= set(held), "a voucher for a channel the worker does not know"
        for cid in held:
            assert held[cid] == signed.get(cid, 0), f"channel {cid:x}: held {held[cid]}, signed {signed.get(cid)}"
            address = store.channels[cid].terms.address
            assert read_channel(net.chain, address).state == UNINITED, f"channel {cid:x} is still open on chain"
            assert store.state(cid) is ChannelState.CLOSED
            paid_out = payouts.get(raw_address(address), 0)
            assert held[cid] - FORWARD_FEE_MAX < paid_out <= held[cid] or held[cid] == paid_out == 0
        # Billed but unpaid: the job whose voucher died unsigned. A killed worker may also
        # have lost its last job's bill (written in groups, every 50 ms): in the client's favour.
        unpaid, lost_bill = sum(billed.values()) - sum(held.values()), JOB if case.point in WORKER_SIDE else 0
        assert case.unpaid_jobs * JOB - lost_bill <= unpaid <= case.unpaid_jobs * JOB
        endings = Counter(store.lifecycle(cid).ending for cid in held)
        assert endings == Counter({CloseOutcome.COOPERATIVE: len(held) - case.uncooperative,
                                   CloseOutcome.UNCOOPERATIVE: case.uncooperative}) - Counter()  # fmt: skip
    finally:
        store.close()
    assert sum(signed.values()) == (net.served + case.paid_unseen) * JOB
    # No deposit left behind: every contract the client's wallet funded has paid it out again.
    client_wallet = Wallet.load_or_create(net.root / "client" / "wallet.json").address
    funded = {d for tx in net.chain.transactions(client_wallet, limit=100) for d, v in tx.out_messages if v >= DEPOSIT}
    assert funded and all(net.chain.balance(d) < FORWARD_FEE_MAX for d in funded), "a deposit sits in a contract"
