"""Off-chain payment-channel states of the official TON payment channel (sans-IO).

The layouts follow the contract (ton-blockchain/payment-channels, async-channel.func)
and tonweb's PaymentUtils.js, bit for bit:

    SemiChannelBody  = seqno:uint64 sent:Coins conditionals:(HashmapE 32 ConditionalPayment)
    SemiChannel      = tag:0x43685374 channel_id:uint128 body:SemiChannelBody
                       counterparty:(Maybe ^SemiChannelBody)
    SignedSemiChannel = signature:bits512 state:SemiChannel

A party signs the SHA-256 representation hash of its SemiChannel cell with the
Ed25519 key the channel was deployed with. ``sent`` is cumulative: each new state
of A says "A has sent B this much in all".

A *voucher* is what the client (A) hands the worker (B) after each job: its newest
signed SemiChannel. :class:`VoucherBook` is the worker's side: it accepts only
vouchers that are signed by A, name this channel, raise the seqno (by at most
:data:`MAX_SEQNO_STEP`), never lower ``sent``, stay within A's deposit, and keep
the contract able to finish an uncooperative close (see :func:`finish_is_possible`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from pytoniq_core import Builder, Cell, begin_cell

from cocoon_p2p.core.errors import (
    BadSignature,
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
    ReplayedMessage,
)

TAG_STATE = 0x43685374
MAX_COINS = (1 << 120) - 1  # Coins is VarUInteger 16: at most 15 bytes
# How far one voucher may move the seqno past the newest one held. The contract only
# asks that it grow, but it is a 64-bit counter: a validly signed 2^64-1 would leave no
# seqno for the next voucher, so every later one is "replayed" and jobs go unpaid. An
# honest client raises it by one per job; a gap is vouchers lost on the way (signed,
# never delivered), and no client signs 2^32 of those between two that arrive. At this
# step, freezing a channel takes 2^32 accepted vouchers.
MAX_SEQNO_STEP = 1 << 32


class ChannelRuleBroken(RemoteProtocolError):
    """A state the channel's rules forbid: over the deposit, or unfinishable on chain."""

    code = "channel-rule"


class _Bits:
    """A bit string as an int, for hashing leaf cells without building them."""

    __slots__ = ("value", "length")

    def __init__(self) -> None:
        self.value = 0
        self.length = 0

    def push(self, value: int, width: int) -> _Bits:
        self.value = (self.value << width) | value
        self.length += width
        return self

    def push_coins(self, amount: int) -> _Bits:
        size = (amount.bit_length() + 7) // 8
        return self.push(size, 4).push(amount, 8 * size)

    def cell_repr_hash(self, refs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
        """Representation hash of an ordinary cell with these bits and (depth, hash) refs."""
        n = self.length
        value, padded = self.value, n
        if n % 8:  # completion tag: a 1 bit, then zeros to the byte boundary
            pad = 8 - n % 8
            value = (value << pad) | (1 << (pad - 1))
            padded += pad
        d1 = len(refs)
        d2 = n // 8 + (n + 7) // 8
        data = bytes((d1, d2)) + value.to_bytes(padded // 8, "big")
        data += b"".join(depth.to_bytes(2, "big") for depth, _ in refs) + b"".join(h for _, h in refs)
        return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class SemiChannelBody:
    """One party's side: its state number and all it has sent the other, in nanoton."""

    seqno: int
    sent: int

    def __post_init__(self) -> None:
        if not 0 <= self.seqno < 1 << 64 or not 0 <= self.sent <= MAX_COINS:
            raise LocalProtocolError(f"seqno {self.seqno} or sent {self.sent} out of range")

    def store(self, b: Builder) -> Builder:
        # No conditional payments: an empty HashmapE is a single 0 bit.
        return b.store_uint(self.seqno, 64).store_coins(self.sent).store_bit(0)

    def cell(self) -> Cell:
        return self.store(begin_cell()).end_cell()

    def push(self, bits: _Bits) -> _Bits:
        return bits.push(self.seqno, 64).push_coins(self.sent).push(0, 1)


@dataclass(frozen=True, slots=True)
class SemiChannel:
    """A party's state in one channel, with what it last saw of the counterparty."""

    channel_id: int
    body: SemiChannelBody
    counterparty: SemiChannelBody | None = None

    def cell(self) -> Cell:
        b = begin_cell().store_uint(TAG_STATE, 32).store_uint(self.channel_id, 128)
        self.body.store(b)
        b.store_maybe_ref(self.counterparty.cell() if self.counterparty is not None else None)
        return b.end_cell()

    def hash(self) -> bytes:
        """The cell's representation hash, computed directly (equal to ``cell().hash``,
        tested against @ton/core's vectors): vouchers are signed and checked on a hot path."""
        bits = self.body.push(_Bits().push(TAG_STATE, 32).push(self.channel_id, 128))
        if self.counterparty is None:
            return bits.push(0, 1).cell_repr_hash()
        ref = self.counterparty.push(_Bits()).cell_repr_hash()
        return bits.push(1, 1).cell_repr_hash(((0, ref),))

    def sign(self, key: SigningKey) -> SignedSemiChannel:
        return SignedSemiChannel(self, key.sign(self.hash()).signature)


@dataclass(frozen=True, slots=True)
class SignedSemiChannel:
    state: SemiChannel
    signature: bytes

    def cell(self) -> Cell:
        """The ``SignedSemiChannel`` cell the contract takes in close and challenge messages."""
        return begin_cell().store_bytes(self.signature).store_cell(self.state.cell()).end_cell()

    def verify(self, key: VerifyKey) -> None:
        """BadSignature unless ``key`` signed exactly this state."""
        try:
            key.verify(self.state.hash(), self.signature)
        except BadSignatureError as exc:
            raise BadSignature("voucher signature does not verify under the channel key") from exc

    def to_record(self) -> bytes:
        """A compact, exact encoding for the write-ahead log (the BOC is rebuilt from it
        when the chain needs it): channel id, seqno, sent, optional counterparty, signature."""
        st, cp = self.state, self.state.counterparty
        out = st.channel_id.to_bytes(16, "big") + st.body.seqno.to_bytes(8, "big") + st.body.sent.to_bytes(15, "big")
        if cp is not None:
            out += b"\x01" + cp.seqno.to_bytes(8, "big") + cp.sent.to_bytes(15, "big")
        else:
            out += b"\x00"
        return out + self.signature

    @classmethod
    def from_record(cls, data: bytes) -> SignedSemiChannel:
        if len(data) not in (104, 127) or data[39] not in (0, 1) or (data[39] == 1) != (len(data) == 127):
            raise MalformedMessage("voucher record: bad length or flag")
        cp = None
        if data[39] == 1:
            cp = SemiChannelBody(int.from_bytes(data[40:48], "big"), int.from_bytes(data[48:63], "big"))
        body = SemiChannelBody(int.from_bytes(data[16:24], "big"), int.from_bytes(data[24:39], "big"))
        return cls(SemiChannel(int.from_bytes(data[:16], "big"), body, cp), data[-64:])

    def to_boc(self) -> bytes:
        return bytes(self.cell().to_boc(hash_crc32=True))  # with a CRC, as @ton/core and tonweb write

    @classmethod
    def from_boc(cls, data: bytes, *, max_size: int = 1024) -> SignedSemiChannel:
        """Parse a voucher BOC; MalformedMessage on anything but a well-formed SignedSemiChannel."""
        if len(data) > max_size:
            raise MalformedMessage(f"voucher BOC of {len(data)} bytes exceeds {max_size}")
        try:
            root = Cell.one_from_boc(data)
            s = root.begin_parse()
            signature = s.load_bytes(64)
            if s.load_uint(32) != TAG_STATE:
                raise MalformedMessage("voucher: not a SemiChannel state")
            channel_id = s.load_uint(128)
            body = SemiChannelBody(s.load_uint(64), s.load_coins())
            if s.load_bit():
                raise MalformedMessage("voucher: conditional payments are not accepted")
            counterparty = None
            if s.load_bit():
                c = s.load_ref().begin_parse()
                counterparty = SemiChannelBody(c.load_uint(64), c.load_coins())
                if c.load_bit() or c.remaining_bits or c.remaining_refs:
                    raise MalformedMessage("voucher: malformed counterparty body")
            if s.remaining_bits or s.remaining_refs:
                raise MalformedMessage("voucher: trailing data")
        except RemoteProtocolError:
            raise
        except Exception as exc:  # pytoniq-core raises assorted errors on bad bytes
            raise MalformedMessage(f"voucher: not a valid BOC ({exc.__class__.__name__})") from exc
        return cls(SemiChannel(channel_id, body, counterparty), signature)


def finish_is_possible(*, balance_a: int, sent_a: int, balance_b: int, sent_b: int, fine: int = 0) -> bool:
    """Whether ``finish_uncooperative_close`` can pay out these states.

    The contract computes A's payout as balance_A + sent_B - sent_A - fine and
    fails (every time, funds locked until both sign a cooperative close) when that
    is negative; the same holds for B. A state that allows this is never accepted.
    """
    return sent_a + fine <= balance_a + sent_b and sent_b + fine <= balance_b + sent_a


@dataclass
class VoucherBook:
    """The worker's (B's) record of one channel's vouchers from the client (A).

    Pure: :meth:`check` validates without changing anything, so the caller can
    make the voucher durable (write-ahead, fsync) and only then :meth:`commit` it
    and acknowledge. A crash between the two loses nothing: on restart the book is
    rebuilt from the durable log, where the voucher already is.
    """

    channel_id: int
    payer_key: VerifyKey
    deposit_a: int  # A's balance in the channel contract
    deposit_b: int = 0
    sent_b: int = 0  # what B has sent A (zero for a pure worker)
    fine: int = 0  # the contract's misbehaviour fine, from its config
    best: SignedSemiChannel | None = None

    @property
    def seqno(self) -> int:
        return self.best.state.body.seqno if self.best else 0

    @property
    def received(self) -> int:
        """All A has sent B so far, in nanoton, by the newest accepted voucher."""
        return self.best.state.body.sent if self.best else 0

    def check(
        self, voucher: SignedSemiChannel, *, expect_at_least: int = 0, max_seqno_step: int | None = MAX_SEQNO_STEP
    ) -> int:
        """Validate ``voucher``; return the amount it adds. Raises a RemoteProtocolError.

        ``expect_at_least``: the amount the voucher must add (the job's cost).
        ``max_seqno_step``: how far past the newest voucher its seqno may jump (None: any
        distance, for replaying a log of vouchers accepted before the bound existed).
        """
        state = voucher.state
        if state.channel_id != self.channel_id:
            raise MalformedMessage(f"voucher for channel {state.channel_id:x}, not {self.channel_id:x}")
        voucher.verify(self.payer_key)
        if state.body.seqno <= self.seqno:
            raise ReplayedMessage(f"voucher seqno {state.body.seqno} is not above {self.seqno}")
        if max_seqno_step is not None and state.body.seqno - self.seqno > max_seqno_step:
            raise ChannelRuleBroken(
                f"voucher seqno {state.body.seqno} jumps more than {max_seqno_step} past {self.seqno}: "
                "it would use up the channel's 64-bit seqno"
            )
        added = state.body.sent - self.received
        if added < 0:
            raise ChannelRuleBroken(f"voucher lowers sent from {self.received} to {state.body.sent}")
        if added < expect_at_least:
            raise ChannelRuleBroken(f"voucher adds {added} nanoton, {expect_at_least} are due")
        if state.body.sent > self.deposit_a + self.sent_b:
            raise ChannelRuleBroken(f"voucher sends {state.body.sent}, more than A holds ({self.deposit_a})")
        payouts_ok = finish_is_possible(
            balance_a=self.deposit_a,
            sent_a=state.body.sent,
            balance_b=self.deposit_b,
            sent_b=self.sent_b,
            fine=self.fine,
        )
        if not payouts_ok:
            raise ChannelRuleBroken("voucher would leave the channel unable to close uncooperatively")
        return added

    def commit(self, voucher: SignedSemiChannel) -> None:
        """Record a voucher that passed :meth:`check` (and is durable)."""
        self.best = voucher


@dataclass
class VoucherIssuer:
    """The client's (A's) side of one channel: signs the next voucher for each job.

    Each voucher raises the seqno by one and the cumulative ``sent`` by the job's
    cost. It refuses to sign beyond the deposit or into a state the contract could
    not finish (see :func:`finish_is_possible`). The caller logs each voucher
    durably before sending it (write-ahead): after a crash, :meth:`restore` from
    the log continues from the last voucher, so nothing is paid twice or re-signed
    with a used seqno.
    """

    channel_id: int
    key: SigningKey
    deposit_a: int
    deposit_b: int = 0
    fine: int = 0
    seqno: int = 0
    sent: int = 0

    def next(self, cost: int) -> SignedSemiChannel:
        if cost < 0:
            raise LocalProtocolError("a job cannot cost less than nothing")
        sent = self.sent + cost
        if sent > self.deposit_a or not finish_is_possible(
            balance_a=self.deposit_a, sent_a=sent, balance_b=self.deposit_b, sent_b=0, fine=self.fine
        ):
            raise LocalProtocolError(f"the channel cannot pay {cost} more ({self.sent} of {self.deposit_a} sent)")
        voucher = SemiChannel(self.channel_id, SemiChannelBody(self.seqno + 1, sent)).sign(self.key)
        self.seqno, self.sent = self.seqno + 1, sent
        return voucher

    def restore(self, logged: list[SignedSemiChannel]) -> None:
        """Continue after the newest voucher of this channel in ``logged``."""
        for v in logged:
            if v.state.channel_id == self.channel_id and v.state.body.seqno > self.seqno:
                self.seqno, self.sent = v.state.body.seqno, v.state.body.sent
