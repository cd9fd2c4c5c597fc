"""A local TON chain behind the toncenter v2 API, for tests, the demo and the simulator.

``server.mjs`` (beside this file) runs @ton/sandbox, TON's own emulator, behind
the subset of toncenter's HTTP API that :class:`~cocoon_p2p.payments.chain.TonCenter`
speaks, in toncenter's shapes, plus a faucet, a clock and a few test-only controls
(``/cocoon/...``). It runs in one of two modes (:class:`ChainOptions`):

- synchronous (the default, for fast tests): sendBoc applies the message and all it
  triggers before it returns, with no rate limit and no failures;
- realistic, like testnet: sendBoc only accepts; a block every ``block_ms`` applies the
  queued external messages, each internal message a block after the transaction that
  sent it; requests past ``rate_limit`` per second per API key (``rate_limit_nokey``
  without one) get toncenter's 429, and a ``fail_rate`` share a 502/503/504.
  :meth:`LocalChain.settle` waits until everything queued has been applied.

Its npm packages are pinned by ``package-lock.json``: they are installed with ``npm ci``
on first use, here when this folder is writable (a source checkout), else in a copy
under the user's cache (an installed wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon_p2p.payments.chain import ChainError, TonCenter, Wallet

SOURCE_DIR = Path(__file__).resolve().parent
_FILES = ("server.mjs", "package.json", "package-lock.json")
LOCAL_API_KEY = "cocoon-local"  # what a realistic chain's own client sends: the keyed limit applies


@dataclass(frozen=True)
class ChainOptions:
    """How the local chain behaves. The defaults are the synchronous mode; :meth:`realistic`
    gives testnet-like ones. Rates are requests per second, 0 for unlimited."""

    block_ms: int = 0  # 0: synchronous
    rate_limit: float = 0.0  # per API key
    rate_limit_nokey: float = 0.0  # all requests without a key together
    fail_rate: float = 0.0  # the share of API requests answered 502/503/504
    seed: int = 0  # for the failures, so a failing run can be replayed

    @classmethod
    def realistic(cls) -> ChainOptions:
        """Like testnet behind toncenter, with blocks faster than TON's ~5 s so tests stay short."""
        return cls(block_ms=400, rate_limit=10.0, rate_limit_nokey=1.0, fail_rate=0.02)

    @property
    def is_realistic(self) -> bool:
        return self.block_ms > 0

    def argv(self) -> list[str]:
        """The server's command-line options."""
        values = (self.block_ms, self.rate_limit, self.rate_limit_nokey, self.fail_rate, self.seed)
        names = ("--block-ms", "--rate-limit", "--rate-limit-nokey", "--fail-rate", "--seed")
        return [token for name, value in zip(names, values, strict=True) for token in (name, str(value))]


@dataclass(frozen=True)
class ChainStatus:
    """Where the local chain stands (``/cocoon/status``)."""

    realistic: bool
    block: int  # the seqno the next block gets
    pending: int  # messages queued for the next block
    dropped: int  # external messages no account accepted, so never applied
    now: int


class LocalChain(TonCenter):
    """The local chain's client, with its test-only faucet, clock and block controls."""

    confirm_poll_s = 0.2

    def fund(self, address: str, amount: int, *, settle: bool = True) -> None:
        """Give ``address`` ``amount`` nanoton from the faucet. In the realistic mode the gift goes
        through blocks like any transfer (the faucet's transaction, then the credit a block
        later): ``settle`` waits for it, else the caller steps or waits for the blocks."""
        self._call("/cocoon/fund", body={"address": address, "amount": str(amount)})
        if settle:
            self.settle()

    def new_wallet(self, amount: int) -> Wallet:
        """A fresh wallet holding ``amount`` from the faucet, deployed."""
        wallet = Wallet.create()
        self.fund(wallet.address, amount)
        wallet.deploy(self)
        return wallet

    def top_up(self, wallet: Wallet, amount: int) -> None:
        """Fund a wallet that is kept across runs when it holds less than half of
        ``amount``, then make sure it is deployed (an operator's node, a test's)."""
        if self.balance(wallet.address) < amount // 2:
            self.fund(wallet.address, amount)
        wallet.ensure_deployed(self)

    def advance(self, seconds: int) -> int:
        """Move the chain's clock ahead (a quarantine ends); the new chain time."""
        return int(self._call("/cocoon/advance", body={"seconds": seconds})["now"])

    def now(self) -> int:
        """The chain's clock, which :meth:`advance` moves."""
        return int(self._call("/cocoon/now")["now"])

    def status(self) -> ChainStatus:
        """The block count, the queue and the clock."""
        return _status(self._call("/cocoon/status"))

    def settle(self, timeout_s: float = 60.0) -> ChainStatus:
        """Wait until every queued message, and every message those send, has been applied
        (at once in the synchronous mode): what tests do instead of sleeping.
        A ChainError if the queue is still busy after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:  # in rounds shorter than an HTTP timeout
            res = self._call("/cocoon/settle", body={"timeout_s": max(0.0, min(10.0, deadline - time.monotonic()))})
            if res["settled"]:
                return _status(res)
            if time.monotonic() >= deadline:
                raise ChainError(f"the local chain did not settle in {timeout_s} s ({res['pending']} messages queued)")

    def produce_blocks(self, count: int = 1) -> ChainStatus:
        """Produce ``count`` blocks now (tests that step the realistic mode by hand give it a
        long ``block_ms``, so no block comes between their steps)."""
        return _status(self._call("/cocoon/block", body={"count": count}))


def _status(res: dict[str, Any]) -> ChainStatus:
    return ChainStatus(
        realistic=bool(res["realistic"]),
        block=int(res["block"]),
        pending=int(res["pending"]),
        dropped=int(res["dropped"]),
        now=int(res["now"]),
    )


def _installed(folder: Path) -> bool:
    return (folder / "node_modules" / "@ton" / "sandbox").is_dir()


def localchain_dir() -> Path:
    """The folder the server runs from, with its npm packages installed (``npm ci`` once)."""
    folder = SOURCE_DIR
    if not _installed(folder) and not os.access(folder, os.W_OK):
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cocoon-p2p" / "localchain"
        cache.mkdir(parents=True, exist_ok=True)
        for name in _FILES:
            shutil.copyfile(SOURCE_DIR / name, cache / name)
        folder = cache
    if _installed(folder):
        return folder
    if shutil.which("npm") is None:
        raise ChainError("the local chain needs Node.js and npm")
    out = subprocess.run(["npm", "ci", "--silent"], cwd=folder, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise ChainError(f"npm ci for the local chain failed: {out.stderr[-500:]}")
    return folder


@contextmanager
def open_local_chain(
    realistic: bool = False,
    *,
    block_ms: int | None = None,
    rate_limit: float | None = None,
    rate_limit_nokey: float | None = None,
    fail_rate: float | None = None,
    seed: int | None = None,
    api_key: str | None = None,
) -> Iterator[LocalChain]:
    """Start the local chain on a free port; stop it when the block ends.

    ``realistic`` starts from :meth:`ChainOptions.realistic`, else from the synchronous
    defaults; the other arguments override single options. The client it yields sends
    ``api_key`` (in the realistic mode :data:`LOCAL_API_KEY` unless given), and polls for
    confirmations about twice a block."""
    base = ChainOptions.realistic() if realistic else ChainOptions()
    options = ChainOptions(
        block_ms=base.block_ms if block_ms is None else block_ms,
        rate_limit=base.rate_limit if rate_limit is None else rate_limit,
        rate_limit_nokey=base.rate_limit_nokey if rate_limit_nokey is None else rate_limit_nokey,
        fail_rate=base.fail_rate if fail_rate is None else fail_rate,
        seed=base.seed if seed is None else seed,
    )
    with start_local_chain(options) as endpoint:
        chain = LocalChain(endpoint, api_key=api_key or (LOCAL_API_KEY if options.is_realistic else None))
        if options.is_realistic:
            chain.confirm_poll_s = max(LocalChain.confirm_poll_s, options.block_ms / 2000)
        yield chain


@contextmanager
def start_local_chain(options: ChainOptions) -> Iterator[str]:
    """Run the server with ``options``; its endpoint (``http://127.0.0.1:PORT``) while the block runs."""
    proc = subprocess.Popen(
        ["node", "server.mjs", *options.argv()],
        cwd=localchain_dir(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            raise ChainError(f"local chain did not start: {line!r}")
        yield line.split()[1]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the server exits when its stdin ends
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
