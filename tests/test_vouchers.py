"""Payment-channel states: byte-exact with @ton/core, and the worker's acceptance rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from cocoon_p2p.core.errors import BadSignature, MalformedMessage, RemoteProtocolError, ReplayedMessage
from cocoon_p2p.payments.vouchers import (
    ChannelRuleBroken,
    SemiChannel,
    SemiChannelBody,
    SignedSemiChannel,
    VoucherBook,
    finish_is_possible,
)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "vouchers.json").read_text())
A = SigningKey(bytes([1]) * 32)
CHANNEL = 0xC0C0


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: f"seed{c['seed_byte']}")
def test_cells_and_signatures_match_ton_core(case: dict[str, object]) -> None:
    key = SigningKey(bytes([int(case["seed_byte"])]) * 32)  # type: ignore[call-overload]
    cp = case["counterparty"]
    state = SemiChannel(
        int(case["channel_id"]),  # type: ignore[call-overload]
        SemiChannelBody(int(case["seqno"]), int(case["sent"])),  # type: ignore[call-overload]
        SemiChannelBody(int(cp[0]), int(cp[1])) if cp else None,  # type: ignore[index]
    )
    assert state.cell().hash.hex() == case["state_hash"]
    assert state.hash().hex() == case["state_hash"]  # the direct hash, without building cells
    signed = state.sign(key)
    assert signed.signature.hex() == case["signature"]  # Ed25519 is deterministic
    assert signed.to_boc().hex() == case["signed_boc"]
    assert SignedSemiChannel.from_boc(bytes.fromhex(case["signed_boc"])) == signed  # type: ignore[arg-type]


def voucher(seqno: int, sent: int, *, key: SigningKey = A, channel: int = CHANNEL) -> SignedSemiChannel:
    return SemiChannel(channel, SemiChannelBody(seqno, sent)).sign(key)


def book(**kw: int) -> VoucherBook:
    return VoucherBook(channel_id=CHANNEL, payer_key=A.verify_key, deposit_a=kw.pop("deposit_a", 1000), **kw)


def test_accepts_growing_vouchers_and_reports_what_each_adds() -> None:
    b = book()
    for seqno, sent, added in ((1, 100, 100), (2, 250, 150), (5, 250, 0)):
        v = voucher(seqno, sent)
        assert b.check(v) == added
        b.commit(v)
    assert b.seqno == 5 and b.received == 250


@pytest.mark.parametrize(
    ("v", "error"),
    [
        (voucher(3, 100, key=SigningKey(bytes([9]) * 32)), BadSignature),  # not A's key
        (voucher(3, 100, channel=CHANNEL + 1), MalformedMessage),  # another channel
        (voucher(2, 300), ReplayedMessage),  # seqno not above the last
        (voucher(3, 150), ChannelRuleBroken),  # sent went down
        (voucher(3, 1001), ChannelRuleBroken),  # more than the deposit
    ],
)
def test_refuses_bad_vouchers_without_changing_state(v: SignedSemiChannel, error: type) -> None:
    b = book()
    b.commit(voucher(2, 200))
    with pytest.raises(error):
        b.check(v)
    assert b.seqno == 2 and b.received == 200


def test_a_voucher_must_cover_the_job() -> None:
    b = book()
    with pytest.raises(ChannelRuleBroken):
        b.check(voucher(1, 40), expect_at_least=50)
    assert b.check(voucher(1, 50), expect_at_least=50) == 50


def test_defect_guard_against_unfinishable_closes() -> None:
    # The contract fails finish_uncooperative_close forever when a payout goes negative.
    assert finish_is_possible(balance_a=1000, sent_a=1000, balance_b=0, sent_b=0)
    assert not finish_is_possible(balance_a=1000, sent_a=990, balance_b=0, sent_b=0, fine=20)
    b = book(fine=20)
    with pytest.raises(ChannelRuleBroken):
        b.check(voucher(1, 990))
    assert b.check(voucher(1, 980)) == 980


def test_signature_covers_every_field() -> None:
    v = voucher(4, 400)
    forged = SignedSemiChannel(SemiChannel(CHANNEL, SemiChannelBody(4, 401)), v.signature)
    with pytest.raises(BadSignature):
        forged.verify(A.verify_key)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    try:
        SignedSemiChannel.from_boc(data)
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_vouchers_are_rejected_or_fail_the_signature(flips: list[tuple[int, int]]) -> None:
    good = bytearray(voucher(7, 700).to_boc())
    for pos, val in flips:
        good[pos % len(good)] = val
    try:
        parsed = SignedSemiChannel.from_boc(bytes(good))
    except RemoteProtocolError:
        return
    if parsed != voucher(7, 700):
        with pytest.raises(RemoteProtocolError):
            book().check(parsed)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, (1 << 128) - 1),
    st.integers(0, (1 << 64) - 1),
    st.integers(0, (1 << 120) - 1),
    st.none() | st.tuples(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 120) - 1)),
)
def test_direct_hash_equals_the_cell_hash(channel: int, seqno: int, sent: int, cp: tuple[int, int] | None) -> None:
    state = SemiChannel(channel, SemiChannelBody(seqno, sent), SemiChannelBody(*cp) if cp else None)
    assert state.hash() == state.cell().hash


def test_log_records_round_trip_exactly() -> None:
    for v in (voucher(9, 12345), SemiChannel(CHANNEL, SemiChannelBody(3, 7), SemiChannelBody(2, 1)).sign(A)):
        rec = v.to_record()
        assert SignedSemiChannel.from_record(rec) == v
        SignedSemiChannel.from_record(rec).verify(A.verify_key)
    for bad in (b"", b"\x00" * 103, b"\x00" * 39 + b"\x02" + b"\x00" * 64):
        with pytest.raises(MalformedMessage):
            SignedSemiChannel.from_record(bad)


def test_issuer_counts_up_refuses_overdraft_and_restores_after_a_crash(tmp_path: Path) -> None:
    from cocoon_p2p.core.errors import LocalProtocolError
    from cocoon_p2p.payments.voucherlog import VoucherLog
    from cocoon_p2p.payments.vouchers import VoucherIssuer

    log = VoucherLog(tmp_path / "issued.log")
    issuer = VoucherIssuer(channel_id=CHANNEL, key=A, deposit_a=1000)
    worker = book()
    for cost in (100, 250, 0):
        v = issuer.next(cost)
        log.append([v.to_record()])  # durable before it is sent
        assert worker.check(v) == cost
        worker.commit(v)
    with pytest.raises(LocalProtocolError):
        issuer.next(651)  # beyond the deposit
    log.close()
    again = VoucherIssuer(channel_id=CHANNEL, key=A, deposit_a=1000)  # after a restart
    again.restore([SignedSemiChannel.from_record(r) for r in VoucherLog(tmp_path / "issued.log").records])
    assert (again.seqno, again.sent) == (3, 350)
    assert worker.check(again.next(50)) == 50  # the worker accepts the continuation
