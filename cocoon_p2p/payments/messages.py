"""Message bodies for the official payment-channel contract (sans-IO, pytoniq-core cells).

Layouts as the contract and tonweb's PaymentUtils.js: an op (crc32 of the TL-B
constructor), then one or two Ed25519 signatures over the hash of a tagged body,
then that body's bits inline. Signatures are made here with PyNaCl; a party signs
only bodies it agrees to (see :mod:`.vouchers` for the rules on states).
"""

from __future__ import annotations

from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from pytoniq_core import Address, Cell, begin_cell

from .vouchers import SignedSemiChannel

OP_TOP_UP = 0x67C7D281
OP_INIT_CHANNEL = 0x0E0620C2
OP_COOPERATIVE_CLOSE = 0x5577587E
OP_COOPERATIVE_COMMIT = 0x79A126EF
OP_START_UNCOOPERATIVE_CLOSE = 0x1F151ACF
OP_CHALLENGE_QUARANTINED_STATE = 0x088EAA32
OP_FINISH_UNCOOPERATIVE_CLOSE = 0x25432A91
OP_CHANNEL_CLOSED = 0xDDDC88BA  # the payout message's body

TAG_INIT = 0x696E6974
TAG_COOPERATIVE_CLOSE = 0x436C6F73
TAG_COOPERATIVE_COMMIT = 0x43436D74
TAG_START_UNCOOPERATIVE_CLOSE = 0x556E436C
TAG_CHALLENGE_STATE = 0x43686751


def initial_data(
    *,
    channel_id: int,
    key_a: bytes,
    key_b: bytes,
    addr_a: Address,
    addr_b: Address,
    quarantine_s: int = 3600,
    misbehavior_fine: int = 0,
    conditional_close_s: int = 0,
    excess_fee: int = 0,
) -> Cell:
    """The contract's data at deployment (tonweb's createDataCell): not yet initialised,
    zero balances, both parties' keys and payout addresses, and the closing rules."""
    closing = begin_cell().store_uint(quarantine_s, 32).store_coins(misbehavior_fine)
    closing.store_uint(conditional_close_s, 32)
    payment = begin_cell().store_coins(excess_fee).store_address(addr_a).store_address(addr_b).end_cell()
    b = begin_cell().store_bit(0).store_coins(0).store_coins(0).store_bytes(key_a).store_bytes(key_b)
    b.store_uint(channel_id, 128).store_ref(closing.end_cell())
    b.store_uint(0, 32).store_uint(0, 32).store_bit(0)  # committed seqnos, no quarantine
    return b.store_ref(payment).end_cell()


def top_up(add_a: int, add_b: int) -> Cell:
    """Adds to A's and B's balances (the message's value must cover both)."""
    return begin_cell().store_uint(OP_TOP_UP, 32).store_coins(add_a).store_coins(add_b).end_cell()


def init_body(channel_id: int, balance_a: int, balance_b: int) -> Cell:
    b = begin_cell().store_uint(TAG_INIT, 32).store_uint(channel_id, 128)
    return b.store_coins(balance_a).store_coins(balance_b).end_cell()


@dataclass(frozen=True)
class CloseTerms:
    """What both parties sign to close cooperatively: final balances and state numbers."""

    channel_id: int
    balance_a: int
    balance_b: int
    seqno_a: int
    seqno_b: int

    def body(self) -> Cell:
        b = begin_cell().store_uint(TAG_COOPERATIVE_CLOSE, 32).store_uint(self.channel_id, 128)
        b.store_coins(self.balance_a).store_coins(self.balance_b)
        return b.store_uint(self.seqno_a, 64).store_uint(self.seqno_b, 64).end_cell()


@dataclass(frozen=True)
class CommitTerms:
    """What both parties sign to commit state numbers on chain without closing."""

    channel_id: int
    seqno_a: int
    seqno_b: int

    def body(self) -> Cell:
        b = begin_cell().store_uint(TAG_COOPERATIVE_COMMIT, 32).store_uint(self.channel_id, 128)
        return b.store_uint(self.seqno_a, 64).store_uint(self.seqno_b, 64).end_cell()


def sign_body(body: Cell, key: SigningKey) -> bytes:
    return bytes(key.sign(body.hash).signature)


def signed_by(body: Cell, signature: bytes, public_key: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s over ``body`` (what :func:`sign_body` makes)."""
    try:
        VerifyKey(public_key).verify(body.hash, signature)
    except BadSignatureError:
        return False
    return True


def one_signature(op: int, is_a: bool, signature: bytes, body: Cell) -> Cell:
    """op, who signed, the signature, then the signed body inline (tonweb's createOneSignature)."""
    return begin_cell().store_uint(op, 32).store_bit(int(is_a)).store_bytes(signature).store_cell(body).end_cell()


def two_signatures(op: int, sig_a: bytes, sig_b: bytes, body: Cell) -> Cell:
    """op, both signatures in refs, then the signed body inline (tonweb's createTwoSignature)."""
    b = begin_cell().store_uint(op, 32)
    b.store_ref(begin_cell().store_bytes(sig_a).end_cell()).store_ref(begin_cell().store_bytes(sig_b).end_cell())
    return b.store_cell(body).end_cell()


def init_channel(channel_id: int, balance_a: int, balance_b: int, *, key: SigningKey, is_a: bool) -> Cell:
    body = init_body(channel_id, balance_a, balance_b)
    return one_signature(OP_INIT_CHANNEL, is_a, sign_body(body, key), body)


def cooperative_close(terms: CloseTerms, sig_a: bytes, sig_b: bytes) -> Cell:
    return two_signatures(OP_COOPERATIVE_CLOSE, sig_a, sig_b, terms.body())


def cooperative_commit(terms: CommitTerms, sig_a: bytes, sig_b: bytes) -> Cell:
    return two_signatures(OP_COOPERATIVE_COMMIT, sig_a, sig_b, terms.body())


def _quarantine_body(tag: int, channel_id: int, state_a: SignedSemiChannel, state_b: SignedSemiChannel) -> Cell:
    b = begin_cell().store_uint(tag, 32).store_uint(channel_id, 128)
    return b.store_ref(state_a.cell()).store_ref(state_b.cell()).end_cell()


def start_uncooperative_close(
    channel_id: int, state_a: SignedSemiChannel, state_b: SignedSemiChannel, *, key: SigningKey, is_a: bool
) -> Cell:
    """Puts both parties' newest signed states into quarantine (either party may send it)."""
    body = _quarantine_body(TAG_START_UNCOOPERATIVE_CLOSE, channel_id, state_a, state_b)
    return one_signature(OP_START_UNCOOPERATIVE_CLOSE, is_a, sign_body(body, key), body)


def challenge_quarantined_state(
    channel_id: int, state_a: SignedSemiChannel, state_b: SignedSemiChannel, *, key: SigningKey, is_a: bool
) -> Cell:
    """Replaces a quarantined state by a newer one the other party signed."""
    body = _quarantine_body(TAG_CHALLENGE_STATE, channel_id, state_a, state_b)
    return one_signature(OP_CHALLENGE_QUARANTINED_STATE, is_a, sign_body(body, key), body)


def finish_uncooperative_close() -> Cell:
    return begin_cell().store_uint(OP_FINISH_UNCOOPERATIVE_CLOSE, 32).end_cell()
