"""A worker's durable record of its payment channels: vouchers survive a kill -9.

Per channel, a folder under the data directory holds ``channel.json`` (the terms:
channel id, payer key, deposits, fine; written atomically with fsync), a
``vouchers.log`` (:class:`~.voucherlog.VoucherLog`) and ``state.json`` (its
:class:`~.channelstate.Lifecycle`). :meth:`ChannelStore.accept` checks a batch of
vouchers against the channel's rules, makes them durable with one fsync, and
only then counts them: what it returns may be acknowledged.
:meth:`ChannelStore.advance` writes a channel's next lifecycle state before the
caller acts on it.

On restart every channel is rebuilt from its folder, each logged voucher
re-verified, so keys, channel states and earnings come back intact. A folder
written before states were recorded has no ``state.json``: its state is derived
as it used to be (a ``closed`` marker: CLOSED, else OPEN).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import VerifyKey

from cocoon_p2p.core.durable import write_atomic
from cocoon_p2p.core.errors import ProtocolError

from .channelstate import UNSETTLED, ChannelEvent, ChannelState, Lifecycle
from .errors import ChannelConflict, UnknownChannel
from .voucherlog import VoucherLog
from .vouchers import SignedSemiChannel, VoucherBook

STATE_FILE = "state.json"
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
        d = json.loads(text)
        return cls(
            int(d["channel_id"], 16),
            bytes.fromhex(d["payer_key"]),
            d["deposit_a"],
            d["deposit_b"],
            d["fine"],
            d.get("address", ""),
        )


@dataclass
class Accepted:
    """The vouchers of one :meth:`ChannelStore.accept` call that are now durable."""

    vouchers: list[SignedSemiChannel]
    added_nanoton: int
    refused: list[tuple[SignedSemiChannel, ProtocolError]]


class _Channel:
    def __init__(self, folder: Path, terms: ChannelTerms) -> None:
        self.folder = folder
        self.terms = terms
        self.life = self._load_life(folder)
        self.book = VoucherBook(
            channel_id=terms.channel_id,
            payer_key=VerifyKey(terms.payer_key),
            deposit_a=terms.deposit_a,
            deposit_b=terms.deposit_b,
            fine=terms.fine,
        )
        self.log = VoucherLog(folder / "vouchers.log")
        for record in self.log.records:  # replay: each voucher re-checked, in order
            voucher = SignedSemiChannel.from_record(record)
            self.book.check(voucher)
            self.book.commit(voucher)

    @staticmethod
    def _load_life(folder: Path) -> Lifecycle:
        path = folder / STATE_FILE
        if path.is_file():
            return Lifecycle.from_json(json.loads(path.read_text()), default=ChannelState.OPEN)
        legacy = ChannelState.CLOSED if (folder / LEGACY_CLOSED_MARKER).is_file() else ChannelState.OPEN
        return Lifecycle.from_json({}, default=legacy)

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
    """All channels of one worker, under ``root`` (created 0700)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.channels: dict[int, _Channel] = {}
        for folder in sorted(root.iterdir()):
            terms_file = folder / "channel.json"
            if terms_file.is_file():
                terms = ChannelTerms.from_json(terms_file.read_text())
                self.channels[terms.channel_id] = _Channel(folder, terms)

    def open(self, terms: ChannelTerms) -> ChannelState:
        """Start tracking a channel the chain shows open, in state OPEN; returns its state
        (idempotent for the same terms: a known channel keeps the state it has).
        Raises ChannelConflict when the id is held with other terms."""
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
        """Close the voucher logs' files (the store is unusable after)."""
        for ch in self.channels.values():
            ch.log.close()
