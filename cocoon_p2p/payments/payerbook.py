"""What a client writes down about its channels: ``payer.json`` (its codec, and reading it back).

One record per channel not yet closed: the worker it pays, the contract's
address, channel id and deposit, the worker's signed opening state (needed, with
our newest voucher, to close uncooperatively) and the channel's
:class:`~.channelstate.Lifecycle`. The file is rewritten atomically at each state
change, before the client acts on it; the vouchers themselves are in the
write-ahead log ``issued.log``.

Layout (readable by tools written for the first version, which had no states):

    {"open":    {worker hex: {address, channel_id, deposit, b_state, state, ending, since}},
     "closing": {address:    {worker, channel_id, deposit, b_state, state, ending, since}}}

``since`` is when the deposit was handed to the chain (unix seconds; 0: not yet, or a
record written before it existed): an OPENING channel is not given up while its
deposit may still land.

"open" holds each worker's current channel (OPENING or OPEN), "closing" the
channels being closed. A first-version record has no state: one under "open" is
OPEN, and one under "closing" (then just the channel id in hex) is
CLOSING_COOPERATIVE until the chain shows a quarantine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cocoon_p2p.core.durable import StateFileDamaged, read_json
from cocoon_p2p.core.errors import MalformedMessage

from .channelstate import CLOSING, ChannelState, Lifecycle
from .voucherlog import VoucherLog
from .vouchers import SignedSemiChannel

log = logging.getLogger(__name__)

CURRENT = frozenset({ChannelState.OPENING, ChannelState.OPEN})  # a worker's current channel


@dataclass(frozen=True)
class ChannelRecord:
    """One channel as the client writes it down."""

    worker: bytes | None  # None: a first-version closing record, which did not name it
    address: str
    channel_id: int
    deposit: int
    b_state: SignedSemiChannel | None
    life: Lifecycle
    since: int = 0  # unix seconds when the deposit was handed to the chain (0: not yet)

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "worker": self.worker.hex() if self.worker is not None else "",
            "channel_id": f"{self.channel_id:x}",
            "deposit": self.deposit,
            "b_state": self.b_state.to_record().hex() if self.b_state else "",
            **self.life.to_json(),
            "since": self.since,
        }


def encode_book(records: Iterable[ChannelRecord]) -> bytes:
    """``payer.json``'s bytes for ``records`` (closed channels are left out: nothing to watch)."""
    data: dict[str, dict[str, Any]] = {"open": {}, "closing": {}}
    for r in records:
        if r.life.state in CURRENT and r.worker is not None:
            data["open"][r.worker.hex()] = r.to_json()
        elif r.life.state in CLOSING:
            data["closing"][r.address] = r.to_json()
    return json.dumps(data).encode()


def decode_book(text: str) -> list[ChannelRecord]:
    """The records in ``payer.json`` (either version). MalformedMessage if it is not one."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise MalformedMessage(f"payer.json: not JSON ({exc!r})") from exc
    return book_from_json(data)


def book_from_json(data: Any) -> list[ChannelRecord]:
    """The records in a parsed ``payer.json``. MalformedMessage if it is not a channel book."""
    try:
        out = [_record(d, worker=bytes.fromhex(w), default=ChannelState.OPEN) for w, d in data["open"].items()]
        for address, d in data["closing"].items():
            if isinstance(d, str):  # first version: address -> channel id
                d = {"address": address, "channel_id": d, "deposit": 0, "b_state": ""}
            worker = bytes.fromhex(d["worker"]) if d.get("worker") else None
            out.append(_record(d, worker=worker, default=ChannelState.CLOSING_COOPERATIVE))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedMessage(f"payer.json: not a channel book ({exc!r})") from exc
    return out


def load_book(path: Path, issued: VoucherLog) -> tuple[list[ChannelRecord], list[SignedSemiChannel]]:
    """The records in ``payer.json`` at ``path`` and the vouchers logged in ``issued``.

    StateFileDamaged, never a fresh start, when the book is damaged, or missing
    while the log holds vouchers: the channels they pay into hold our deposits.
    A torn log (:attr:`VoucherLog.torn`) is survivable and reported: see
    :mod:`.voucherlog` for what its lost voucher can cost.
    """
    try:
        logged = [SignedSemiChannel.from_record(r) for r in issued.records]
    except MalformedMessage as exc:
        raise StateFileDamaged(issued.path, f"a voucher record does not decode: {exc}") from exc
    if issued.torn is not None:
        log.warning(
            "%s: the next voucher continues from the last complete one; if the torn one was sent, the worker "
            "refuses its seqno once as replayed and our payments come up short by its amount",
            issued.path,
        )
    if not path.is_file():
        if logged:
            raise StateFileDamaged(path, f"missing, while {issued.path.name} holds {len(logged)} signed voucher(s)")
        return [], logged
    try:
        return book_from_json(read_json(path)), logged
    except MalformedMessage as exc:
        raise StateFileDamaged(path, str(exc)) from exc


def _record(d: dict[str, Any], *, worker: bytes | None, default: ChannelState) -> ChannelRecord:
    opening = SignedSemiChannel.from_record(bytes.fromhex(d["b_state"])) if d["b_state"] else None
    return ChannelRecord(
        worker=worker,
        address=d["address"],
        channel_id=int(d["channel_id"], 16),
        deposit=int(d["deposit"]),
        b_state=opening,
        life=Lifecycle.from_json(d, default=default),
        since=int(d.get("since", 0)),
    )
