"""Crash points behind results: kill -9 a gateway whose answered requests are not paid yet, or
the worker while the one voucher paying for several of them arrives.

A gateway (``cocoon-node gateway``, a paid client behind HTTP) answers a request as soon as
its result is in, and pays behind it: the costs of the jobs finished within
``pay_linger_s`` (1 s here, so that it shows) go into one voucher. Unlike
``test_crashpoints.py``, whose client process flushes its voucher before it prints, a
process here dies holding several answered jobs whose payment lingers, is logged and not
sent, or is half received. Real processes on the local chain: a paid MiniLM worker and the
gateway, asked over real HTTP. Each case warms up (one paid request, its voucher logged),
has ``K`` requests answered at once, and crashes; the crashed process is restarted from its
data directory, the gateway answers one more request and stops (SIGTERM: it sends what
lingers), ``cocoon-node client embed --settle`` on the gateway's folder (same keys, same
channels) runs one more job and closes the channel, the worker stops. The audit
(:func:`.crashnet.audit`): the worker holds exactly the newest voucher the gateway signed,
what it billed beyond that is the jobs whose payment died lingering, unsigned (never more:
their cost is bounded by the worker's credit), every channel is closed on chain, the
worker's wallet got what it holds, no deposit is left in a contract; and the vouchers the
gateway signed cover, one by one, the batches the case expects.
"""

from __future__ import annotations

import enum
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cocoon_p2p.core.crashpoints import CrashPoint
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain

from .crashnet import CLI, CREDIT_JOBS, JOB, PRICE, Net, audit, crash_env, ok, signed_vouchers, wait_line

P = CrashPoint
K = 3  # requests answered together, paid by one voucher
LINGER_S = 1.0  # the gateway's pay_linger_s: long enough to kill it while its payment lingers
WATCH_S = 1.0  # the gateway's watch_interval_s: how often it looks after its channels
IDLE_WAIT_S = 4 * WATCH_S  # how long an idle gateway may take to resend a voucher not acknowledged
BODY = json.dumps({"model": "minilm", "input": "crash points"}).encode()  # one job of JOB nanoton

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js"),
]


class Side(enum.Enum):
    GATEWAY = "gateway"
    WORKER = "worker"


@dataclass(frozen=True)
class Crash:
    """Who dies once ``K`` requests are answered together, and where."""

    side: Side
    point: CrashPoint | None = None  # None: a SIGKILL from outside at once, while their payment lingers

    def arm(self) -> str | None:
        """COCOON_CRASH_AT for a process just started: its first voucher pays the one request
        before the K (hit 1), the second covers the K."""
        return f"{self.point}@2" if self.point else None


@dataclass(frozen=True)
class Case:
    """Crashes in turn (each after K answers, each followed by a restart and one more answer),
    and what a correct recovery leaves."""

    name: str
    crashes: tuple[Crash, ...]
    unpaid_jobs: int  # jobs billed whose voucher never existed
    batches: tuple[int, ...]  # jobs per voucher the gateway signed, in order
    # The worker restarts only once the gateway gave up resending (its payment "not
    # acknowledged yet"), and no request follows until the worker holds every voucher signed.
    idle: bool = False


LINGERING = Crash(Side.GATEWAY)
CASES = [
    # The K answers die unsigned with the gateway; restarted, it dies again with the next K's
    # voucher logged, not sent. Vouchers: warm-up, one request, the K (sent after the second
    # restart), one request, the settling client run.
    Case("gateway", (LINGERING, Crash(Side.GATEWAY, P.PAYER_VOUCHER_LOGGED)), K, (1, 1, K, 1, 1)),
    # The worker dies as the K's voucher is made durable: held again when the gateway reconnects.
    Case("worker-logged", (Crash(Side.WORKER, P.PAYEE_VOUCHER_LOGGED),), 0, (1, K, 1, 1)),
    # The worker dies as it arrives and is back only after the payer's retries (~5 s), with no
    # job from this gateway to carry the voucher again: the payer's watch resends it (it once
    # waited for the next job or settlement, and a worker closing meanwhile closed short of it).
    Case("worker-received-idle", (Crash(Side.WORKER, P.PAYEE_VOUCHER_RECEIVED),), 0, (1, K, 1, 1), idle=True),
]  # fmt: skip
# A worker is armed only when it first starts (its hits after a restart depend on resends).
assert all(c.side is Side.GATEWAY for case in CASES for c in case.crashes[1:])
assert all(c.unpaid_jobs < CREDIT_JOBS for c in CASES), "the worker would refuse the request after the crash"


class NotHeld(AssertionError):
    """The worker does not hold a voucher the gateway signed (what the idle case checks)."""


PARAMS = [pytest.param(c, id=c.name) for c in CASES]


@pytest.fixture(scope="module")
def chain() -> Iterator[LocalChain]:
    """Testnet-like: sendBoc only "accepted", blocks every 400 ms, rate limits, failing calls."""
    with open_local_chain(realistic=True) as c:
        yield c


@dataclass
class Behind(Net):
    """A :class:`Net` whose client folder is also a gateway's data directory."""

    gateway: subprocess.Popen[bytes] | None = None
    url: str = ""
    answered: int = 0  # requests the gateway answered with embeddings

    def start_gateway(self, crash: str | None = None) -> None:
        cmd = [*CLI, "gateway", *self.common("client"), "--http", "127.0.0.1:0", "--bootstrap", self.addr,
               "--model", "minilm", "--max-price-nanoton", str(PRICE)]  # fmt: skip
        err = (self.root / "gateway.err").open("ab")
        self.gateway = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=crash_env(crash))
        self.url = wait_line(self.gateway, b"gateway ")

    def embed(self) -> None:
        """One embeddings request, answered (HTTPError if not)."""
        req = urllib.request.Request(f"{self.url}/embeddings", BODY, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert len(json.load(resp)["data"][0]["embedding"]) == 384
        self.answered += 1

    def embed_when_ready(self, timeout_s: float = 60) -> None:
        """One request answered, asked again while the gateway has not found the worker yet."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                return self.embed()
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")
                if time.monotonic() > end:
                    raise AssertionError(f"the gateway never answered: {exc.code} {detail}") from exc
                print(f"not yet: {exc.code} {detail[:200]}")
                time.sleep(0.3)

    def embed_together(self, n: int) -> None:
        with ThreadPoolExecutor(n) as pool:
            for done in [pool.submit(self.embed) for _ in range(n)]:
                done.result()

    def vouchers_logged(self, n: int, timeout_s: float = 30) -> None:
        """Wait until the gateway has logged ``n`` vouchers (its payment behind the answers)."""
        end = time.monotonic() + timeout_s
        while len(self.signed()) < n:
            assert time.monotonic() < end, f"{len(self.signed())} voucher(s) logged, not {n}"
            time.sleep(0.05)

    def signed(self) -> list[int]:
        """The totals of the vouchers the gateway signed, in order."""
        if not (self.root / "client" / "payments" / "issued.log").exists():
            return []
        return [v.state.body.sent for v in signed_vouchers(self)]

    def holds_every_voucher(self) -> bool:
        """Whether the (running) worker holds the newest voucher the gateway signed on each channel."""
        newest = {v.state.channel_id: v.state.body.sent for v in signed_vouchers(self)}
        store = self.worker_store()
        try:
            return all(cid in store.channels and store.earned(cid) == sent for cid, sent in newest.items())
        finally:
            store.close()

    def stop_gateway(self) -> int:
        """SIGTERM: the gateway sends what lingers and exits."""
        assert self.gateway is not None
        self.gateway.send_signal(signal.SIGTERM)
        return self.gateway.wait(timeout=60)

    def kill_all(self) -> None:
        super().kill_all()
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.kill()
            self.gateway.wait()


def _wait_for(ready: Callable[[], bool], timeout_s: float = 30, fail: AssertionError | None = None) -> None:
    end = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > end:
            raise fail or AssertionError(f"not within {timeout_s} s")
        time.sleep(0.1)


def _died_at(proc: subprocess.Popen[bytes] | None, point: str, err: Path) -> None:
    assert proc is not None
    assert proc.wait(timeout=90) == -signal.SIGKILL
    assert f"crash point {point.split('@')[0]}" in err.read_text()


def _arm(case: Case, i: int, side: Side) -> str | None:
    """The crash point for ``side`` started before crash ``i``: armed if that crash is its."""
    crash = case.crashes[i] if i < len(case.crashes) else None
    return crash.arm() if crash is not None and crash.side is side else None


@pytest.mark.parametrize("case", PARAMS)
def test_a_kill_with_payments_behind_answers_loses_nothing_and_pays_nothing_twice(
    case: Case, chain: LocalChain, tmp_path: Path
) -> None:
    net = Behind(chain, tmp_path, client_toml=f"pay_linger_s = {LINGER_S}\nwatch_interval_s = {WATCH_S}\n")
    logged = 1  # vouchers the gateway logged so far
    try:
        net.start_worker(_arm(case, 0, Side.WORKER))
        net.start_gateway(_arm(case, 0, Side.GATEWAY))
        net.embed_when_ready()  # opens the channel
        net.vouchers_logged(logged)  # its voucher apart from the K's
        for i, crash in enumerate(case.crashes):
            net.embed_together(K)
            # ---- the crash, while the K answers' payment lingers or goes
            side = {Side.GATEWAY: net.gateway, Side.WORKER: net.worker}[crash.side]
            assert side is not None
            if crash.point is None:
                side.kill()
                side.wait()
                assert len(net.signed()) == logged, "the K answers were paid before the kill: nothing lingered"
            else:
                _died_at(side, crash.point, tmp_path / f"{crash.side.value}.err")
                logged += 1
                totals = net.signed()
                assert len(totals) == logged and totals[-1] - totals[-2] == K * JOB, "one voucher for the K answers"
            # ---- restarted from its data directory, and one more answer
            if crash.side is Side.WORKER:
                if case.idle:
                    _wait_for(lambda: b"not acknowledged yet" in (tmp_path / "gateway.err").read_bytes())
                net.start_worker(_arm(case, i + 1, Side.WORKER))
                if case.idle:
                    _wait_for(net.holds_every_voucher, IDLE_WAIT_S, NotHeld("the K answers' voucher never resent"))
            else:
                net.start_gateway(_arm(case, i + 1, Side.GATEWAY))
            net.embed_when_ready()
            logged += 1
            if i + 1 < len(case.crashes):
                net.vouchers_logged(logged)
        # ---- the gateway stops (sending what lingers), a client run settles, the worker stops
        assert net.stop_gateway() == 0
        ok(net.client(settle=True))
        assert net.stop_worker() == 0
    finally:
        net.kill_all()
    totals = net.signed()
    assert [b - a for a, b in zip([0, *totals], totals, strict=False)] == [b * JOB for b in case.batches]
    audit(net, paid_jobs=net.answered + net.served - case.unpaid_jobs, unpaid_jobs=case.unpaid_jobs)
