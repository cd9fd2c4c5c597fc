"""The official payment-channel contract, run by TON's own emulator (pytvm), fed our messages."""

from __future__ import annotations

import shutil

import pytest
from nacl.signing import SigningKey
from pytoniq_core import Address

from cocoon_p2p.payments import messages as m
from cocoon_p2p.payments.contract import payment_channel_code
from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody, VoucherBook
from cocoon_p2p.testing.emulator import ContractEmulator

pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to fetch the contract code")

A, B = SigningKey(bytes([1]) * 32), SigningKey(bytes([2]) * 32)
ADDR_A, ADDR_B = "0:" + "aa" * 32, "0:" + "bb" * 32
CH = 0xC0C0A
TON = 1_000_000_000
QUARANTINE_S = 3600
NOW = 1_790_000_000


def open_channel(deposit_a: int = 5 * TON, fine: int = 0) -> ContractEmulator:
    data = m.initial_data(
        channel_id=CH,
        key_a=bytes(A.verify_key),
        key_b=bytes(B.verify_key),
        addr_a=Address(ADDR_A),
        addr_b=Address(ADDR_B),
        quarantine_s=QUARANTINE_S,
        misbehavior_fine=fine,
    )
    c = ContractEmulator(payment_channel_code(), data, address="0:" + "cc" * 32, now=NOW)
    assert c.send(m.top_up(deposit_a, 0), deposit_a + TON // 100).exit_code == 0
    assert c.send(m.init_channel(CH, deposit_a, 0, key=A, is_a=True), TON // 100).exit_code == 0
    assert c.get("get_channel_state") == [1]  # open
    return c


def payouts(outcome: object) -> dict[str, int]:
    return dict(outcome.payouts)  # type: ignore[attr-defined]


def test_cooperative_close_pays_both_sides() -> None:
    c = open_channel()
    terms = m.CloseTerms(CH, 3 * TON, 2 * TON, 1, 1)
    out = c.send(m.cooperative_close(terms, m.sign_body(terms.body(), A), m.sign_body(terms.body(), B)), TON // 100)
    assert out.exit_code == 0 and payouts(out)[ADDR_B] == 2 * TON and ADDR_A in payouts(out)
    assert c.get("get_channel_state") == [0]  # closed: storage reset
    assert out.gas_used < 20_000


def test_a_bad_signature_is_rejected() -> None:
    c = open_channel()
    terms = m.CloseTerms(CH, 3 * TON, 2 * TON, 1, 1)
    forged = m.sign_body(terms.body(), SigningKey(bytes([9]) * 32))
    out = c.send(m.cooperative_close(terms, m.sign_body(terms.body(), A), forged), TON // 100)
    assert out.exit_code == 101 and out.payouts == []  # the contract's wrong-signature error
    assert c.get("get_channel_state") == [1]  # still open, nothing paid


def test_committed_seqnos_make_older_closes_stale() -> None:
    c = open_channel()
    commit = m.CommitTerms(CH, 5, 5)
    sigs = m.sign_body(commit.body(), A), m.sign_body(commit.body(), B)
    assert c.send(m.cooperative_commit(commit, *sigs), TON // 100).exit_code == 0
    stale = m.CloseTerms(CH, 3 * TON, 2 * TON, 5, 5)  # not above the committed numbers
    out = c.send(m.cooperative_close(stale, m.sign_body(stale.body(), A), m.sign_body(stale.body(), B)), TON // 100)
    assert out.exit_code != 0 and c.get("get_channel_state") == [1]
    fresh = m.CloseTerms(CH, 3 * TON, 2 * TON, 6, 6)
    out = c.send(m.cooperative_close(fresh, m.sign_body(fresh.body(), A), m.sign_body(fresh.body(), B)), TON // 100)
    assert out.exit_code == 0


def test_a_thousand_vouchers_then_uncooperative_close_with_challenge() -> None:
    c = open_channel()
    book = VoucherBook(channel_id=CH, payer_key=A.verify_key, deposit_a=5 * TON)
    job_cost = 2_000_000  # 0.002 TON a job
    for seqno in range(1, 1001):  # off chain: one voucher per job, checked by the worker
        v = SemiChannel(CH, SemiChannelBody(seqno, seqno * job_cost)).sign(A)
        book.check(v, expect_at_least=job_cost)
        book.commit(v)
    assert book.received == 2 * TON
    old_a = SemiChannel(CH, SemiChannelBody(400, 400 * job_cost)).sign(A)  # A cheats with an old state
    b_state = SemiChannel(CH, SemiChannelBody(0, 0), SemiChannelBody(400, 400 * job_cost)).sign(B)
    start = m.start_uncooperative_close(CH, old_a, b_state, key=A, is_a=True)
    assert c.send(start, TON // 100).exit_code == 0
    assert c.get("get_channel_state") == [2]  # quarantine
    assert book.best is not None
    b_newer = SemiChannel(CH, SemiChannelBody(1, 0), SemiChannelBody(1000, 2 * TON)).sign(B)
    challenge = m.challenge_quarantined_state(CH, book.best, b_newer, key=B, is_a=False)
    assert c.send(challenge, TON // 100).exit_code == 0  # B shows A's newest voucher
    assert c.send(m.finish_uncooperative_close(), TON // 100).exit_code != 0  # quarantine not over
    c.now += QUARANTINE_S + 1
    out = c.send(m.finish_uncooperative_close(), TON // 100)
    assert out.exit_code == 0
    assert payouts(out)[ADDR_B] == 2 * TON  # every job paid, at the newest voucher
    assert c.get("get_channel_state") == [0]
