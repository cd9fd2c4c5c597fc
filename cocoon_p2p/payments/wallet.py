"""A v4r2 wallet from ``tonsdk`` (keys and transfer messages), which funds and drives
channels; cells cross between tonsdk and pytoniq-core as BOC."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytoniq_core import Cell

from cocoon_p2p.core.durable import StateFileDamaged, read_json, write_atomic
from cocoon_p2p.core.identity import refuse_if_exposed

from .addresses import friendly
from .toncenter import ChainError, ChainTransaction, TonCenter, raw_address, wait_until


class TransferFailed(ChainError):
    """A transfer landed but did not do its work: the wallet sent nothing, or the destination failed."""


WALLET_ADVICE = (
    "It holds the wallet's mnemonic: restore it from your backup of the mnemonic. Do not delete it: "
    "a new, empty wallet would be made, and the old one's funds are reachable only through its mnemonic."
)


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
    ) -> ChainTransaction:
        """Send ``amount`` nanoton to ``to`` with an optional body and StateInit (deploys a
        contract), and return the destination's transaction once it landed.

        On TON ``sendBoc`` only means "accepted" and the wallet sends with "ignore errors":
        success is read back from the chain, not assumed from the seqno. TransferFailed when
        the wallet's transaction sent nothing (underfunded) or the destination's code failed.
        A message to a live contract is bounceable (a failure sends the value back); a deploy,
        or value for an account without code yet (a new wallet), is not: there it must stay."""
        from tonsdk.boc import Cell as TonsdkCell

        def convert(cell: Cell | None) -> Any:
            return TonsdkCell.one_from_boc(bytes(cell.to_boc())) if cell is not None else None

        live = init is None and chain.state(to) == "active"
        dest = friendly(to, testnet=False, bounceable=live)  # tonsdk reads the bounce flag from the form
        with self._lock:
            self._expire_by_chain_clock(chain)
            seqno = self.seqno(chain)
            since = self._newest_lt(chain)
            msg = self.contract.create_transfer_message(
                dest, amount, seqno, payload=convert(body), state_init=convert(init)
            )
            try:
                chain.send_boc(bytes(msg["message"].to_boc(False)))
            except ChainError:
                # A resend after a lost answer is refused once the first copy landed (its
                # seqno is spent): the seqno having moved means ours went through.
                if self.seqno(chain) <= seqno:
                    raise
            wait_until(lambda: self.seqno(chain) > seqno, **self._polling(chain))
            sent = self._landed(chain, self.address, lambda t: t.in_source == "" and t.lt > since)
            target = raw_address(to)
            if not sent.succeeded or all(d != target for d, _ in sent.out_messages):
                raise TransferFailed(
                    f"the wallet's transaction sent nothing to {to} (exit code {sent.exit_code}, "
                    f"aborted {sent.aborted}): is the wallet funded?"
                )
            mine = raw_address(self.address)
            landed = self._landed(chain, to, lambda t: t.in_source == mine and t.lt > sent.lt)
            if (live or init is not None) and not landed.succeeded:  # code ran, and failed
                back = "; its value bounced back" if live else ""
                raise TransferFailed(f"{to} refused our message (exit code {landed.exit_code}){back}")
            return landed

    def _newest_lt(self, chain: TonCenter) -> int:
        newest = chain.transactions(self.address, limit=1)
        return newest[0].lt if newest else 0

    def _landed(self, chain: TonCenter, account: str, match: Any) -> ChainTransaction:
        """The newest of ``account``'s recent transactions that ``match`` accepts, once one lands."""
        found: list[ChainTransaction] = []

        def check() -> bool:
            found[:] = [t for t in chain.transactions(account, limit=16) if match(t)]
            return bool(found)

        wait_until(check, **self._polling(chain))
        return found[-1]  # newest first: the earliest match is ours

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
