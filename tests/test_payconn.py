"""The pay protocol's rules of order (sans-IO, no sockets): every frame in every state, both ends."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from cocoon_p2p.core.errors import LocalProtocolError, MessageTooLarge, RemoteProtocolError
from cocoon_p2p.core.framing import NEED_DATA
from cocoon_p2p.payments import frames as pf
from cocoon_p2p.payments.connection import PayConnection, PayState, Side, UnexpectedFrame
from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody

REQ, RESP = Side.REQUESTER, Side.RESPONDER
RECORD = SemiChannel(0xC0C0A, SemiChannelBody(1, 10)).sign(SigningKey(bytes([3]) * 32)).to_record()
SIG = bytes(64)
HELLO, INFO = pf.PayHello(), pf.PayInfo("0:" + "ab" * 32)
OPENED, READY = pf.ChannelOpened("0:" + "cd" * 32), pf.ChannelReady(5, 10**9, RECORD)
VOUCHER, PAID = pf.PayVoucher(RECORD), pf.PaidUpTo(10)
CLOSE, SIGNED = pf.CloseRequest(90, 10, 1, 1, SIG), pf.CloseSigned(SIG)
PROPOSAL, AGREED = pf.CloseProposal(90, 10, 1, 1, SIG), pf.CloseAgreed(SIG)
ERROR = pf.PayError(pf.PayErrorCode.CHANNEL, "no channel with you")
ALL = [HELLO, INFO, OPENED, READY, VOUCHER, PAID, ERROR, CLOSE, SIGNED, PROPOSAL, AGREED]

# The rules, written out again independently of the module's table: (state, sender) -> frames allowed.
CLIENT_REQUESTS = [HELLO, OPENED, VOUCHER, CLOSE]
ALLOWED: dict[tuple[PayState, Side], list[pf.PayFrame]] = {
    (PayState.START, REQ): [*CLIENT_REQUESTS, PROPOSAL],
    (PayState.CLIENT_IDLE, REQ): CLIENT_REQUESTS,
    (PayState.WORKER_IDLE, REQ): [PROPOSAL],
    (PayState.AWAITING_INFO, RESP): [INFO, ERROR],
    (PayState.AWAITING_READY, RESP): [READY, ERROR],
    (PayState.AWAITING_PAID, RESP): [PAID, ERROR],
    (PayState.AWAITING_CLOSE_SIGNED, RESP): [SIGNED, ERROR],
    (PayState.AWAITING_AGREED, RESP): [AGREED, ERROR],
}
# How to reach each state from START: (sender, frame) steps.
PATHS: dict[PayState, list[tuple[Side, pf.PayFrame]]] = {
    PayState.START: [],
    PayState.CLIENT_IDLE: [(REQ, HELLO), (RESP, INFO)],
    PayState.WORKER_IDLE: [(REQ, PROPOSAL), (RESP, AGREED)],
    PayState.AWAITING_INFO: [(REQ, HELLO)],
    PayState.AWAITING_READY: [(REQ, HELLO), (RESP, INFO), (REQ, OPENED)],
    PayState.AWAITING_PAID: [(REQ, VOUCHER)],
    PayState.AWAITING_CLOSE_SIGNED: [(REQ, VOUCHER), (RESP, PAID), (REQ, CLOSE)],
    PayState.AWAITING_AGREED: [(REQ, PROPOSAL)],
}


def pair_in(state: PayState) -> dict[Side, PayConnection]:
    """Both ends of one stream, joined by a fake link and driven into ``state``."""
    ends = {REQ: PayConnection(REQ), RESP: PayConnection(RESP)}
    for sender, frame in PATHS[state]:
        deliver(ends, sender, frame)
    assert ends[REQ].state is ends[RESP].state is state
    return ends


def deliver(ends: dict[Side, PayConnection], sender: Side, frame: pf.PayFrame) -> None:
    """``sender`` sends ``frame``; the other end receives it whole."""
    receiver = ends[RESP if sender is REQ else REQ]
    receiver.receive_data(ends[sender].send(frame))
    assert receiver.next_event() == frame
    assert receiver.next_event() is NEED_DATA


CASES = [(state, sender, frame) for state in PATHS for sender in (REQ, RESP) for frame in ALL]


@pytest.mark.parametrize(
    ("state", "sender", "frame"), CASES, ids=[f"{s.value}-{d.value}-{type(f).__name__}" for s, d, f in CASES]
)
def test_every_frame_in_every_state_from_both_ends(state: PayState, sender: Side, frame: pf.PayFrame) -> None:
    allowed = frame in ALLOWED.get((state, sender), [])
    ends = pair_in(state)
    if allowed:
        deliver(ends, sender, frame)
        assert ends[REQ].state is ends[RESP].state is not PayState.ERROR
        return
    with pytest.raises(LocalProtocolError):  # our own side refuses to send it...
        ends[sender].send(frame)
    assert ends[sender].state is state  # ...and nothing changed
    receiver = ends[RESP if sender is REQ else REQ]
    receiver.receive_data(pf.encode(frame))  # a peer that sends it anyway
    with pytest.raises(UnexpectedFrame) as err:
        receiver.next_event()
    assert err.value.code == "protocol" and isinstance(err.value, RemoteProtocolError)
    assert receiver.state is PayState.ERROR
    with pytest.raises(LocalProtocolError):
        receiver.next_event()


@pytest.mark.parametrize(
    ("request_frame", "replies", "idle"),
    [
        (HELLO, [INFO, ERROR], PayState.CLIENT_IDLE),
        (OPENED, [READY, ERROR], PayState.CLIENT_IDLE),
        (VOUCHER, [PAID, ERROR], PayState.CLIENT_IDLE),
        (CLOSE, [SIGNED, ERROR], PayState.CLIENT_IDLE),
        (PROPOSAL, [AGREED, ERROR], PayState.WORKER_IDLE),
    ],
)
def test_each_request_takes_its_reply_or_an_error_then_the_stream_is_idle(
    request_frame: pf.PayFrame, replies: list[pf.PayFrame], idle: PayState
) -> None:
    for reply in replies:
        ends = pair_in(PayState.START)
        deliver(ends, REQ, request_frame)
        assert ends[REQ].awaiting_reply and ends[RESP].awaiting_reply
        deliver(ends, RESP, reply)
        assert ends[REQ].state is ends[RESP].state is idle and not ends[REQ].awaiting_reply


def test_frames_split_across_reads_come_out_whole() -> None:
    ends = pair_in(PayState.START)
    data = ends[REQ].send(VOUCHER)
    for i in range(len(data) - 1):
        ends[RESP].receive_data(data[i : i + 1])
        assert ends[RESP].next_event() is NEED_DATA
    ends[RESP].receive_data(data[-1:])
    assert ends[RESP].next_event() == VOUCHER


def test_a_responder_may_say_why_once_after_the_peer_broke_the_rules() -> None:
    ends = pair_in(PayState.START)
    ends[RESP].receive_data(pf.encode(INFO))  # a reply where a request was due
    with pytest.raises(UnexpectedFrame) as err:
        ends[RESP].next_event()
    assert ends[RESP].errored is err.value
    why = pf.PayError(err.value.code, str(err.value))
    assert pf.decode(ends[RESP].send(why)[4:]) == why
    with pytest.raises(LocalProtocolError):
        ends[RESP].send(why)  # only once


def test_a_requester_never_answers_a_broken_reply() -> None:
    ends = pair_in(PayState.AWAITING_PAID)
    ends[REQ].receive_data(pf.encode(INFO))
    with pytest.raises(UnexpectedFrame):
        ends[REQ].next_event()
    with pytest.raises(LocalProtocolError):
        ends[REQ].send(ERROR)


def test_an_oversized_frame_breaks_the_stream_before_it_is_buffered() -> None:
    conn = PayConnection(RESP)
    conn.receive_data((pf.MAX_PAY_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(MessageTooLarge):
        conn.next_event()
    assert conn.state is PayState.ERROR


def test_a_failed_write_leaves_the_stream_unusable() -> None:
    conn = PayConnection(REQ)
    conn.send(HELLO)
    conn.send_failed()
    assert conn.state is PayState.ERROR
    for call in (lambda: conn.send(OPENED), conn.next_event, lambda: conn.receive_data(b"x")):
        with pytest.raises(LocalProtocolError):
            call()
