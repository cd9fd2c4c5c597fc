"""The yamux state machine without sockets: two machines joined by a function."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cocoon_p2p.transport import yamux
from cocoon_p2p.transport.yamux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    ConnectionTerminated,
    DataReceived,
    PongReceived,
    StreamClosedError,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    YamuxConnection,
    YamuxProtocolError,
)

WINDOW = 1 << 20


def pair(**kw: int) -> tuple[YamuxConnection, YamuxConnection]:
    return YamuxConnection(client=True, window=WINDOW, **kw), YamuxConnection(client=False, window=WINDOW, **kw)


def carry(src: YamuxConnection, dst: YamuxConnection) -> list[yamux.Event]:
    return dst.receive_data(src.data_to_send())


def header(typ: int, flags: int, stream_id: int, length: int) -> bytes:
    return struct.pack(">BBHII", 0, typ, flags, stream_id, length)


def opened(a: YamuxConnection, b: YamuxConnection) -> int:
    sid = a.open_stream()
    assert carry(a, b) == [StreamOpened(sid)]
    assert carry(b, a) == [WindowUpdated(sid)]  # the ACK grants the rest of the window
    return sid


def test_open_is_a_window_update_with_syn_and_the_extra_credit() -> None:
    a, _ = pair()
    assert a.open_stream() == 1
    assert a.data_to_send() == header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, WINDOW - INITIAL_WINDOW)
    assert a.open_stream() == 3  # the initiator's ids are odd
    b = YamuxConnection(client=False)
    assert b.open_stream() == 2


def test_data_both_ways_and_credit() -> None:
    a, b = pair()
    sid = a.open_stream()
    # Before the peer's ACK only the spec's initial window may be sent.
    assert a.send_data(sid, b"x" * (INITIAL_WINDOW + 10)) == INITIAL_WINDOW
    events = carry(a, b)
    assert events[0] == StreamOpened(sid)
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == INITIAL_WINDOW
    assert carry(b, a) == [WindowUpdated(sid)]
    assert a.send_window(sid) == WINDOW - INITIAL_WINDOW
    assert b.send_data(sid, b"reply") == 5
    assert carry(b, a) == [DataReceived(sid, b"reply")]


def test_frames_are_at_most_max_frame() -> None:
    a, b = pair()
    sid = opened(a, b)
    a.max_frame = 1000
    a.send_data(sid, b"y" * 2500)
    events = carry(a, b)
    assert [len(e.data) for e in events if isinstance(e, DataReceived)] == [1000, 1000, 500]


def test_credit_returns_after_half_a_window_is_consumed() -> None:
    a, b = pair()
    sid = opened(a, b)
    assert a.send_data(sid, b"z" * (2 * WINDOW)) == WINDOW  # the whole window, no more
    assert a.send_data(sid, b"z") == 0
    carry(a, b)
    b.acknowledge_received(sid, WINDOW // 2 - 1)
    assert b.data_to_send() == b""  # not yet half
    b.acknowledge_received(sid, 1)
    assert b.data_to_send() == header(TYPE_WINDOW_UPDATE, 0, sid, WINDOW // 2)
    a.receive_data(header(TYPE_WINDOW_UPDATE, 0, sid, WINDOW // 2))
    assert a.send_window(sid) == WINDOW // 2


def test_half_close_then_full_close() -> None:
    a, b = pair()
    sid = opened(a, b)
    a.send_data(sid, b"request")
    a.end_stream(sid)
    assert carry(a, b) == [DataReceived(sid, b"request"), StreamEnded(sid)]
    with pytest.raises(StreamClosedError):
        a.send_data(sid, b"more")
    b.send_data(sid, b"response")
    b.end_stream(sid)
    assert not b.is_open(sid)  # both sides closed: forgotten
    assert carry(b, a) == [DataReceived(sid, b"response"), StreamEnded(sid)]
    assert not a.is_open(sid)


def test_reset_and_late_frames() -> None:
    a, b = pair()
    sid = opened(a, b)
    b.reset_stream(sid)
    assert b.data_to_send() == header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
    a.send_data(sid, b"in flight")
    assert a.receive_data(header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)) == [StreamReset(sid)]
    assert carry(a, b) == []  # data for a stream b reset is dropped
    with pytest.raises(StreamClosedError):
        a.send_data(sid, b"x")
    b.reset_stream(sid)  # twice is harmless
    assert b.data_to_send() == b""


def test_ping_is_answered_and_pong_reported() -> None:
    a, b = pair()
    opaque = a.ping()
    assert carry(a, b) == []
    assert b.data_to_send() == header(TYPE_PING, FLAG_ACK, 0, opaque)
    a.receive_data(header(TYPE_PING, FLAG_ACK, 0, opaque))
    assert a.receive_data(header(TYPE_PING, FLAG_ACK, 0, 77)) == [PongReceived(77)]


def test_go_away_stops_new_streams() -> None:
    a, b = pair()
    b.go_away()
    assert carry(b, a) == [ConnectionTerminated(0)]
    with pytest.raises(yamux.LocalProtocolError):
        a.open_stream()
    # b refuses streams after its own GO_AWAY
    sid = YamuxConnection(client=True).open_stream()
    assert b.receive_data(header(TYPE_WINDOW_UPDATE, FLAG_SYN, sid, 0)) == []
    assert b.data_to_send() == header(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)


def test_inbound_streams_over_the_limit_are_reset() -> None:
    a, b = pair(max_inbound_streams=2)
    ids = [a.open_stream() for _ in range(3)]
    events = carry(a, b)
    assert events == [StreamOpened(ids[0]), StreamOpened(ids[1])]
    assert b.stats.streams_refused == 1
    assert a.receive_data(b.data_to_send())[-1] == StreamReset(ids[2])
    b.reset_stream(ids[0])  # a slot frees up
    assert a.receive_data(b.data_to_send()) == [StreamReset(ids[0])]
    sid = a.open_stream()
    assert carry(a, b) == [StreamOpened(sid)]


def test_a_syn_may_carry_data_and_fin() -> None:
    _, b = pair()
    got = b.receive_data(header(TYPE_DATA, FLAG_SYN | FLAG_FIN, 1, 3) + b"abc")
    assert got == [StreamOpened(1), DataReceived(1, b"abc"), StreamEnded(1)]


def test_bytes_split_anywhere_give_the_same_events() -> None:
    a, b = pair()
    sid = a.open_stream()
    a.send_data(sid, bytes(range(256)) * 40)
    a.end_stream(sid)
    wire = a.data_to_send()
    whole = YamuxConnection(client=False, window=WINDOW).receive_data(wire)
    for step in (1, 5, 12, 13, 1000):
        c = YamuxConnection(client=False, window=WINDOW)
        events = [e for i in range(0, len(wire), step) for e in c.receive_data(wire[i : i + step])]
        data = b"".join(e.data for e in events if isinstance(e, DataReceived))
        assert data == bytes(range(256)) * 40
        assert [e for e in events if not isinstance(e, DataReceived)] == [
            e for e in whole if not isinstance(e, DataReceived)
        ]


@pytest.mark.parametrize(
    "frame, why",
    [
        (struct.pack(">BBHII", 1, TYPE_DATA, 0, 1, 0), "version"),
        (header(9, 0, 0, 0), "unknown frame type"),
        (header(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0), "parity"),  # an even id from the initiator
        (header(TYPE_WINDOW_UPDATE, FLAG_SYN, 0, 0), "parity"),
        (header(TYPE_DATA, 0, 1, WINDOW + 1), "DATA frame of"),
        (header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) * 2, "live stream"),
        (header(TYPE_DATA, FLAG_SYN, 1, WINDOW) + b"q" * WINDOW + header(TYPE_DATA, 0, 1, 1) + b"q", "receive window"),
        (header(TYPE_DATA, FLAG_SYN | FLAG_FIN, 1, 0) + header(TYPE_DATA, 0, 1, 1) + b"q", "after FIN"),
        (header(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + header(TYPE_WINDOW_UPDATE, 0, 1, 0xFFFFFFFF), "overflows"),
    ],
)
def test_protocol_violations_are_named(frame: bytes, why: str) -> None:
    b = YamuxConnection(client=False, window=WINDOW)
    b.max_frame = WINDOW
    with pytest.raises(YamuxProtocolError, match=why):
        b.receive_data(frame)


def test_go_away_frame_codes() -> None:
    a, b = pair()
    a.go_away(yamux.GO_AWAY_PROTOCOL_ERROR)
    a.go_away()  # once only
    assert a.data_to_send() == header(TYPE_GO_AWAY, 0, 0, yamux.GO_AWAY_PROTOCOL_ERROR)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=12))
def test_random_bytes_give_events_or_a_protocol_error(chunks: list[bytes]) -> None:
    b = YamuxConnection(client=False, window=INITIAL_WINDOW)
    try:
        for chunk in chunks:
            for event in b.receive_data(chunk):
                assert isinstance(event, yamux.Event.__args__)  # type: ignore[attr-defined]
            b.data_to_send()
    except YamuxProtocolError:
        pass
