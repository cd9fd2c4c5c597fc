"""The pay protocol's frames: exact round trips, named errors for anything malformed."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from cocoon_p2p.core.errors import MalformedMessage, MessageTooLarge, RemoteProtocolError
from cocoon_p2p.core.framing import NeedData
from cocoon_p2p.payments import frames as pf
from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody

KEY = SigningKey(bytes([3]) * 32)
RECORD = SemiChannel(0xC0C0A, SemiChannelBody(7, 123)).sign(KEY).to_record()
SIG = bytes(range(64))
FRAMES: list[pf.PayFrame] = [
    pf.PayHello(),
    pf.PayInfo("0:" + "ab" * 32),
    pf.ChannelOpened("0:" + "cd" * 32),
    pf.ChannelReady(2**127 + 5, 10**9, RECORD),
    pf.PayVoucher(RECORD),
    pf.PaidUpTo(14_000_000),
    pf.PayError("replayed", "voucher seqno 3 is not above 3"),
    pf.CloseRequest(986_000_000, 14_000_000, 7, 1, SIG),
    pf.CloseSigned(SIG),
    pf.CloseProposal(986_000_000, 14_000_000, 7, 1, SIG),
    pf.CloseAgreed(SIG),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_every_frame_round_trips_through_the_reader(frame: pf.PayFrame) -> None:
    data = pf.encode(frame)
    reader = pf.FrameReader()
    for i in range(len(data)):  # byte by byte: frames span reads
        assert isinstance(reader.next(), NeedData)
        reader.feed(data[i : i + 1])
    assert reader.next() == frame
    assert isinstance(reader.next(), NeedData)


@pytest.mark.parametrize(
    "wire",
    [
        [],
        [99],
        [1, "extra"],
        [4, b"\x00" * 16, 10],  # channel ready without B's state
        [4, b"\x00" * 15, 10, RECORD],  # short channel id
        [10, 1, 2, 3, 4, b"short"],  # proposal with a bad signature
        [11, SIG + b"x"],
        [5, b"\x00" * 50],  # truncated voucher record
        [6, -1],
    ],
)
def test_malformed_frames_are_named_errors(wire: list[object]) -> None:
    with pytest.raises(MalformedMessage):
        pf.decode(msgpack.packb(wire, use_bin_type=True))


def test_oversized_frames_are_refused_before_buffering_them() -> None:
    reader = pf.FrameReader()
    reader.feed((pf.MAX_PAY_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(MessageTooLarge) as err:
        reader.next()
    assert err.value.code == "too-large"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    try:
        pf.decode(data)
    except RemoteProtocolError:
        pass
