"""A worker's durable record of its payment channels: vouchers survive a kill -9.

Per channel, a folder under the data directory holds ``channel.json`` (the terms:
channel id, payer key, deposits, fine; written atomically with fsync) and a
``vouchers.log`` (:class:`~.voucherlog.VoucherLog`). :meth:`ChannelStore.accept`
checks a batch of vouchers against the channel's rules, makes them durable with
one fsync, and only then counts them: what it returns may be acknowledged.
On restart every channel is rebuilt from its folder, each logged voucher
re-verified, so keys, channel states and earnings come back intact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import VerifyKey

from cocoon_p2p.core.durable import write_atomic
from cocoon_p2p.core.errors import ProtocolError

from .voucherlog import VoucherLog
from .vouchers import SignedSemiChannel, VoucherBook


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
        self.closed = (folder / "closed").is_file()  # settled on chain: nothing left to watch
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

    def open(self, terms: ChannelTerms) -> None:
        """Start tracking a channel (idempotent for the same terms)."""
        known = self.channels.get(terms.channel_id)
        if known is not None:
            if known.terms != terms:
                raise ValueError(f"channel {terms.channel_id:x} is already open with other terms")
            return
        folder = self.root / f"{terms.channel_id:032x}"
        folder.mkdir(exist_ok=True, mode=0o700)
        write_atomic(folder / "channel.json", terms.to_json().encode())
        self.channels[terms.channel_id] = _Channel(folder, terms)

    def accept(self, channel_id: int, vouchers: list[tuple[SignedSemiChannel, int]]) -> Accepted:
        """Check (voucher, amount due) pairs in order, make the good ones durable, count them.

        A refused voucher does not stop the ones after it; each is checked against
        the state the accepted ones before it left.
        """
        ch = self.channels[channel_id]
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
        return self.channels[channel_id].book.received

    def newest(self, channel_id: int) -> SignedSemiChannel | None:
        """The voucher to close with."""
        return self.channels[channel_id].book.best

    def mark_closed(self, channel_id: int, how: str) -> None:
        """Record durably that the channel is closed on chain (``how``: a note for operators)."""
        ch = self.channels[channel_id]
        write_atomic(ch.folder / "closed", how.encode())
        ch.closed = True

    def unsettled(self) -> list[int]:
        """Channels not yet closed on chain."""
        return [cid for cid, ch in self.channels.items() if not ch.closed]

    def close(self) -> None:
        for ch in self.channels.values():
            ch.log.close()
