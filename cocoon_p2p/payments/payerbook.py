"""What a client writes down about its channels: ``payer.json`` (sans-IO codec).

One record per channel not yet closed: the worker it pays, the contract's
address, channel id and deposit, the worker's signed opening state (needed, with
our newest voucher, to close uncooperatively) and the channel's
:class:`~.channelstate.Lifecycle`. The file is rewritten atomically at each state
change, before the client acts on it; the vouchers themselves are in the
write-ahead log ``issued.log``.

Layout (readable by tools written for the first version, which had no states):

    {"open":    {worker hex: {address, channel_id, deposit, b_state, state, ending}},
     "closing": {address:    {worker, channel_id, deposit, b_state, state, ending}}}

"open" holds each worker's current channel (OPENING or OPEN), "closing" the
channels being closed. A first-version record has no state: one under "open" is
OPEN, and one under "closing" (then just the channel id in hex) is
CLOSING_COOPERATIVE until the chain shows a quarantine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core.errors import MalformedMessage

from .channelstate import CLOSING, ChannelState, Lifecycle
from .vouchers import SignedSemiChannel

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

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "worker": self.worker.hex() if self.worker is not None else "",
            "channel_id": f"{self.channel_id:x}",
            "deposit": self.deposit,
            "b_state": self.b_state.to_record().hex() if self.b_state else "",
            **self.life.to_json(),
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
        out = [_record(d, worker=bytes.fromhex(w), default=ChannelState.OPEN) for w, d in data["open"].items()]
        for address, d in data["closing"].items():
            if isinstance(d, str):  # first version: address -> channel id
                d = {"address": address, "channel_id": d, "deposit": 0, "b_state": ""}
            worker = bytes.fromhex(d["worker"]) if d.get("worker") else None
            out.append(_record(d, worker=worker, default=ChannelState.CLOSING_COOPERATIVE))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MalformedMessage(f"payer.json: not a channel book ({exc!r})") from exc
    return out


def _record(d: dict[str, Any], *, worker: bytes | None, default: ChannelState) -> ChannelRecord:
    opening = SignedSemiChannel.from_record(bytes.fromhex(d["b_state"])) if d["b_state"] else None
    return ChannelRecord(
        worker=worker,
        address=d["address"],
        channel_id=int(d["channel_id"], 16),
        deposit=int(d["deposit"]),
        b_state=opening,
        life=Lifecycle.from_json(d, default=default),
    )
