"""Random and mutated bytes into every decoder: a named RemoteProtocolError or a
valid message, never another exception, never a hang."""

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cocoon_p2p.core.errors import RemoteProtocolError
from cocoon_p2p.core.framing import NEED_DATA
from cocoon_p2p.execution import tensors
from cocoon_p2p.jobs import connection as jobconn
from cocoon_p2p.jobs import frames as jobframes
from cocoon_p2p.overlay import announcement, capability
from cocoon_p2p.overlay.directory import WorkerDirectory

from .helpers import NOW, ident, record
from .helpers import announcement as make_announcement

VALID_RECORD = record(ident(1)).encode()
VALID_ANN = make_announcement(ident(1)).encode()
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, val in flips:
        buf[pos % len(buf)] = val
    return bytes(buf)


def _check(decode, data: bytes) -> None:  # type: ignore[no-untyped-def]
    try:
        decode(data)
    except RemoteProtocolError:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=80) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=16) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=40,
)


@FUZZ
@given(st.binary(max_size=5000))
def test_random_bytes(data: bytes) -> None:
    _check(lambda d: capability.decode(d, now_ms=NOW), data)
    _check(lambda d: announcement.decode(d, now_ms=NOW), data)
    _check(lambda d: capability.decode_for_key(record(ident(1)).dht_key(), d, now_ms=NOW), data)


@FUZZ
@given(msgpack_values)
def test_random_msgpack_structures(value: object) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    _check(lambda d: capability.decode(d, now_ms=NOW), data)
    _check(lambda d: announcement.decode(d, now_ms=NOW), data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_valid_messages(flips: list[tuple[int, int]]) -> None:
    _check(lambda d: capability.decode(d, now_ms=NOW), _mutate(VALID_RECORD, flips))
    d = WorkerDirectory()
    _check(lambda x: d.receive_announcement(x, origin=None, now_ms=NOW), _mutate(VALID_ANN, flips))


@FUZZ
@given(st.text(max_size=300), st.binary(max_size=300))
def test_random_dht_keys(key: str, value: bytes) -> None:
    _check(lambda v: capability.decode_for_key(key, v, now_ms=NOW), value)
    _check(lambda k: capability.decode_for_key(k, VALID_RECORD, now_ms=NOW), key)  # type: ignore[arg-type]


# ---- job frames and the job connection ------------------------------------------------

_JOB_REQ = jobframes.encode_frame(
    jobframes.JobRequest(
        job_id=3,
        model_id=bytes(32),
        inputs=(tensors.Tensor("x", "float32", (2, 2), bytes(16)),),
        deadline_ms=1,
        max_price_nanoton=1,
    )
)[4:]


@FUZZ
@given(st.binary(max_size=300))
def test_job_frame_random_bytes(data: bytes) -> None:
    _check(jobframes.decode_frame, data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_job_frame_mutations(flips: list[tuple[int, int]]) -> None:
    _check(jobframes.decode_frame, _mutate(_JOB_REQ, flips))


@FUZZ
@given(msgpack_values)
def test_job_frame_structured_garbage(value: object) -> None:
    _check(jobframes.decode_frame, msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8), st.sampled_from([jobconn.Role.CLIENT, jobconn.Role.WORKER]))
def test_job_connection_stream_garbage(chunks: list[bytes], role: jobconn.Role) -> None:
    conn = jobconn.JobConnection(role, max_frame=4096)
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while conn.next_event() is not NEED_DATA:
                pass
    except RemoteProtocolError:
        assert conn.errored is not None
