"""A worker's durable record of its payment channels: vouchers survive a kill -9.

Per channel, a folder under the data directory holds ``channel.json`` (the terms:
channel id, payer key, deposits, fine; written atomically with fsync), a
``vouchers.log`` (:class:`~.voucherlog.VoucherLog`), ``state.json`` (its
:class:`~.channelstate.Lifecycle`) and ``billed.json`` (what the jobs on it cost).
:meth:`ChannelStore.accept` checks a batch of vouchers against the channel's
rules, makes them durable with one fsync, and only then counts them: what it
returns may be acknowledged. :meth:`ChannelStore.advance` writes a channel's
next lifecycle state before the caller acts on it.

What jobs cost is group-committed: :meth:`ChannelStore.bill` counts in memory,
and :meth:`ChannelStore.write_bills` writes every channel billed since the last
write (the payee does so as bills come, off the event loop). A kill -9 loses
the bills since the last write, in the client's favour: it may owe that much
more than its credit limit before it is refused; never is a job charged twice,
and money itself is in the vouchers, durable before they are acknowledged.

On restart every channel is rebuilt from its folder, each logged voucher
re-verified, so keys, channel states, earnings and what clients owe come back
intact. A damaged file is a :class:`~cocoon_p2p.core.durable.StateFileDamaged`
naming it, never a silent fresh start. A folder written before states were
recorded has no ``state.json``: its state is derived as it used to be (a
``closed`` marker: CLOSED, else OPEN); one written before bills were recorded
has no ``billed.json``: nothing billed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import VerifyKey

from cocoon_p2p.core.durable import StateFileDamaged, read_json, write_atomic
from cocoon_p2p.core.errors import ProtocolError

from .channelstate import UNSETTLED, ChannelEvent, ChannelState, Lifecycle
from .errors import ChannelConflict, UnknownChannel
from .voucherlog import OpenedReadOnly, VoucherLog
from .vouchers import SignedSemiChannel, VoucherBook

STATE_FILE = "state.json"
BILLED_FILE = "billed.json"
LEGACY_CLOSED_MARKER = "closed"  # how a settled channel was marked before states were recorded


@dataclass(frozen=True)
class ChannelTerms:
    """What a channel is, as deployed: who pays whom, from what deposit, under which fine."""

    channel_id: int
    payer_key: bytes  # A's Ed25519 public key
    deposit_a: int
    deposit_b: int = 0
    fine: int = 0
    address: str = ""  # the contract, to watch and close it

    def to_json(self) -> str:
        return json.dumps(
            {
                "channel_id": f"{self.channel_id:x}",
                "payer_key": self.payer_key.hex(),
                "deposit_a": self.deposit_a,
                "deposit_b": self.deposit_b,
                "fine": self.fine,
                "address": self.address,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ChannelTerms:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: Any) -> ChannelTerms:
        """The terms in a parsed ``channel.json``; ValueError, KeyError or TypeError if they are not."""
        amounts = (d["deposit_a"], d["deposit_b"], d["fine"])
        if not all(isinstance(x, int) and x >= 0 for x in amounts) or not isinstance(d.get("address", ""), str):
            raise ValueError("deposits, fine or address of the wrong type")
        return cls(int(d["channel_id"], 16), bytes.fromhex(d["payer_key"]), *amounts, d.get("address", ""))


@dataclass
class Accepted:
    """The vouchers of one :meth:`ChannelStore.accept` call that are now durable."""

    vouchers: list[SignedSemiChannel]
    added_nanoton: int
    refused: list[tuple[SignedSemiChannel, ProtocolError]]


class _Channel:
    def __init__(self, folder: Path, terms: ChannelTerms, *, read_only: bool = False) -> None:
        self.folder = folder
        self.terms = terms
        self.life = self._load_life(folder)
        self.billed = self._load_billed(folder / BILLED_FILE)  # what the jobs on it cost, in all
        self.book = VoucherBook(
            channel_id=terms.channel_id,
            payer_key=VerifyKey(terms.payer_key),
            deposit_a=terms.deposit_a,
            deposit_b=terms.deposit_b,
            fine=terms.fine,
        )
        self.log = VoucherLog(folder / "vouchers.log", read_only=read_only)
        for i, record in enumerate(self.log.records):  # replay: each voucher re-checked, in order
            try:
                voucher = SignedSemiChannel.from_record(record)
                # Accepted once: a bound added since (the seqno step) must not refuse it now.
                self.book.check(voucher, max_seqno_step=None)
            except ProtocolError as exc:
                self.log.close()
                raise StateFileDamaged(self.log.path, f"voucher {i + 1} does not check: {exc}") from exc
            self.book.commit(voucher)

    @staticmethod
    def _load_life(folder: Path) -> Lifecycle:
        path = folder / STATE_FILE
        if path.is_file():
            try:
                return Lifecycle.from_json(read_json(path), default=ChannelState.OPEN)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StateFileDamaged(path, f"not a channel state: {exc!r}") from exc
        legacy = ChannelState.CLOSED if (folder / LEGACY_CLOSED_MARKER).is_file() else ChannelState.OPEN
        return Lifecycle.from_json({}, default=legacy)

    @staticmethod
    def _load_billed(path: Path) -> int:
        if not path.is_file():
            return 0
        data = read_json(path)
        billed = data.get("billed_nanoton") if isinstance(data, dict) else None
        if not isinstance(billed, int) or billed < 0:
            raise StateFileDamaged(path, "no billed_nanoton count in it")
        return billed

    def save_life(self, life: Lifecycle) -> None:
        write_atomic(self.folder / STATE_FILE, json.dumps(life.to_json()).encode())
        self.life = life

    @property
    def state(self) -> ChannelState:
        return self.life.state

    @property
    def closed(self) -> bool:
        """Settled on chain: nothing left to watch."""
        return self.life.state is ChannelState.CLOSED


class ChannelStore:
    """All channels of one worker, under ``root`` (created 0700).

    ``read_only``: look without writing anything (``cocoon-node status`` beside a
    running node); a torn voucher log is then reported in ``warnings``, not cut.
    """

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.root = root
        self.read_only = read_only
        if not read_only:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.channels: dict[int, _Channel] = {}
        self._unwritten_bills: set[int] = set()  # channels billed since the last write_bills
        try:
            for folder in sorted(root.iterdir()):
                terms_file = folder / "channel.json"
                if terms_file.is_file():
                    terms = _read_terms(terms_file)
                    self.channels[terms.channel_id] = _Channel(folder, terms, read_only=read_only)
        except BaseException:
            self.close()
            raise

    @property
    def warnings(self) -> list[str]:
        """What was wrong but survivable at load: torn voucher logs."""
        return [
            ch.log.torn.describe(ch.log.path, len(ch.log.records))
            for ch in self.channels.values()
            if ch.log.torn is not None
        ]

    def open(self, terms: ChannelTerms) -> ChannelState:
        """Start tracking a channel the chain shows open, in state OPEN; returns its state
        (idempotent for the same terms: a known channel keeps the state it has).
        Raises ChannelConflict when the id is held with other terms."""
        self._writable()
        known = self.channels.get(terms.channel_id)
        if known is not None:
            if known.terms != terms:
                raise ChannelConflict(f"channel {terms.channel_id:x} is already held with other terms")
            return known.state
        folder = self.root / f"{terms.channel_id:032x}"
        folder.mkdir(exist_ok=True, mode=0o700)
        write_atomic(folder / "channel.json", terms.to_json().encode())
        channel = _Channel(folder, terms)
        channel.save_life(Lifecycle(ChannelState.OPEN))
        self.channels[terms.channel_id] = channel
        return channel.state

    def _writable(self) -> None:
        if self.read_only:
            raise OpenedReadOnly(f"the channel store {self.root} was opened read-only")

    def _get(self, channel_id: int) -> _Channel:
        ch = self.channels.get(channel_id)
        if ch is None:
            raise UnknownChannel(f"no channel {channel_id:x} in {self.root}")
        return ch

    def state(self, channel_id: int) -> ChannelState:
        """Where the channel is in its life (UnknownChannel if it is not held)."""
        return self._get(channel_id).state

    def lifecycle(self, channel_id: int) -> Lifecycle:
        """The channel's state and how it is ending."""
        return self._get(channel_id).life

    def advance(self, channel_id: int, event: ChannelEvent) -> Lifecycle:
        """Apply ``event`` and make the new state durable, before the caller acts on it.
        ForbiddenTransition (nothing written) if the channel's state does not allow it."""
        self._writable()
        ch = self._get(channel_id)
        life = ch.life.apply(event)
        ch.save_life(life)
        return life

    def accept(self, channel_id: int, vouchers: list[tuple[SignedSemiChannel, int]]) -> Accepted:
        """Check (voucher, amount due) pairs in order, make the good ones durable, count them.

        A refused voucher does not stop the ones after it; each is checked against
        the state the accepted ones before it left.
        """
        ch = self._get(channel_id)
        best, good, refused, added = ch.book.best, [], [], 0
        for voucher, due in vouchers:
            try:
                added += ch.book.check(voucher, expect_at_least=due)
            except ProtocolError as exc:
                refused.append((voucher, exc))
                continue
            ch.book.commit(voucher)  # provisional: the next check builds on it
            good.append(voucher)
        try:
            ch.log.append([v.to_record() for v in good])  # durable; only now acknowledged
        except BaseException:
            ch.book.best = best  # nothing of this batch counts
            raise
        return Accepted(good, added, refused)

    def bill(self, channel_id: int, cost: int) -> None:
        """Count ``cost`` nanoton of jobs against the channel, in memory: :meth:`write_bills`
        makes it durable (UnknownChannel if the channel is not held)."""
        self._get(channel_id).billed += cost
        self._unwritten_bills.add(channel_id)

    def billed(self, channel_id: int) -> int:
        """What the jobs on this channel cost, in all."""
        return self._get(channel_id).billed

    def take_unwritten_bills(self) -> dict[int, int]:
        """The channels billed since the last take, with their totals (to :meth:`write_bills`)."""
        taken = {cid: self.channels[cid].billed for cid in self._unwritten_bills}
        self._unwritten_bills.clear()
        return taken

    def requeue_bills(self, bills: dict[int, int]) -> None:
        """Bills whose write failed or was cancelled: written with the next batch."""
        self._unwritten_bills.update(bills)

    def write_bills(self, bills: dict[int, int]) -> None:
        """Write these channels' billed totals durably (blocking; safe in a worker thread, as it
        touches only the given channels' files). One batch at a time: the payee's flusher
        writes a batch before it takes the next, so a newer total is never overwritten."""
        self._writable()
        for cid, billed in bills.items():
            folder = self.channels[cid].folder
            write_atomic(folder / BILLED_FILE, json.dumps({"billed_nanoton": billed}).encode())

    def flush_bills(self) -> None:
        """Write every unwritten bill now (blocking), e.g. before the store is closed."""
        bills = self.take_unwritten_bills()
        try:
            self.write_bills(bills)
        except BaseException:
            self.requeue_bills(bills)
            raise

    def earned(self, channel_id: int) -> int:
        """Nanoton the payer has sent us in this channel, by its newest durable voucher."""
        return self._get(channel_id).book.received

    def newest(self, channel_id: int) -> SignedSemiChannel | None:
        """The voucher to close with."""
        return self._get(channel_id).book.best

    def unsettled(self) -> list[int]:
        """Channels not yet closed on chain (open or closing)."""
        return [cid for cid, ch in self.channels.items() if ch.state in UNSETTLED]

    def count_by_state(self) -> Counter[ChannelState]:
        """How many channels are in each state (for metrics)."""
        return Counter(ch.state for ch in self.channels.values())

    def close(self) -> None:
        """Close the voucher logs' files (the store is unusable after). Bills not yet written
        are not written here: :meth:`flush_bills` first to keep them."""
        for ch in self.channels.values():
            ch.log.close()


def _read_terms(path: Path) -> ChannelTerms:
    try:
        return ChannelTerms.from_dict(read_json(path))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateFileDamaged(path, f"not a channel's terms: {exc!r}") from exc
