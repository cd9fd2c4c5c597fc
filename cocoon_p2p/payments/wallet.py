"""The node's TON wallet, which funds and drives channels: v4r2 (the default, and what every
existing data directory holds) or v5r1, its keys from a 24-word TON mnemonic.

Messages are built and signed offline with pytoniq (MIT): static builders on the same pytoniq-core
cells the rest of payments uses, with valid-until a parameter; they go out through our toncenter
client. tonutils' builders are methods of a wallet bound to its own client (they refresh its state
before signing), and it pulls in aiohttp.
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pytoniq.contract.contract import Contract
from pytoniq.contract.wallets.wallet import WALLET_V4_R2_CODE, WalletV4
from pytoniq.contract.wallets.wallet import Wallet as PytoniqWallet
from pytoniq.contract.wallets.wallet_v5 import WALLET_V5_R1_CODE, WalletV5R1, WalletV5WalletID
from pytoniq_core import Address, Cell, StateInit
from pytoniq_core.crypto.keys import mnemonic_is_valid, mnemonic_new, mnemonic_to_private_key
from pytoniq_core.crypto.keys import words as WORD_LIST

from cocoon_p2p.core.durable import StateFileDamaged, read_json, write_atomic
from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.identity import refuse_if_exposed

from .toncenter import ChainError, ChainTransaction, TonCenter, raw_address, wait_until

MNEMONIC_WORDS = 24
V4_WALLET_ID = 698983191  # v4r2's subwallet id for workchain 0, what every wallet app uses
MAINNET_GLOBAL_ID, TESTNET_GLOBAL_ID = -239, -3  # v5r1 ids mix the network in, as wallet apps do
VALID_FOR_S = 60  # a signed transfer expires this long after the chain's "now"
SEND_MODE = 3  # pay the fees apart from the value, ignore errors (the seqno is spent either way)
NEVER_EXPIRES = 0xFFFFFFFF  # what seqno 0 (the deploying message) carries as valid-until
_WORDS = frozenset(WORD_LIST)
_OFFLINE: Any = None  # the provider of pytoniq's contracts made here: they only sign, never go online

WALLET_ADVICE = (
    "It holds the wallet's mnemonic: restore it from your backup of the mnemonic. Do not delete it: "
    "a new, empty wallet would be made, and the old one's funds are reachable only through its mnemonic."
)


class TransferFailed(ChainError):
    """A transfer landed but did not do its work: the wallet sent nothing, or the destination failed."""


class InvalidMnemonic(CocoonError):
    """The words are not a TON wallet mnemonic (24 words of the list, with TON's checksum)."""


class WalletVersion(enum.Enum):
    """The wallet contract: its code, its data layout and how its messages are signed."""

    V4R2 = "v4r2"
    V5R1 = "v5r1"


@dataclass(frozen=True)
class WalletContract:
    """The wallet's contract as the chain knows it: code (from the version) and data (public
    key, wallet id) make its StateInit, whose hash is its address."""

    version: WalletVersion
    public_key: bytes
    wallet_id: int

    @staticmethod
    def default_wallet_id(version: WalletVersion, *, testnet: bool = False) -> int:
        """The id wallet apps derive for workchain 0 (v5r1's depends on the network)."""
        if version is WalletVersion.V4R2:
            return V4_WALLET_ID
        network = TESTNET_GLOBAL_ID if testnet else MAINNET_GLOBAL_ID
        return int(WalletV5WalletID(network_global_id=network, workchain=0).pack())

    @cached_property  # the value is frozen, and the address is asked for at every poll
    def state_init(self) -> Any:
        """The pytoniq-core StateInit a deploying message carries."""
        if self.version is WalletVersion.V4R2:
            data = WalletV4.create_data_cell(self.public_key, self.wallet_id, 0)
            return StateInit(code=WALLET_V4_R2_CODE, data=data)
        data = WalletV5R1.create_data_cell(self.public_key, 0, self.wallet_id)
        return StateInit(code=WALLET_V5_R1_CODE, data=data)

    @cached_property
    def address(self) -> str:
        """Raw form, ``0:<64 hex>``."""
        return f"0:{self.state_init.serialize().hash.hex()}"


def check_mnemonic(words: Sequence[str]) -> None:
    """InvalidMnemonic saying what is wrong, unless ``words`` are a TON wallet mnemonic."""
    if len(words) != MNEMONIC_WORDS:
        raise InvalidMnemonic(f"a TON mnemonic has {MNEMONIC_WORDS} words, not {len(words)}")
    unknown = [f"{i}: {w!r}" for i, w in enumerate(words, 1) if w not in _WORDS]
    if unknown:
        raise InvalidMnemonic(f"not in the mnemonic word list: {', '.join(unknown)}")
    if not mnemonic_is_valid(list(words)):  # TON's checksum: the seed's first byte is 0
        raise InvalidMnemonic("the words fail TON's mnemonic checksum (a word mistyped or missing?)")


@dataclass
class Wallet:
    """A v4r2 or v5r1 wallet: deploys itself, sends transfers with bodies and StateInits."""

    contract: WalletContract
    secret_key: bytes  # 64 bytes, NaCl's layout: the ed25519 seed, then the public key
    confirm_timeout_s: float = 60.0  # a transfer waits this long to be on chain
    # One transfer at a time, each sent after the last one is on chain: the wallet takes
    # each seqno once, and two transfers signed with the same one lose one of them
    # (two channels opened at once did: exit code 33, "wrong seqno").
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def create(cls, version: WalletVersion = WalletVersion.V4R2, *, testnet: bool = False) -> Wallet:
        """A fresh wallet from a new mnemonic, which is not kept (tests; a node uses :meth:`load_or_create`)."""
        return cls.from_mnemonic(mnemonic_new(MNEMONIC_WORDS), version, testnet=testnet)

    @classmethod
    def from_mnemonic(
        cls,
        words: Sequence[str],
        version: WalletVersion = WalletVersion.V4R2,
        *,
        wallet_id: int | None = None,
        testnet: bool = False,
    ) -> Wallet:
        """The wallet these words control (InvalidMnemonic if they are not a TON mnemonic);
        ``wallet_id`` defaults to what wallet apps derive (:meth:`WalletContract.default_wallet_id`)."""
        check_mnemonic(words)
        public, secret = mnemonic_to_private_key(list(words))
        if wallet_id is None:
            wallet_id = WalletContract.default_wallet_id(version, testnet=testnet)
        return cls(WalletContract(version, bytes(public), wallet_id), bytes(secret))

    @classmethod
    def load_or_create(
        cls, path: Path, *, version: WalletVersion = WalletVersion.V4R2, testnet: bool = False
    ) -> Wallet:
        """The wallet whose mnemonic is stored at ``path`` (mode 0600), created on first use.

        ``version`` and ``testnet`` apply to a wallet created here; a stored one keeps its own
        (``version`` and ``wallet_id`` in the file; files written before v5r1 existed hold v4r2).
        Like a node key, a file readable by others is refused (KeyFileExposed), and a
        damaged one is a StateFileDamaged naming it: never replaced by a fresh wallet,
        which would leave the old one's funds reachable only through its mnemonic."""
        if path.is_file():
            refuse_if_exposed(path)
            return cls._load(path)
        if path.exists() or path.is_symlink():  # a folder, a dangling link: not ours to replace
            raise StateFileDamaged(path, "not a regular file", WALLET_ADVICE)
        words = mnemonic_new(MNEMONIC_WORDS)
        wallet = cls.from_mnemonic(words, version, testnet=testnet)
        stored = {"mnemonic": words, "version": version.value, "wallet_id": wallet.contract.wallet_id}
        write_atomic(path, json.dumps(stored).encode(), mode=0o600)
        return wallet

    @classmethod
    def _load(cls, path: Path) -> Wallet:
        stored = read_json(path, advice=WALLET_ADVICE)
        if not isinstance(stored, dict):
            raise StateFileDamaged(path, "not a JSON object", WALLET_ADVICE)
        words = stored.get("mnemonic")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise StateFileDamaged(path, f"no mnemonic of {MNEMONIC_WORDS} words in it", WALLET_ADVICE)
        try:
            version = WalletVersion(stored.get("version", WalletVersion.V4R2.value))
        except ValueError:
            known = ", ".join(v.value for v in WalletVersion)
            problem = f"unknown wallet version {stored['version']!r} (known: {known})"
            raise StateFileDamaged(path, problem, WALLET_ADVICE) from None
        wallet_id = stored.get("wallet_id")
        if wallet_id is not None and (type(wallet_id) is not int or not 0 <= wallet_id < 1 << 32):
            raise StateFileDamaged(path, f"wallet_id {wallet_id!r} is not a 32-bit unsigned integer", WALLET_ADVICE)
        try:
            return cls.from_mnemonic(words, version, wallet_id=wallet_id)
        except InvalidMnemonic as exc:
            raise StateFileDamaged(path, f"its mnemonic is not a valid TON mnemonic: {exc}", WALLET_ADVICE) from exc

    @property
    def version(self) -> WalletVersion:
        return self.contract.version

    @property
    def address(self) -> str:
        """Raw form, ``0:<64 hex>`` (:func:`.addresses.friendly` gives the form to show people)."""
        return self.contract.address

    def ensure_deployed(self, chain: TonCenter) -> None:
        if chain.state(self.address) != "active":
            self.deploy(chain)

    def seqno(self, chain: TonCenter) -> int:
        if chain.state(self.address) != "active":
            return 0
        return int(chain.run_get_method(self.address, "seqno")[0])

    def deploy(self, chain: TonCenter) -> None:
        with self._lock:
            chain.send_boc(self.deploy_message())
            wait_until(lambda: chain.state(self.address) == "active", **self._polling(chain))

    def deploy_message(self) -> bytes:
        """The signed external message (BOC) that deploys the wallet and sends nothing."""
        return self._external(0, NEVER_EXPIRES, [])

    def transfer_message(
        self,
        to: str,
        amount: int,
        seqno: int,
        *,
        bounce: bool,
        valid_until: int,
        body: Cell | None = None,
        init: Cell | None = None,
    ) -> bytes:
        """The signed external message (BOC) with which the wallet sends ``amount`` nanoton
        to ``to`` (any address form) with an optional body and StateInit cell; the wallet
        accepts it while its seqno is ``seqno`` and its chain's clock is before
        ``valid_until``. At seqno 0 it carries the wallet's StateInit too (deploys it)."""
        state_init = StateInit.deserialize(init.begin_parse()) if init is not None else None
        dest = Address(raw_address(to))
        order = PytoniqWallet.create_wallet_internal_message(
            destination=dest, send_mode=SEND_MODE, value=amount, body=body, state_init=state_init, bounce=bounce
        )
        return self._external(seqno, NEVER_EXPIRES if seqno == 0 else valid_until, [order])

    def _external(self, seqno: int, valid_until: int, orders: list[Any]) -> bytes:
        contract = self.contract
        if contract.version is WalletVersion.V4R2:
            signed = WalletV4.raw_create_transfer_msg(
                private_key=self.secret_key,
                seqno=seqno,
                wallet_id=contract.wallet_id,
                messages=orders,
                valid_until=valid_until,
            )
        else:  # pytoniq's v5 signer is an instance method, of a wallet made offline here
            v5 = WalletV5R1(provider=_OFFLINE, address=Address(contract.address), state_init=contract.state_init)
            signed = v5.raw_create_transfer_msg(self.secret_key, seqno, contract.wallet_id, orders, valid_until)
        init = contract.state_init if seqno == 0 else None
        message = Contract.create_external_msg(dest=Address(contract.address), state_init=init, body=signed)
        return bytes(message.serialize().to_boc())

    def transfer(
        self, chain: TonCenter, to: str, amount: int, *, body: Cell | None = None, init: Cell | None = None
    ) -> ChainTransaction:
        """Send ``amount`` nanoton to ``to`` with an optional body and StateInit (deploys a
        contract), and return the destination's transaction once it landed.

        On TON ``sendBoc`` only means "accepted" and the wallet sends with "ignore errors":
        success is read back from the chain, not assumed from the seqno. TransferFailed when
        the wallet's transaction sent nothing (underfunded) or the destination's code failed.
        A message to a live contract is bounceable (a failure sends the value back); a deploy,
        or value for an account without code yet (a new wallet), is not: there it must stay.

        The message expires :data:`VALID_FOR_S` after the *chain's* clock, not this
        machine's: the local chain's clock can be moved ahead (quarantine tests), and a
        message stamped by ours would then arrive expired."""
        live = init is None and chain.state(to) == "active"
        with self._lock:
            valid_until = chain.now() + VALID_FOR_S
            seqno = self.seqno(chain)
            since = self._newest_lt(chain)
            msg = self.transfer_message(to, amount, seqno, bounce=live, valid_until=valid_until, body=body, init=init)
            try:
                chain.send_boc(msg)
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

    def _landed(self, chain: TonCenter, account: str, match: Callable[[ChainTransaction], bool]) -> ChainTransaction:
        """The newest of ``account``'s recent transactions that ``match`` accepts, once one lands."""
        found: list[ChainTransaction] = []

        def check() -> bool:
            found[:] = [t for t in chain.transactions(account, limit=16) if match(t)]
            return bool(found)

        wait_until(check, **self._polling(chain))
        return found[-1]  # newest first: the earliest match is ours

    def _polling(self, chain: TonCenter) -> dict[str, float]:
        return {"timeout_s": self.confirm_timeout_s, "poll_s": chain.confirm_poll_s}
