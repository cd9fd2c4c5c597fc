"""Random and mutated bytes into every decoder: a named RemoteProtocolError or a
valid message, never another exception, never a hang.

Decoders: capability records, announcements (with TEE claims), job frames and
the job connection, pay frames and the pay connection, vouchers (record and BOC),
Noise messages, receipts, attestation evidence and requests, TDX quotes through the verifier
(a refusal verdict, never an exception), and the OpenAI API's JSON bodies (those
answer a 400 APIError). Each property
runs ``COCOON_FUZZ_EXAMPLES`` examples (400 by default: seconds, in CI);
``python -m benchmarks.fuzz`` runs them far longer.
"""

import contextlib
import os
from pathlib import Path

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cocoon_p2p.api import openai as openai_api
from cocoon_p2p.attestation import evidence as attest
from cocoon_p2p.attestation.collateral import Collateral
from cocoon_p2p.attestation.policy import DEFAULT_POLICY
from cocoon_p2p.attestation.verifier import verify_quote
from cocoon_p2p.core.errors import RemoteProtocolError
from cocoon_p2p.core.framing import NEED_DATA
from cocoon_p2p.execution import tensors
from cocoon_p2p.jobs import connection as jobconn
from cocoon_p2p.jobs import frames as jobframes
from cocoon_p2p.jobs import receipts
from cocoon_p2p.overlay import announcement, capability
from cocoon_p2p.overlay.directory import WorkerDirectory
from cocoon_p2p.overlay.teeclaim import TeeClaim, TeeKind
from cocoon_p2p.payments import connection as payconn
from cocoon_p2p.payments import frames as pf
from cocoon_p2p.payments import vouchers
from cocoon_p2p.transport.noise import NoiseCipher, NoiseDecryptError

from .helpers import NOW, ident, record
from .helpers import announcement as make_announcement

VALID_RECORD = record(ident(1)).encode()
VALID_ANN = make_announcement(ident(1)).encode()
VALID_TEE_ANN = announcement.Announcement.create(
    ident(1), now_ms=NOW, ttl_ms=10_000, addrs=(), offers=(), running_jobs=0, tee=TeeClaim(TeeKind.TDX, b"m" * 32, NOW)
).encode()
VALID_EVIDENCE = attest.Evidence("tdx", "file", b"q" * 600, '{"x": 1}', 1, 2, '{"cc": true}').encode()
SAMPLES = Path(__file__).resolve().parent / "vectors" / "attestation"  # real quotes: see its README
FUZZ = settings(
    max_examples=int(os.environ.get("COCOON_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


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


def _feed(conn: jobconn.JobConnection | payconn.PayConnection, chunks: list[bytes]) -> None:
    """Every chunk into ``conn``, every event it yields taken out (RemoteProtocolError: it broke)."""
    for chunk in chunks:
        conn.receive_data(chunk)
        while conn.next_event() is not NEED_DATA:
            pass


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8), st.sampled_from([jobconn.Role.CLIENT, jobconn.Role.WORKER]))
def test_job_connection_stream_garbage(chunks: list[bytes], role: jobconn.Role) -> None:
    conn = jobconn.JobConnection(role, max_frame=4096)
    try:
        _feed(conn, chunks)
    except RemoteProtocolError:
        assert conn.errored is not None


# ---- pay frames, the pay connection, vouchers ---------------------------------------------

_PAY_FRAMES = [
    pf.PayHello(),
    pf.PayHello(2**127 + 5),
    pf.PayInfo("0:" + "ab" * 32),
    pf.PayInfo("0:" + "ab" * 32, bytes(104)),
    pf.PayVoucher(bytes(104)),
    pf.PaidUpTo(12345),
    pf.PayError("payment", "owes too much"),
    pf.CloseRequest(10, 20, 1, 2, bytes(64)),
]


@FUZZ
@given(msgpack_values)
def test_pay_frame_structured_garbage(value: object) -> None:
    _check(pf.decode, msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(st.sampled_from(_PAY_FRAMES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6))
def test_pay_frame_mutations(frame: pf.PayFrame, flips: list[tuple[int, int]]) -> None:
    body = pf.encode(frame)[4:]
    _check(pf.decode, _mutate(body, flips) if flips else body)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8), st.sampled_from(list(payconn.Side)))
def test_pay_connection_stream_garbage(chunks: list[bytes], side: payconn.Side) -> None:
    with contextlib.suppress(RemoteProtocolError):
        _feed(payconn.PayConnection(side), chunks)


@FUZZ
@given(st.binary(max_size=1100))
def test_voucher_random_bytes(data: bytes) -> None:
    _check(vouchers.SignedSemiChannel.from_boc, data)
    _check(vouchers.SignedSemiChannel.from_record, data)


# ---- Noise messages ----------------------------------------------------------------------


@FUZZ
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_noise_random_messages_are_refused_by_name(chunks: list[bytes]) -> None:
    cipher = NoiseCipher(bytes(32), bytes(range(32)))
    try:
        for chunk in chunks:
            assert cipher.feed(chunk) == b""  # nothing decrypts without the key
    except NoiseDecryptError:
        pass


@FUZZ
@given(st.binary(min_size=1, max_size=300), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), min_size=1))
def test_noise_tampered_message_is_refused(plain: bytes, flips: list[tuple[int, int]]) -> None:
    sender, receiver = NoiseCipher(b"k" * 32, b"r" * 32), NoiseCipher(b"r" * 32, b"k" * 32)
    sealed = sender.encrypt(plain)
    tampered = _mutate(sealed, flips)
    try:
        out = receiver.feed(tampered)
    except NoiseDecryptError:
        return
    assert out in (b"", plain) and (out == b"" or tampered[2:] == sealed[2:])  # only a changed length can hide


# ---- OpenAI JSON bodies --------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_KEYS = st.sampled_from(["model", "input", "messages", "max_tokens", "n", "encoding_format", "stream", "role"])
request_like = st.dictionaries(_KEYS, json_values, max_size=6)


@FUZZ
@given(json_values | request_like)
def test_openai_bodies_parse_or_answer_400(body: object) -> None:
    for parse in (openai_api.parse_embeddings, openai_api.parse_chat):
        try:
            parse(body)
        except openai_api.APIError as err:
            assert err.status == 400


@FUZZ
@given(st.binary(max_size=600), msgpack_values)
def test_receipts(data: bytes, value: object) -> None:
    _check(receipts.decode_receipt, data)
    _check(receipts.decode_receipt, msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(st.binary(max_size=3000))
def test_attestation_random_bytes(data: bytes) -> None:
    _check(attest.decode_evidence, data)
    _check(attest.decode_request, data)


@FUZZ
@given(msgpack_values)
def test_attestation_structured_garbage(value: object) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    _check(attest.decode_evidence, data)
    _check(attest.decode_request, data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6))
def test_attestation_mutations(flips: list[tuple[int, int]]) -> None:
    _check(attest.decode_evidence, _mutate(VALID_EVIDENCE, flips))
    _check(lambda d: announcement.decode(d, now_ms=NOW), _mutate(VALID_TEE_ANN, flips))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 5005), st.integers(0, 255)), min_size=1, max_size=8), st.integers(0, 5006))
def test_mutated_and_cut_quotes_get_a_verdict_never_an_exception(flips: list[tuple[int, int]], cut: int) -> None:
    quote, coll = _sample_quote()
    mutated = _mutate(quote, flips)[: max(cut, 1)]
    verdict = verify_quote(mutated, coll, DEFAULT_POLICY, now_s=1750331763, expected_report_data=None)
    # Signatures cover the header and TD report (0-631) and the signature and key (636-763);
    # the certificate data after them is partly not covered (see tests/vectors/attestation).
    signed_changed = len(mutated) < 764 or any(mutated[i] != quote[i] for i in [*range(632), *range(636, 764)])
    assert not (verdict.accepted and signed_changed)


_SAMPLE: list[tuple[bytes, Collateral]] = []


def _sample_quote() -> tuple[bytes, Collateral]:
    if not _SAMPLE:
        text = (SAMPLES / "tdx_quote_collateral.json").read_text()
        _SAMPLE.append(((SAMPLES / "tdx_quote").read_bytes(), Collateral.from_json(text)))
    return _SAMPLE[0]
