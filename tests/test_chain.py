"""Payment channels on the local chain (@ton/sandbox) through the toncenter API: open, pay, close."""

from __future__ import annotations

import shutil
import threading

import pytest
from nacl.signing import SigningKey
from pytoniq_core import Address

from cocoon_p2p.payments import messages as m
from cocoon_p2p.payments.chain import (
    ChainError,
    TransferFailed,
    Wallet,
    address_of,
    raw_address,
    read_channel,
    state_init,
    wait_until,
)
from cocoon_p2p.payments.contract import payment_channel_code
from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody, VoucherBook
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js")
TON = 1_000_000_000
FEE = TON // 20  # attached to control messages for gas
CHANNEL_ID = 0xC0C0A


def open_channel(chain: LocalChain, *, quarantine_s: int = 3600) -> tuple[Wallet, Wallet, SigningKey, SigningKey, str]:
    """Two funded wallets, and a channel between them deployed and initialised with 5 TON from A."""
    client, worker = Wallet.create(), Wallet.create()
    for w, amount in ((client, 10 * TON), (worker, TON)):
        chain.fund(w.address, amount)
        w.deploy(chain)
        assert chain.state(w.address) == "active"
    key_a, key_b = SigningKey(client.secret_key[:32]), SigningKey(worker.secret_key[:32])
    data = m.initial_data(
        channel_id=CHANNEL_ID,
        key_a=bytes(key_a.verify_key),
        key_b=bytes(key_b.verify_key),
        addr_a=Address(client.address),
        addr_b=Address(worker.address),
        quarantine_s=quarantine_s,
    )
    init = state_init(payment_channel_code(), data)
    channel = address_of(init)
    client.transfer(chain, channel, 5 * TON + FEE, body=m.top_up(5 * TON, 0), init=init)  # deploy + deposit
    client.transfer(chain, channel, FEE, body=m.init_channel(CHANNEL_ID, 5 * TON, 0, key=key_a, is_a=True))
    assert chain.run_get_method(channel, "get_channel_state") == [1]
    on_chain = read_channel(chain, channel)  # what a worker checks before it accepts vouchers
    assert (on_chain.state, on_chain.balance_a, on_chain.balance_b) == (1, 5 * TON, 0)
    assert (on_chain.key_a, on_chain.key_b) == (bytes(key_a.verify_key), bytes(key_b.verify_key))
    assert on_chain.channel_id == CHANNEL_ID and on_chain.quarantine_s == quarantine_s
    assert (on_chain.addr_a, on_chain.addr_b) == (client.address, worker.address)
    return client, worker, key_a, key_b, channel


def test_open_pay_and_cooperatively_close_on_chain() -> None:
    with open_local_chain() as chain:
        client, worker, key_a, key_b, channel = open_channel(chain)
        channel_id = CHANNEL_ID

        book = VoucherBook(channel_id=channel_id, payer_key=key_a.verify_key, deposit_a=5 * TON)
        for seqno in range(1, 101):  # 100 jobs at 0.01 TON, paid off chain
            v = SemiChannel(channel_id, SemiChannelBody(seqno, seqno * TON // 100)).sign(key_a)
            book.check(v, expect_at_least=TON // 100)
            book.commit(v)
        before = chain.balance(worker.address)
        terms = m.CloseTerms(channel_id, 5 * TON - book.received, book.received, book.seqno, 1)
        close = m.cooperative_close(terms, m.sign_body(terms.body(), key_a), m.sign_body(terms.body(), key_b))
        worker.transfer(chain, channel, FEE, body=close)
        assert chain.run_get_method(channel, "get_channel_state") == [0]
        received = chain.balance(worker.address) - before
        # The 1 TON it earned, less the value it attached to the close (which goes to A
        # with the remainder) and its wallet's fees.
        assert TON - FEE - TON // 100 < received < TON - FEE
        payout = [t for t in chain.transactions(worker.address) if t.in_source == channel]
        assert payout and TON - TON // 1000 < payout[0].in_value <= TON  # less the forward fee
        closed = chain.transactions(channel, 1)[0]  # the close, as the chain ran it
        assert closed.in_source == raw_address(worker.address) and closed.succeeded and not closed.bounced
        assert {dest for dest, _value in closed.out_messages} == {
            raw_address(client.address),
            raw_address(worker.address),
        }
        assert chain.settle().pending == 0  # synchronous: nothing is ever left queued


def test_transfers_from_one_wallet_in_several_threads_all_land() -> None:
    """A client opens channels to several workers at once, from threads: each transfer
    must use its own seqno (two built from one reading lose one: exit code 33)."""
    with open_local_chain() as chain:
        wallet = chain.new_wallet(10 * TON)
        targets = [chain.new_wallet(TON // 10) for _ in range(4)]
        before = [chain.balance(t.address) for t in targets]
        threads = [threading.Thread(target=wallet.transfer, args=(chain, t.address, TON // 10)) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wallet.seqno(chain) == 1 + len(targets)
        assert all(chain.balance(t.address) > b for t, b in zip(targets, before, strict=True))


def test_waiting_for_the_chain_rides_out_api_errors_and_times_out() -> None:
    answers = iter([ChainError("HTTP 429"), False, ChainError("HTTP 429"), True])

    def check() -> bool:
        answer = next(answers)
        if isinstance(answer, ChainError):
            raise answer
        return answer

    wait_until(check, timeout_s=5, poll_s=0.01)  # two rate-limit errors and a "no" on the way
    with pytest.raises(ChainError, match="timed out"):
        wait_until(lambda: False, timeout_s=0.05, poll_s=0.01)


def test_worker_closes_alone_after_the_quarantine_when_the_client_vanishes() -> None:
    with open_local_chain() as chain:
        client, worker, key_a, key_b, channel = open_channel(chain, quarantine_s=600)
        newest = SemiChannel(CHANNEL_ID, SemiChannelBody(42, 3 * TON)).sign(key_a)  # the client's last voucher
        mine = SemiChannel(CHANNEL_ID, SemiChannelBody(0, 0), SemiChannelBody(42, 3 * TON)).sign(key_b)
        start = m.start_uncooperative_close(CHANNEL_ID, newest, mine, key=key_b, is_a=False)
        worker.transfer(chain, channel, FEE, body=start)
        assert chain.run_get_method(channel, "get_channel_state") == [2]  # quarantine
        with pytest.raises(TransferFailed, match="exit code 113.*bounced back"):  # too early: refused, and seen
            worker.transfer(chain, channel, FEE, body=m.finish_uncooperative_close())
        assert chain.run_get_method(channel, "get_channel_state") == [2]
        chain.advance(601)
        before = chain.balance(worker.address)
        worker.transfer(chain, channel, FEE, body=m.finish_uncooperative_close())
        assert chain.run_get_method(channel, "get_channel_state") == [0]
        gained = chain.balance(worker.address) - before
        assert 3 * TON - FEE - TON // 100 < gained < 3 * TON  # paid by the voucher, without the client


def test_a_transfer_is_confirmed_by_its_transactions_not_by_the_seqno() -> None:
    """An underfunded wallet's transaction lands (the seqno moves) yet sends nothing: that is
    a TransferFailed, not a success; a good transfer returns the destination's transaction."""
    with open_local_chain() as chain:
        rich, poor = chain.new_wallet(TON), chain.new_wallet(TON // 10)
        landed = rich.transfer(chain, poor.address, TON // 100)
        assert landed.succeeded and landed.in_source == raw_address(rich.address)
        assert landed.in_value == TON // 100
        seqno = poor.seqno(chain)
        with pytest.raises(TransferFailed, match="sent nothing"):
            poor.transfer(chain, rich.address, 5 * TON)  # more than it holds: mode 3 skips the message
        assert poor.seqno(chain) == seqno + 1  # the old check would have called this a success
