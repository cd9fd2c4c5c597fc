"""A local TON chain behind the toncenter v2 API, for tests, the demo and the simulator.

``server.mjs`` (beside this file) runs @ton/sandbox, TON's own emulator, behind
the subset of toncenter's HTTP API that :class:`~cocoon_p2p.payments.chain.TonCenter`
speaks, plus a faucet and a clock (``/cocoon/fund``, ``/cocoon/advance``). Its npm
packages are pinned by ``package-lock.json``: they are installed with ``npm ci``
on first use, here when this folder is writable (a source checkout), else in a
copy under the user's cache (an installed wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cocoon_p2p.payments.chain import ChainError, TonCenter, Wallet

SOURCE_DIR = Path(__file__).resolve().parent
_FILES = ("server.mjs", "package.json", "package-lock.json")


class LocalChain(TonCenter):
    """The local chain's client, with its test-only faucet and clock."""

    confirm_poll_s = 0.2

    def fund(self, address: str, amount: int) -> None:
        """Give ``address`` ``amount`` nanoton from the faucet."""
        self._call("/cocoon/fund", body={"address": address, "amount": str(amount)})

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
def open_local_chain() -> Iterator[LocalChain]:
    """Start the local chain on a free port; stop it when the block ends."""
    proc = subprocess.Popen(
        ["node", "server.mjs"], cwd=localchain_dir(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            raise ChainError(f"local chain did not start: {line!r}")
        yield LocalChain(line.split()[1])
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the server exits when its stdin ends
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
