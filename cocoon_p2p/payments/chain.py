"""Chain access through the toncenter v2 HTTP API: real TON or the local chain, one client.

:class:`TonCenter` speaks the subset cocoon needs (sendBoc, runGetMethod,
getAddressInformation, getTransactions), so an operator points it at a public
endpoint (with an API key) or at their own node; the tests and the demo point it
at :func:`cocoon_p2p.testing.localchain.open_local_chain` (@ton/sandbox on 127.0.0.1).

:class:`Wallet` is a v4r2 wallet from ``tonsdk`` (keys and transfer messages),
which funds and drives channels; cells cross between tonsdk and pytoniq-core as BOC.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytoniq_core import Cell, begin_cell

from cocoon_p2p.core.durable import StateFileDamaged, read_json, write_atomic
from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.identity import refuse_if_exposed

from .settlement import ChainView, Quarantine

WALLET_ADVICE = (
    "It holds the wallet's mnemonic: restore it from your backup of the mnemonic. Do not delete it: "
    "a new, empty wallet would be made, and the old one's funds are reachable only through its mnemonic."
)


class ChainError(CocoonError):
    """The chain endpoint failed or refused a request."""


class TonCenter:
    """A toncenter v2 client (synchronous; call it from a thread in trio code)."""

    # How often to ask whether a message landed: TON takes a block (~5 s) and
    # toncenter allows 1-10 requests a second. The local chain applies at once.
    confirm_poll_s = 1.0

    def __init__(self, endpoint: str, *, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.api_key = api_key
        self.timeout_s = timeout_s

    def _call(self, path: str, *, query: dict[str, Any] | None = None, body: dict[str, Any] | None = None) -> Any:
        url = self.endpoint + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                payload = json.loads(resp.read(1 << 22))
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read(1 << 16))
            except ValueError:
                raise ChainError(f"{path}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ChainError(f"{path}: {exc}") from exc
        if not payload.get("ok"):
            raise ChainError(f"{path}: {payload.get('error', 'failed')}")
        return payload["result"]

    def send_boc(self, boc: bytes) -> None:
        self._call("/api/v2/sendBoc", body={"boc": base64.b64encode(boc).decode()})

    def run_get_method(self, address: str, method: str, stack: list[int] | None = None) -> list[Any]:
        """The method's result stack: ints as int, cells as pytoniq Cells."""
        args = [["num", hex(x)] for x in stack or []]
        res = self._call("/api/v2/runGetMethod", body={"address": address, "method": method, "stack": args})
        if res["exit_code"] not in (0, 1):
            raise ChainError(f"{method} on {address} exited with {res['exit_code']}")
        out: list[Any] = []
        for kind, value in res["stack"]:
            if kind == "num":
                out.append(int(value, 16))
            elif kind == "cell":
                out.append(Cell.one_from_boc(base64.b64decode(value["bytes"])))
            elif kind == "tuple":
                out.append([_entry(e) for e in value["elements"]])
            else:
                out.append(None)
        return out

    def balance(self, address: str) -> int:
        return int(self._call("/api/v2/getAddressInformation", query={"address": address})["balance"])

    def state(self, address: str) -> str:
        return str(self._call("/api/v2/getAddressInformation", query={"address": address})["state"])

    def transactions(self, address: str, limit: int = 20) -> list[dict[str, Any]]:
        return list(self._call("/api/v2/getTransactions", query={"address": address, "limit": limit}))

    def now(self) -> int:
        """The chain's clock (real TON follows wall time closely enough for quarantines of minutes)."""
        return int(time.time())


def _entry(e: dict[str, Any]) -> Any:
    """One toncenter ``tvm.stackEntry*`` object (inside tuples)."""
    kind = e.get("@type")
    if kind == "tvm.stackEntryNumber":
        return int(e["number"]["number"])
    if kind == "tvm.stackEntryCell":
        return Cell.one_from_boc(base64.b64decode(e["cell"]["bytes"]))
    if kind == "tvm.stackEntrySlice":
        return Cell.one_from_boc(base64.b64decode(e["slice"]["bytes"]))
    if kind == "tvm.stackEntryTuple":
        return [_entry(x) for x in e["tuple"]["elements"]]
    return None


@dataclass(frozen=True)
class ChannelOnChain:
    """What ``get_channel_data`` says about a deployed payment channel."""

    state: int  # 0 uninitialised/closed, 1 open, 2 quarantine, ...
    balance_a: int
    balance_b: int
    key_a: bytes
    key_b: bytes
    channel_id: int
    quarantine_s: int
    misbehavior_fine: int
    seqno_a: int
    seqno_b: int
    addr_a: str
    addr_b: str
    conditional_close_s: int = 0
    quarantine: Quarantine | None = None

    def view(self, now: int) -> ChainView:
        """What the settlement policy needs to know, at chain time ``now``."""
        return ChainView(self.state, now, self.quarantine_s, self.conditional_close_s, self.quarantine)


def _quarantine(cell: Any) -> Quarantine | None:
    """QuarantinedState: A's and B's bodies (seqno, sent, conditionals), start, who committed."""
    if not isinstance(cell, Cell):
        return None
    s = cell.begin_parse()
    seqno_a, sent_a = s.load_uint(64), s.load_coins()
    s.load_maybe_ref()
    seqno_b, sent_b = s.load_uint(64), s.load_coins()
    s.load_maybe_ref()
    started, by_a = s.load_uint(32), bool(s.load_bit())
    challenged = bool(s.load_bit()) if s.remaining_bits else False
    return Quarantine(seqno_a, sent_a or 0, seqno_b, sent_b or 0, started, by_a, challenged)


def read_channel(chain: TonCenter, address: str) -> ChannelOnChain:
    """Read a channel's state and terms from the chain (a worker checks a client's channel so)."""
    r = chain.run_get_method(address, "get_channel_data")
    try:
        payment = r[7]
        addr_a = payment[1].begin_parse().load_address().to_str(is_user_friendly=False)
        addr_b = payment[2].begin_parse().load_address().to_str(is_user_friendly=False)
        return ChannelOnChain(
            state=r[0],
            balance_a=r[1][0],
            balance_b=r[1][1],
            key_a=r[2][0].to_bytes(32, "big"),
            key_b=r[2][1].to_bytes(32, "big"),
            channel_id=r[3],
            quarantine_s=r[4][0],
            misbehavior_fine=r[4][1],
            seqno_a=r[5][0],
            seqno_b=r[5][1],
            addr_a=addr_a,
            addr_b=addr_b,
            conditional_close_s=r[4][2],
            quarantine=_quarantine(r[6]),
        )
    except (IndexError, TypeError, AttributeError, ValueError) as exc:
        raise ChainError(f"{address}: get_channel_data is not a payment channel's ({exc})") from exc


def state_init(code: Cell, data: Cell) -> Cell:
    """StateInit with code and data only (no split depth, special or libraries)."""
    return begin_cell().store_uint(0b00110, 5).store_ref(code).store_ref(data).end_cell()


def address_of(init: Cell, workchain: int = 0) -> str:
    """The raw address a contract with this StateInit is deployed at."""
    return f"{workchain}:{init.hash.hex()}"


@dataclass
class Wallet:
    """A v4r2 wallet (tonsdk): deploys itself, sends transfers with bodies and StateInits."""

    contract: Any
    secret_key: bytes
    confirm_timeout_s: float = 60.0  # a transfer waits this long to be on chain
    # One transfer at a time, each sent after the last one is on chain: the wallet takes
    # each seqno once, and two transfers signed with the same one lose one of them
    # (two channels opened at once did: exit code 33, "wrong seqno").
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def create(cls) -> Wallet:
        from tonsdk.contract.wallet import Wallets, WalletVersionEnum

        _mnemonics, _pub, priv, contract = Wallets.create(WalletVersionEnum.v4r2, workchain=0)
        return cls(contract, priv)

    @classmethod
    def load_or_create(cls, path: Path) -> Wallet:
        """The wallet whose mnemonic is stored at ``path`` (mode 0600), created on first use.

        Like a node key, a file readable by others is refused (KeyFileExposed), and a
        damaged one is a StateFileDamaged naming it: never replaced by a fresh wallet,
        which would leave the old one's funds reachable only through its mnemonic."""
        from tonsdk.contract.wallet import Wallets, WalletVersionEnum

        if path.is_file():
            refuse_if_exposed(path)
            stored = read_json(path, advice=WALLET_ADVICE)
            words = stored.get("mnemonic") if isinstance(stored, dict) else None
            if not isinstance(words, list) or len(words) != 24 or not all(isinstance(w, str) for w in words):
                raise StateFileDamaged(path, "no mnemonic of 24 words in it", WALLET_ADVICE)
            try:
                _m, _pub, priv, contract = Wallets.from_mnemonics(words, WalletVersionEnum.v4r2, 0)
            except Exception as exc:  # tonsdk's InvalidMnemonicsError, and whatever bad words raise
                raise StateFileDamaged(path, "its mnemonic is not a valid TON mnemonic", WALLET_ADVICE) from exc
            return cls(contract, priv)
        if path.exists() or path.is_symlink():  # a folder, a dangling link: not ours to replace
            raise StateFileDamaged(path, "not a regular file", WALLET_ADVICE)
        words, _pub, priv, contract = Wallets.create(WalletVersionEnum.v4r2, workchain=0)
        write_atomic(path, json.dumps({"mnemonic": words, "version": "v4r2"}).encode(), mode=0o600)
        return cls(contract, priv)

    def ensure_deployed(self, chain: TonCenter) -> None:
        if chain.state(self.address) != "active":
            self.deploy(chain)

    @property
    def address(self) -> str:
        return str(self.contract.address.to_string(False, False, False))

    def seqno(self, chain: TonCenter) -> int:
        if chain.state(self.address) != "active":
            return 0
        return int(chain.run_get_method(self.address, "seqno")[0])

    def deploy(self, chain: TonCenter) -> None:
        with self._lock:
            chain.send_boc(bytes(self.contract.create_init_external_message()["message"].to_boc(False)))
            wait_until(lambda: chain.state(self.address) == "active", **self._polling(chain))

    def transfer(
        self, chain: TonCenter, to: str, amount: int, *, body: Cell | None = None, init: Cell | None = None
    ) -> None:
        """Send ``amount`` nanoton to ``to`` with an optional body and StateInit (deploys a contract)."""
        from tonsdk.boc import Cell as TonsdkCell

        def convert(cell: Cell | None) -> Any:
            return TonsdkCell.one_from_boc(bytes(cell.to_boc())) if cell is not None else None

        with self._lock:
            self._expire_by_chain_clock(chain)
            seqno = self.seqno(chain)
            msg = self.contract.create_transfer_message(
                to, amount, seqno, payload=convert(body), state_init=convert(init)
            )
            chain.send_boc(bytes(msg["message"].to_boc(False)))
            wait_until(lambda: self.seqno(chain) > seqno, **self._polling(chain))

    def _polling(self, chain: TonCenter) -> dict[str, float]:
        return {"timeout_s": self.confirm_timeout_s, "poll_s": chain.confirm_poll_s}

    def _expire_by_chain_clock(self, chain: TonCenter) -> None:
        """tonsdk stamps wallet messages "valid until now + 60 s" by this machine's clock;
        the local chain's clock can be moved ahead (quarantine tests), so use the chain's."""
        from tonsdk.boc import Cell as TonsdkCell

        now = chain.now()
        contract = self.contract

        def signing_message(seqno: int | None = None, without_op: bool = False) -> Any:
            message = TonsdkCell()  # wallet v4r2: wallet_id, valid_until, seqno, op
            message.bits.write_uint(contract.options["wallet_id"], 32)
            if not seqno:
                message.bits.write_uint(0xFFFFFFFF, 32)
            else:
                message.bits.write_uint(now + 60, 32)
            message.bits.write_uint(seqno or 0, 32)
            if not without_op:
                message.bits.write_uint(0, 8)
            return message

        contract.create_signing_message = signing_message


def wait_until(check: Any, *, timeout_s: float = 10.0, poll_s: float = 0.2) -> None:
    """Poll ``check()`` until true (a real chain confirms asynchronously; the local one at once).
    A ChainError while polling counts as "not yet": toncenter limits requests per second."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except ChainError:
            pass
        if time.monotonic() > deadline:
            raise ChainError("timed out waiting for the chain")
        time.sleep(poll_s)
