"""What the kill -9 tests share: a real worker process, a client folder, and the audit.

Used by ``test_crashpoints.py`` (a client process per job) and ``test_crashpoints_behind.py``
(a gateway that answers before it pays). :class:`Net` runs a paid MiniLM ``cocoon-node
worker`` on the local chain and ``cocoon-node client`` runs on the client folder;
:func:`audit` checks, once everything has stopped, that every voucher the client signed is
held by the worker and no more, that what was billed and not paid is what the case expects,
and that the chain agrees (channels closed, the worker's wallet paid, no deposit left).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cocoon_p2p.core.crashpoints import ENV
from cocoon_p2p.payments.chain import Wallet, raw_address, read_channel
from cocoon_p2p.payments.channelstate import ChannelState, CloseOutcome
from cocoon_p2p.payments.settlement import UNINITED
from cocoon_p2p.payments.store import ChannelStore
from cocoon_p2p.payments.voucherlog import VoucherLog
from cocoon_p2p.payments.vouchers import SignedSemiChannel
from cocoon_p2p.testing.localchain import LocalChain

CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]
TON = 1_000_000_000
PRICE = 2_500_000  # per token
JOB = 4 * PRICE  # a job ("crash points": [CLS] crash points [SEP]) costs 0.01 TON: far above any forward fee
CREDIT_JOBS = 10  # what the worker lets a client owe, in jobs
QUARANTINE_S = 60
DEPOSIT = TON // 2
FORWARD_FEE_MAX = TON // 1000


def crash_env(crash: str | None) -> dict[str, str]:
    """This process's environment, with ``COCOON_CRASH_AT=crash`` (``<point>[@n]``) or without it."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    return {**env, ENV: crash} if crash else env


@dataclass
class Net:
    """One case's worker process, client folder, and what the client runs printed.
    ``client_toml`` is added to the client folder's config (a gateway runs on it too)."""

    chain: LocalChain
    root: Path
    client_toml: str = ""
    worker: subprocess.Popen[bytes] | None = None
    addr: str = ""
    served: int = 0  # client runs that printed their job's result
    logs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for role, text in (
            ("worker", f"credit_nanoton = {CREDIT_JOBS * JOB}\nwatch_interval_s = 1.0\n"),
            ("client", f"quarantine_s = {QUARANTINE_S}\ndeposit_nanoton = {DEPOSIT}\n{self.client_toml}"),
        ):
            (self.root / role).mkdir(parents=True)
            (self.root / role / f"{role}.toml").write_text(text)

    def common(self, role: str) -> list[str]:
        """The flags every run of ``role`` ("worker" or "client") takes: config, folder, chain."""
        return ["--config", str(self.root / role / f"{role}.toml"), "--data-dir", str(self.root / role),
                "--chain", self.chain.endpoint, "--chain-api-key", f"crash-{role}", "--local-chain",
                "--log-level", "WARNING"]  # fmt: skip

    def start_worker(self, crash: str | None = None) -> None:
        """Start the worker (on its first address again after a restart) and wait until it serves."""
        cmd = [*CLI, "worker", *self.common("worker"), "--model", "minilm", "--backend", "onnxruntime",
               "--price-nanoton", str(PRICE), "--announce-interval-s", "0.5"]  # fmt: skip
        if self.addr:
            cmd += ["--listen", self.addr.split("/p2p/")[0]]  # same address: the client finds it again
        err = (self.root / "worker.err").open("ab")
        self.worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=crash_env(crash))
        addr = wait_line(self.worker, b"listening ")
        assert not self.addr or addr == self.addr
        self.addr = addr
        wait_line(self.worker, b"serving ")

    def stop_worker(self) -> int:
        """SIGTERM: the worker drains, closes the channels holding its earnings, exits."""
        assert self.worker is not None
        self.worker.send_signal(signal.SIGTERM)
        return self.worker.wait(timeout=90)

    def client(self, *, settle: bool = False, crash: str | None = None) -> subprocess.CompletedProcess[str]:
        """One ``cocoon-node client embed`` run on the client folder (``--settle``: then close its channel)."""
        cmd = [*CLI, "client", "embed", "crash points", "--model", "minilm", *self.common("client"),
               "--bootstrap", self.addr, "--max-price-nanoton", str(PRICE), "--wait-s", "30"]  # fmt: skip
        out = subprocess.run(cmd + (["--settle"] if settle else []), capture_output=True, text=True,
                             env=crash_env(crash), timeout=180)  # fmt: skip
        self.logs.append(out.stderr)
        print(f"---- client run (exit {out.returncode}):\n{out.stderr[-2000:]}")  # shown when a case fails
        if "served by" in out.stderr:
            self.served += 1
        return out

    def worker_store(self) -> ChannelStore:
        return ChannelStore(self.root / "worker" / "payments" / "channels", read_only=True)

    def kill_all(self) -> None:
        """After a failed case: no process left behind."""
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill()
            self.worker.wait()


def wait_line(proc: subprocess.Popen[bytes], prefix: bytes, timeout_s: float = 120) -> str:
    """The second word of the first stdout line of ``proc`` starting with ``prefix``."""
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


def ok(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr[-3000:]


def signed_vouchers(net: Net) -> list[SignedSemiChannel]:
    """Every voucher the client signed, in the order it logged them."""
    log = VoucherLog(net.root / "client" / "payments" / "issued.log", read_only=True)
    try:
        return [SignedSemiChannel.from_record(r) for r in log.records]
    finally:
        log.close()


def run_out_quarantines(net: Net) -> None:
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


def audit(net: Net, *, paid_jobs: int, unpaid_jobs: int = 0, lost_bills: int = 0, uncooperative: int = 0) -> None:
    """After every process stopped: the client signed vouchers for ``paid_jobs`` jobs and the
    worker holds exactly the newest of each channel (nothing lost, nothing paid twice); the worker
    billed ``unpaid_jobs`` jobs more than it holds (or up to ``lost_bills`` fewer: a killed worker
    may lose its last bills, in the client's favour); every channel closed on chain,
    ``uncooperative`` of them through quarantine; the worker's wallet got what it holds; no
    deposit left in a contract."""
    net.chain.settle()  # every message sent has landed
    signed: dict[int, int] = {}  # channel -> the total of the newest voucher the client signed
    for v in signed_vouchers(net):
        signed[v.state.channel_id] = v.state.body.sent
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
        unpaid = sum(billed.values()) - sum(held.values())
        assert (unpaid_jobs - lost_bills) * JOB <= unpaid <= unpaid_jobs * JOB, f"billed, unpaid: {unpaid / JOB} jobs"
        endings = Counter(store.lifecycle(cid).ending for cid in held)
        assert endings == Counter({CloseOutcome.COOPERATIVE: len(held) - uncooperative,
                                   CloseOutcome.UNCOOPERATIVE: uncooperative}) - Counter()  # fmt: skip
    finally:
        store.close()
    assert sum(signed.values()) == paid_jobs * JOB, f"signed for {sum(signed.values()) / JOB} jobs, not {paid_jobs}"
    # No deposit left behind: every contract the client's wallet funded has paid it out again.
    client_wallet = Wallet.load_or_create(net.root / "client" / "wallet.json").address
    funded = {d for tx in net.chain.transactions(client_wallet, limit=100) for d, v in tx.out_messages if v >= DEPOSIT}
    assert funded and all(net.chain.balance(d) < FORWARD_FEE_MAX for d in funded), "a deposit sits in a contract"
