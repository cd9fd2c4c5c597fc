"""Frames of the payment protocol ``/cocoon/pay/1`` (sans-IO codec).

One stream per client-worker pair, request then reply, in order:

    client: PayHello(channel id?)     worker: PayInfo(wallet address, B's opening state?)
    client: ChannelOpened(address)    worker: ChannelReady(channel id, deposit) | PayError
    client: PayVoucher(record)        worker: PaidUpTo(total received)       | PayError
    client: CloseRequest(terms, sig A) worker: CloseSigned(sig B)             | PayError

and, on a stream the worker opens when it wants its earnings settled:

    worker: CloseProposal(terms, sig B) client: CloseAgreed(sig A)            | PayError

Which frame may follow which is :mod:`.connection`'s business; this module only
encodes and decodes. A PayError's code is a short string on the wire (at most
32 bytes); the codes this implementation sends are :class:`PayErrorCode`.

PayInfo (when PayHello names the channel the client is about to fund) and
ChannelReady carry B's signed opening state, which the client needs (with its own
newest voucher) to close uncooperatively if the worker disappears: asked before the
deposit leaves, it lets a client get its deposit back from a channel the worker
never confirms. Both fields are optional on the wire (older peers send neither).

The channel's keys are the peers' own libp2p identities (A = the client's PeerId
key, B = the worker's), so a worker knows who signs its vouchers without any
other trust: it checks the deployed channel against the stream's remote PeerId.
Frames are a 4-byte length and a msgpack array, like the job protocol's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core import framing
from cocoon_p2p.core.errors import MalformedMessage
from cocoon_p2p.core.framing import FrameBuffer, NeedData
from cocoon_p2p.core.wire import expect_bytes, expect_int, expect_list, expect_str, pack, unpack

MAX_PAY_FRAME = 4096
_HELLO, _INFO, _OPENED, _READY, _VOUCHER, _PAID, _ERROR, _CLOSE, _SIGNED, _PROPOSE, _AGREED = range(1, 12)


@dataclass(frozen=True)
class PayHello:
    channel_id: int | None = None  # the channel about to be funded: sign its opening state

    def to_wire(self) -> list[Any]:
        return [_HELLO] if self.channel_id is None else [_HELLO, self.channel_id.to_bytes(16, "big")]


@dataclass(frozen=True)
class PayInfo:
    wallet: str  # the worker's wallet: where the channel pays B
    b_state: bytes = b""  # B's signed opening state for the channel PayHello named, if it named one

    def to_wire(self) -> list[Any]:
        return [_INFO, self.wallet, self.b_state] if self.b_state else [_INFO, self.wallet]


@dataclass(frozen=True)
class ChannelOpened:
    address: str  # the deployed, initialised channel contract

    def to_wire(self) -> list[Any]:
        return [_OPENED, self.address]


@dataclass(frozen=True)
class ChannelReady:
    channel_id: int
    deposit_a: int
    b_state: bytes  # SignedSemiChannel.to_record() of B's opening state (seqno 0, nothing sent)

    def to_wire(self) -> list[Any]:
        return [_READY, self.channel_id.to_bytes(16, "big"), self.deposit_a, self.b_state]


@dataclass(frozen=True)
class PayVoucher:
    record: bytes  # SignedSemiChannel.to_record()

    def to_wire(self) -> list[Any]:
        return [_VOUCHER, self.record]


@dataclass(frozen=True)
class PaidUpTo:
    received: int  # all the worker holds durably from this channel

    def to_wire(self) -> list[Any]:
        return [_PAID, self.received]


class PayErrorCode(enum.StrEnum):
    """The codes a PayError carries here (a peer may send others: the wire takes any short string)."""

    CHANNEL = "channel"  # no usable channel with you, or the contract is not as required
    CLOSE = "close"  # the proposed close terms are not ours
    PROTOCOL = "protocol"  # a frame out of order (see :mod:`.connection`)
    BAD_SIGNATURE = "bad-signature"  # a close or voucher not signed by the channel's key
    REPLAYED = "replayed"  # a voucher not newer than the newest held
    MALFORMED = "malformed"  # a voucher record that does not parse
    CHANNEL_RULE = "channel-rule"  # a voucher the channel's rules forbid (over the deposit...)
    TOO_LARGE = "too-large"  # a frame over the size limit


@dataclass(frozen=True)
class PayError:
    code: str  # a PayErrorCode, or whatever short string a peer sent
    message: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", str(self.code))  # a plain str: enum members compare and pack alike

    def to_wire(self) -> list[Any]:
        return [_ERROR, self.code, self.message[:512]]


@dataclass(frozen=True)
class CloseRequest:
    """The client proposes the final split (a cooperative close) and signs it."""

    balance_a: int
    balance_b: int
    seqno_a: int
    seqno_b: int
    signature_a: bytes

    def to_wire(self) -> list[Any]:
        return [_CLOSE, self.balance_a, self.balance_b, self.seqno_a, self.seqno_b, self.signature_a]


@dataclass(frozen=True)
class CloseSigned:
    signature_b: bytes

    def to_wire(self) -> list[Any]:
        return [_SIGNED, self.signature_b]


@dataclass(frozen=True)
class CloseProposal:
    """The worker proposes the final split (a cooperative close) and signs it."""

    balance_a: int
    balance_b: int
    seqno_a: int
    seqno_b: int
    signature_b: bytes

    def to_wire(self) -> list[Any]:
        return [_PROPOSE, self.balance_a, self.balance_b, self.seqno_a, self.seqno_b, self.signature_b]


@dataclass(frozen=True)
class CloseAgreed:
    signature_a: bytes

    def to_wire(self) -> list[Any]:
        return [_AGREED, self.signature_a]


PayFrame = (
    PayHello
    | PayInfo
    | ChannelOpened
    | ChannelReady
    | PayVoucher
    | PaidUpTo
    | PayError
    | CloseRequest
    | CloseSigned
    | CloseProposal
    | CloseAgreed
)


def encode(frame: PayFrame) -> bytes:
    return framing.frame(pack(frame.to_wire()))


def decode(body: bytes) -> PayFrame:
    obj = unpack(body, max_size=MAX_PAY_FRAME, what="pay frame", canonical=False)
    if not isinstance(obj, list) or not obj:
        raise MalformedMessage("pay frame: expected a non-empty array")
    kind = obj[0]
    if kind == _HELLO:
        if len(obj) == 1:
            return PayHello()
        cid = expect_bytes(expect_list(obj, 2, "pay hello")[1], "channel id", min_len=16, max_len=16)
        return PayHello(int.from_bytes(cid, "big"))
    if kind == _INFO:
        fields = expect_list(obj, 3 if len(obj) == 3 else 2, "pay info")
        wallet = expect_str(fields[1], "wallet", max_len=100, min_len=3)
        return PayInfo(
            wallet, expect_bytes(fields[2], "B's state", min_len=104, max_len=127) if len(fields) == 3 else b""
        )
    if kind == _OPENED:
        return ChannelOpened(expect_str(expect_list(obj, 2, "channel opened")[1], "address", max_len=100, min_len=3))
    if kind == _READY:
        _, cid, deposit, b_state = expect_list(obj, 4, "channel ready")
        channel_id = int.from_bytes(expect_bytes(cid, "channel id", min_len=16, max_len=16), "big")
        state = expect_bytes(b_state, "B's state", min_len=104, max_len=127)
        return ChannelReady(channel_id, expect_int(deposit, "deposit"), state)
    if kind == _VOUCHER:
        return PayVoucher(expect_bytes(expect_list(obj, 2, "voucher")[1], "voucher", min_len=104, max_len=127))
    if kind == _PAID:
        return PaidUpTo(expect_int(expect_list(obj, 2, "paid up to")[1], "received"))
    if kind == _ERROR:
        _, code, message = expect_list(obj, 3, "pay error")
        return PayError(expect_str(code, "code", max_len=32, min_len=1), expect_str(message, "message", max_len=512))
    if kind in (_CLOSE, _PROPOSE):
        _, bal_a, bal_b, seq_a, seq_b, sig = expect_list(obj, 6, "close terms")
        return (CloseRequest if kind == _CLOSE else CloseProposal)(
            expect_int(bal_a, "balance A"),
            expect_int(bal_b, "balance B"),
            expect_int(seq_a, "seqno A"),
            expect_int(seq_b, "seqno B"),
            expect_bytes(sig, "signature", min_len=64, max_len=64),
        )
    if kind == _SIGNED:
        return CloseSigned(expect_bytes(expect_list(obj, 2, "close signed")[1], "signature", min_len=64, max_len=64))
    if kind == _AGREED:
        return CloseAgreed(expect_bytes(expect_list(obj, 2, "close agreed")[1], "signature", min_len=64, max_len=64))
    raise MalformedMessage(f"pay frame: unknown type {kind!r}")


class FrameReader:
    """Bytes in, pay frames out (length-prefixed, size-limited)."""

    def __init__(self) -> None:
        self._frames = FrameBuffer(MAX_PAY_FRAME, what="pay frame")

    def feed(self, data: bytes) -> None:
        self._frames.feed(data)

    def next(self) -> PayFrame | NeedData:
        body = self._frames.next_payload()
        return body if isinstance(body, NeedData) else decode(body)
