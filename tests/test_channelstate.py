"""A channel's lifecycle: every transition, how channels end, and the state surviving restarts
on both sides (the worker's store, the client's book)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from cocoon_p2p.core.errors import MalformedMessage
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.core.metrics import parse, render
from cocoon_p2p.payments import frames as pf
from cocoon_p2p.payments import messages as m
from cocoon_p2p.payments.chain import TonCenter, Wallet
from cocoon_p2p.payments.channelops import PaymentConfig
from cocoon_p2p.payments.channelstate import ChannelEvent, ChannelState, CloseOutcome, Lifecycle
from cocoon_p2p.payments.closeterms import payee_terms
from cocoon_p2p.payments.errors import ForbiddenTransition, UnknownChannel
from cocoon_p2p.payments.payee import CHANNEL_ENDED, Payee
from cocoon_p2p.payments.payer import Payer
from cocoon_p2p.payments.payerbook import ChannelRecord, decode_book, encode_book
from cocoon_p2p.payments.service import PaymentService
from cocoon_p2p.payments.store import ChannelStore, ChannelTerms
from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody

S, E = ChannelState, ChannelEvent
A, B = SigningKey(bytes([1]) * 32), SigningKey(bytes([2]) * 32)
TERMS = ChannelTerms(channel_id=0xC0C0A, payer_key=bytes(A.verify_key), deposit_a=10**9, address="0:" + "cc" * 32)
CLIENT = b"client-peer-id"

# The whole map, written out again independently of the module's table.
EXPECTED: dict[ChannelState, dict[ChannelEvent, ChannelState]] = {
    S.OPENING: {
        E.OPEN_CONFIRMED: S.OPEN,
        E.OPEN_ABANDONED: S.CLOSED,
        E.UNCOOPERATIVE_CLOSE_STARTED: S.CLOSING_UNCOOPERATIVE,
    },
    S.OPEN: {
        E.CLOSE_PROPOSED: S.CLOSING_COOPERATIVE,
        E.UNCOOPERATIVE_CLOSE_STARTED: S.CLOSING_UNCOOPERATIVE,
        E.QUARANTINE_SEEN: S.CLOSING_UNCOOPERATIVE,
        E.CLOSED_ON_CHAIN: S.CLOSED,
    },
    S.CLOSING_COOPERATIVE: {
        E.UNCOOPERATIVE_CLOSE_STARTED: S.CLOSING_UNCOOPERATIVE,
        E.QUARANTINE_SEEN: S.CLOSING_UNCOOPERATIVE,
        E.CLOSED_ON_CHAIN: S.CLOSED,
    },
    S.CLOSING_UNCOOPERATIVE: {
        E.UNCOOPERATIVE_CLOSE_STARTED: S.CLOSING_UNCOOPERATIVE,
        E.QUARANTINE_SEEN: S.CLOSING_UNCOOPERATIVE,
        E.STATE_CHALLENGED: S.CLOSING_UNCOOPERATIVE,
        E.CLOSE_FINISHED: S.CLOSING_UNCOOPERATIVE,
        E.CLOSED_ON_CHAIN: S.CLOSED,
    },
    S.CLOSED: {},
}
PAIRS = [(state, event) for state in ChannelState for event in ChannelEvent]


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=[f"{s.value}-{e.value}" for s, e in PAIRS])
def test_every_event_in_every_state(state: ChannelState, event: ChannelEvent) -> None:
    life = Lifecycle(state)
    after = EXPECTED[state].get(event)
    if after is None:
        with pytest.raises(ForbiddenTransition) as err:
            life.apply(event)
        assert err.value.code == "channel-state"
    else:
        assert life.apply(event).state is after


@pytest.mark.parametrize(
    ("start", "events", "state", "ending"),
    [
        (S.OPENING, [E.OPEN_CONFIRMED], S.OPEN, None),
        (S.OPENING, [E.OPEN_ABANDONED], S.CLOSED, CloseOutcome.ABANDONED),
        (S.OPEN, [E.CLOSE_PROPOSED, E.CLOSED_ON_CHAIN], S.CLOSED, CloseOutcome.COOPERATIVE),
        (S.OPEN, [E.CLOSED_ON_CHAIN], S.CLOSED, CloseOutcome.CLOSED),  # the other party closed it
        (
            S.OPEN,
            [E.CLOSE_PROPOSED, E.UNCOOPERATIVE_CLOSE_STARTED],
            S.CLOSING_UNCOOPERATIVE,
            CloseOutcome.UNCOOPERATIVE,
        ),
        (
            S.OPEN,
            [E.UNCOOPERATIVE_CLOSE_STARTED, E.QUARANTINE_SEEN, E.CLOSE_FINISHED, E.CLOSED_ON_CHAIN],
            S.CLOSED,
            CloseOutcome.UNCOOPERATIVE,
        ),
        (  # a challenge stays recorded through what follows
            S.OPEN,
            [E.QUARANTINE_SEEN, E.STATE_CHALLENGED, E.QUARANTINE_SEEN, E.CLOSE_FINISHED, E.CLOSED_ON_CHAIN],
            S.CLOSED,
            CloseOutcome.CHALLENGED,
        ),
    ],
)
def test_how_a_channel_ends(
    start: ChannelState, events: list[ChannelEvent], state: ChannelState, ending: CloseOutcome | None
) -> None:
    life = Lifecycle(start)
    for event in events:
        life = life.apply(event)
    assert (life.state, life.ending) == (state, ending)
    assert Lifecycle.from_json(json.loads(json.dumps(life.to_json())), default=S.OPEN) == life


@pytest.mark.parametrize(
    ("data", "default", "expected"),
    [
        ({}, S.OPEN, Lifecycle(S.OPEN)),  # written before states existed
        ({}, S.CLOSED, Lifecycle(S.CLOSED, CloseOutcome.CLOSED)),
        (
            {"state": "closing-cooperative", "ending": "cooperative"},
            S.OPEN,
            Lifecycle(S.CLOSING_COOPERATIVE, CloseOutcome.COOPERATIVE),
        ),
    ],
)
def test_persisted_lifecycles_load(data: dict[str, Any], default: ChannelState, expected: Lifecycle) -> None:
    assert Lifecycle.from_json(data, default=default) == expected


def test_close_outcomes_are_the_strings_logs_and_results_carry() -> None:
    assert CloseOutcome.COOPERATIVE == "cooperative" and f"{CloseOutcome.CHALLENGED}" == "challenged"
    assert pf.PayError(pf.PayErrorCode.REPLAYED) == pf.PayError("replayed")
    assert type(pf.PayError(pf.PayErrorCode.REPLAYED).code) is str  # the wire carries a plain string


# ---- the worker's store ---------------------------------------------------------------------


def voucher(seqno: int, sent: int):  # type: ignore[no-untyped-def]
    return SemiChannel(TERMS.channel_id, SemiChannelBody(seqno, sent)).sign(A)


def test_the_store_keeps_each_channels_state_across_restarts(tmp_path: Path) -> None:
    store = ChannelStore(tmp_path)
    assert store.open(TERMS) is S.OPEN
    store.advance(TERMS.channel_id, E.CLOSE_PROPOSED)
    with pytest.raises(ForbiddenTransition):  # refused before anything is written
        store.advance(TERMS.channel_id, E.OPEN_CONFIRMED)
    store.close()
    again = ChannelStore(tmp_path)
    assert again.lifecycle(TERMS.channel_id) == Lifecycle(S.CLOSING_COOPERATIVE, CloseOutcome.COOPERATIVE)
    assert again.open(TERMS) is S.CLOSING_COOPERATIVE  # a known channel keeps its state
    assert again.unsettled() == [TERMS.channel_id]
    again.advance(TERMS.channel_id, E.CLOSED_ON_CHAIN)
    assert again.unsettled() == [] and again.count_by_state() == {S.CLOSED: 1}
    with pytest.raises(UnknownChannel):
        again.state(1)


@pytest.mark.parametrize(("marker", "state"), [(False, S.OPEN), (True, S.CLOSED)])
def test_a_store_written_before_states_existed_loads(tmp_path: Path, marker: bool, state: ChannelState) -> None:
    folder = tmp_path / f"{TERMS.channel_id:032x}"
    folder.mkdir()
    (folder / "channel.json").write_text(TERMS.to_json())
    if marker:
        (folder / "closed").write_text("closed on chain")
    store = ChannelStore(tmp_path)
    assert store.state(TERMS.channel_id) is state
    assert store.channels[TERMS.channel_id].closed is marker


@pytest.mark.slow
def test_a_state_written_before_a_kill_minus_nine_is_there_after(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from nacl.signing import SigningKey
        from cocoon_p2p.payments.channelstate import ChannelEvent
        from cocoon_p2p.payments.store import ChannelStore, ChannelTerms
        A = SigningKey(bytes([1]) * 32)
        store = ChannelStore(Path({str(tmp_path)!r}))
        store.open(ChannelTerms(channel_id=0xC0C0A, payer_key=bytes(A.verify_key), deposit_a=10**9))
        store.advance(0xC0C0A, ChannelEvent.UNCOOPERATIVE_CLOSE_STARTED)
        print("advanced", flush=True)  # the close message would be sent now
        os.kill(os.getpid(), 9)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["advanced"]
    life = ChannelStore(tmp_path).lifecycle(TERMS.channel_id)
    assert life == Lifecycle(S.CLOSING_UNCOOPERATIVE, CloseOutcome.UNCOOPERATIVE)


def _config(root: Path) -> PaymentConfig:
    return PaymentConfig(TonCenter("http://127.0.0.1:9"), Wallet(contract=None, secret_key=b""), root)


async def test_an_older_channels_last_voucher_is_taken_after_the_client_moved_on(tmp_path: Path) -> None:
    """A client restarted while closing a channel resends its last voucher there after it
    opened a new one: it goes to the older channel (same payer), not refused as malformed."""
    payee = Payee(B, _config(tmp_path))
    newer = dataclasses.replace(TERMS, channel_id=0xC0C0B, address="0:" + "cd" * 32)
    stranger = dataclasses.replace(TERMS, channel_id=0xC0C0C, payer_key=bytes(B.verify_key), address="0:" + "ce" * 32)
    for terms in (TERMS, newer, stranger):
        payee.store.open(terms)
    payee._channel_of[CLIENT] = newer.channel_id
    assert await payee.answer(CLIENT, pf.PayVoucher(voucher(1, 100).to_record())) == pf.PaidUpTo(100)
    assert payee.store.earned(TERMS.channel_id) == 100 and payee.store.earned(newer.channel_id) == 0
    theirs = SemiChannel(stranger.channel_id, SemiChannelBody(1, 100)).sign(A)  # not this client's channel
    refused = await payee.answer(CLIENT, pf.PayVoucher(theirs.to_record()))
    assert isinstance(refused, pf.PayError) and payee.store.earned(stranger.channel_id) == 0
    payee.store.close()


async def test_a_restarted_worker_admits_no_job_on_a_channel_it_was_closing(tmp_path: Path) -> None:
    payee = Payee(B, _config(tmp_path))
    payee.store.open(TERMS)
    payee._channel_of[CLIENT] = TERMS.channel_id  # what accepting the channel on chain records
    payee._save_clients()
    assert payee.admission(CLIENT) is None
    assert await payee.answer(CLIENT, pf.PayVoucher(voucher(1, 100).to_record())) == pf.PaidUpTo(100)
    terms = payee_terms(TERMS, 100, payee.store.newest(TERMS.channel_id))
    sig_a = m.sign_body(terms.body(), A)
    request = pf.CloseRequest(terms.balance_a, terms.balance_b, terms.seqno_a, terms.seqno_b, sig_a)
    assert isinstance(await payee.answer(CLIENT, request), pf.CloseSigned)
    assert payee.admission(CLIENT) == CHANNEL_ENDED  # the client is told to open a new channel
    payee.store.close()

    again = Payee(B, _config(tmp_path))  # restarted
    assert again.store.state(TERMS.channel_id) is S.CLOSING_COOPERATIVE
    assert again.admission(CLIENT) == CHANNEL_ENDED
    assert isinstance(await again.answer(CLIENT, request), pf.CloseSigned)  # a lost signature, given again
    assert await again.answer(CLIENT, pf.PayVoucher(voucher(2, 150).to_record())) == pf.PaidUpTo(150)
    again.store.advance(TERMS.channel_id, E.CLOSED_ON_CHAIN)
    refused = await again.answer(CLIENT, pf.PayVoucher(voucher(3, 200).to_record()))
    assert isinstance(refused, pf.PayError) and refused.code == pf.PayErrorCode.CHANNEL
    again.store.close()


# ---- the client's book ----------------------------------------------------------------------

W1, W2, W3 = b"w1" * 19, b"w2" * 19, b"w3" * 19


def _record(worker: bytes | None, n: int, life: Lifecycle) -> ChannelRecord:
    return ChannelRecord(worker, f"0:{n:064x}", n, 10**9, None, life)


def test_the_client_book_round_trips_and_leaves_closed_channels_out() -> None:
    records = [
        _record(W1, 1, Lifecycle(S.OPEN)),
        _record(W2, 2, Lifecycle(S.OPENING)),
        _record(W3, 3, Lifecycle(S.CLOSING_UNCOOPERATIVE, CloseOutcome.UNCOOPERATIVE)),
        _record(W3, 4, Lifecycle(S.CLOSED, CloseOutcome.COOPERATIVE)),
    ]
    assert decode_book(encode_book(records).decode()) == records[:3]


def test_a_first_version_client_book_loads() -> None:
    book = {
        "open": {W1.hex(): {"address": "0:" + "aa" * 32, "channel_id": "1", "deposit": 10**9, "b_state": ""}},
        "closing": {"0:" + "bb" * 32: "2"},
    }
    assert decode_book(json.dumps(book)) == [
        ChannelRecord(W1, "0:" + "aa" * 32, 1, 10**9, None, Lifecycle(S.OPEN)),
        ChannelRecord(None, "0:" + "bb" * 32, 2, 0, None, Lifecycle(S.CLOSING_COOPERATIVE)),
    ]
    with pytest.raises(MalformedMessage):
        decode_book('{"open": []}')


def test_a_restarted_client_resumes_each_channel_from_its_state(tmp_path: Path) -> None:
    records = [
        _record(W1, 1, Lifecycle(S.OPEN)),
        _record(W2, 2, Lifecycle(S.OPENING)),
        _record(W3, 3, Lifecycle(S.CLOSING_COOPERATIVE, CloseOutcome.COOPERATIVE)),
    ]
    (tmp_path / "payer.json").write_bytes(encode_book(records))
    payer = Payer(A, None, _config(tmp_path))
    assert list(payer.open) == [W1]  # OPENING is not open: the next job to W2 confirms or abandons it
    assert list(payer.closing) == [records[2].address]
    assert payer.count_by_state() == {S.OPEN: 1, S.OPENING: 1, S.CLOSING_COOPERATIVE: 1}
    payer._advance(payer.channels[records[0].address], E.CLOSE_PROPOSED)  # written before acting
    payer._advance(payer.channels[records[2].address], E.CLOSED_ON_CHAIN)
    payer.close()
    again = Payer(A, None, _config(tmp_path))
    assert again.open == {} and again.count_by_state() == {S.CLOSING_COOPERATIVE: 1, S.OPENING: 1}
    again.close()


# ---- metrics --------------------------------------------------------------------------------


class _Host:
    def set_stream_handler(self, protocol: str, handler: object) -> None:
        pass


async def test_payment_metrics_count_channels_by_role_and_state(tmp_path: Path) -> None:
    service = PaymentService(Identity.generate(), _Host(), _config(tmp_path))
    service.payee.store.open(TERMS)
    service.payee.store.accept(TERMS.channel_id, [(voucher(1, 250), 0)])
    samples = parse(render(service.metrics()))
    assert samples['cocoon_channels{role="worker"}'] == 1 and samples['cocoon_channels{role="client"}'] == 0
    assert samples["cocoon_channel_earned_unsettled_nanoton"] == 250
    assert samples["cocoon_channel_deposit_left_nanoton"] == 0 and samples["cocoon_onchain_operations_total"] == 0
    assert samples['cocoon_channel_states{role="worker",state="open"}'] == 1
    assert samples['cocoon_channel_states{role="worker",state="closed"}'] == 0
    assert sum(v for k, v in samples.items() if k.startswith("cocoon_channel_states")) == 1
    service.close()


async def test_a_close_on_its_way_to_the_chain_is_waited_for_not_proposed_again(tmp_path: Path) -> None:
    """On TON a cooperative close lands a block or two after it is sent: a settlement pass in
    between (a shutdown's) must wait, not propose again and fall back to an uncooperative close."""
    from cocoon_p2p.payments.chain import ChannelOnChain
    from cocoon_p2p.payments.payee import CLOSE_GRACE_S
    from cocoon_p2p.payments.settlement import Action

    payee = Payee(B, _config(tmp_path))
    payee.store.open(TERMS)
    payee._channel_of[CLIENT] = TERMS.channel_id
    assert await payee.answer(CLIENT, pf.PayVoucher(voucher(1, 100).to_record())) == pf.PaidUpTo(100)
    terms = payee_terms(TERMS, 100, payee.store.newest(TERMS.channel_id))
    request = pf.CloseRequest(
        terms.balance_a, terms.balance_b, terms.seqno_a, terms.seqno_b, m.sign_body(terms.body(), A)
    )
    assert isinstance(await payee.answer(CLIENT, request), pf.CloseSigned)  # the client sends it on chain
    still_open = ChannelOnChain(1, 10**9, 0, bytes(A.verify_key), bytes(B.verify_key), TERMS.channel_id, 3600, 0,
                                0, 0, "0:" + "aa" * 32, "0:" + "bb" * 32)  # fmt: skip
    sent = payee._closing_since[TERMS.channel_id]
    assert payee._decide(TERMS.channel_id, still_open, 0, sent + 1, shutting_down=True) is Action.WAIT
    late = payee._decide(TERMS.channel_id, still_open, 0, sent + CLOSE_GRACE_S + 1, shutting_down=True)
    assert late is Action.CLOSE  # it never landed: the worker closes it itself
    payee.store.close()
