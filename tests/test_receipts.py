"""Signed receipts and the client's receipt log (pure: no sockets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cocoon_p2p.core import wire
from cocoon_p2p.core.errors import BadSignature, MalformedMessage, MessageTooLarge
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.execution.tensors import from_numpy
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.jobs.receiptlog import ReceiptLog, read_receipts
from cocoon_p2p.jobs.receipts import Receipt, decode_receipt, inputs_digest, outputs_digest

WORKER, CLIENT = Identity(bytes([7]) * 32), Identity(bytes([9]) * 32)  # fixed: parameter ids must not vary
X = from_numpy("x", np.arange(8, dtype=np.float32).reshape(2, 4))


def receipt(job_id: int = 1, **over: object) -> Receipt:
    fields: dict[str, object] = {
        "worker": WORKER.peer_id,
        "client": CLIENT.peer_id,
        "job_id": job_id,
        "model_id": b"m" * 32,
        "inputs_digest": inputs_digest(b"m" * 32, (X,), (), 0),
        "outputs_digest": outputs_digest((X,), ()),
        "usage_units": 2,
        "cost_nanoton": 6,
    }
    return Receipt(**{**fields, **over}).signed_by(WORKER)  # type: ignore[arg-type]


def test_a_receipt_verifies_and_round_trips() -> None:
    r = receipt()
    r.verify()
    assert decode_receipt(r.encode()) == r
    assert len(r.encode()) < 300


@pytest.mark.parametrize(
    "field, value",
    [
        ("job_id", 2),
        ("cost_nanoton", 7),
        ("usage_units", 3),
        ("outputs_digest", b"\x00" * 32),
        ("client", WORKER.peer_id),
    ],
)
def test_any_changed_field_breaks_the_signature(field: str, value: object) -> None:
    r = receipt()
    forged = Receipt(**{**r.__dict__, field: value})
    with pytest.raises(BadSignature):
        forged.verify()
    with pytest.raises(BadSignature):
        decode_receipt(forged.encode())


def test_only_the_worker_signs_its_receipt() -> None:
    with pytest.raises(ValueError):
        Receipt(**{**receipt().__dict__, "signature": b""}).signed_by(CLIENT)


def test_the_digests_cover_what_was_asked_and_returned() -> None:
    m = b"m" * 32
    assert inputs_digest(m, (X,), (), 0) != inputs_digest(m, (X,), (), 1)
    assert inputs_digest(m, (), ("a",), 0) != inputs_digest(m, (), ("b",), 0)
    assert inputs_digest(m, (X,), (), 0) != inputs_digest(b"n" * 32, (X,), (), 0)
    assert outputs_digest((), (1, 2)) != outputs_digest((), (1, 2, 3))
    assert outputs_digest((X,), ()) != outputs_digest((from_numpy("x", np.zeros((2, 4), np.float32)),), ())


@pytest.mark.parametrize(
    "data, error",
    [
        (b"\x00" * 600, MessageTooLarge),
        (wire.pack([1, 2, 3]), MalformedMessage),
        (wire.pack([2, *receipt().encode()[1:2]]), MalformedMessage),
    ],
)
def test_malformed_receipts_are_typed_errors(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_receipt(data)


def test_a_result_frame_carries_the_signature_and_an_old_one_still_decodes() -> None:
    sig = receipt().signature
    frame = jf.JobResult(job_id=1, outputs=(X,), usage_units=2, cost_nanoton=6, receipt=sig)
    assert jf.decode_frame(jf.encode_frame(frame)[4:]) == frame
    bare = jf.JobResult(job_id=1, usage_units=2, cost_nanoton=6)
    assert jf.decode_frame(jf.encode_frame(bare)[4:]).receipt == b""  # type: ignore[union-attr]
    with pytest.raises(MalformedMessage):
        jf.decode_frame(wire.pack([4, 1, [], 2, 6, 0, b"short"]))


def test_the_log_keeps_the_newest_receipts_within_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "receipts.log"
    log = ReceiptLog(path, max_bytes=2000)
    for i in range(43):
        log.append(receipt(job_id=i))
    kept = [r.job_id for r in log]
    assert kept == list(range(43 - len(kept), 43)) and 8 <= len(kept) < 43  # newest, in order
    assert path.stat().st_size < 2000 + 300 and path.with_name("receipts.log.1").stat().st_size >= 2000
    log.close()
    before = [r.job_id for r in read_receipts(path)]
    with path.open("ab") as f:
        f.write(b"\x01\x00torn")  # a crash mid-record
    assert before and [r.job_id for r in read_receipts(path)] == before


def test_a_verify_job_request_round_trips_and_is_bounded() -> None:
    req = jf.JobRequest(
        job_id=3,
        model_id=b"m" * 32,
        texts=("hi",),
        max_tokens=4,
        deadline_ms=1,
        max_price_nanoton=1,
        verify_tokens=(5, 6),
    )
    assert jf.decode_frame(jf.encode_frame(req)[4:]) == req
    assert jf.usage_bound(req) == 2 + 2  # the prompt's bytes and the tokens checked
    plain = jf.JobRequest(job_id=3, model_id=b"m" * 32, texts=("hi",), max_tokens=4, deadline_ms=1, max_price_nanoton=1)
    assert len(jf.encode_frame(plain)) < len(jf.encode_frame(req))  # the field is absent from other jobs
    with pytest.raises(MalformedMessage):
        jf.decode_frame(wire.pack([1, 3, b"m" * 32, [], ["hi"], 4, 1, 1, []]))  # nothing to verify
    m = b"m" * 32
    assert inputs_digest(m, (), ("hi",), 4) != inputs_digest(m, (), ("hi",), 4, (5, 6))  # the receipt binds them
