"""The job protocol state machine, without sockets: both ends joined by a byte pipe."""

from __future__ import annotations

import pytest

from cocoon_p2p.core.errors import LocalProtocolError, MalformedMessage, MessageTooLarge, ReplayedMessage
from cocoon_p2p.core.framing import NEED_DATA
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.jobs.connection import JobConnection, Role

MODEL = bytes(32)


def req(job_id: int) -> jf.JobRequest:
    return jf.JobRequest(job_id=job_id, model_id=MODEL, texts=("t",), deadline_ms=1, max_price_nanoton=1)


def deliver(src: bytes, dst: JobConnection) -> list[jf.Frame]:
    dst.receive_data(src)
    out = []
    while (f := dst.next_event()) is not NEED_DATA:
        out.append(f)  # type: ignore[arg-type]
    return out


def test_a_job_from_request_to_result_byte_by_byte() -> None:
    client, worker = JobConnection(Role.CLIENT), JobConnection(Role.WORKER)
    data = client.send(req(1))
    for b in data[:-1]:  # a frame split anywhere waits for the rest
        worker.receive_data(bytes([b]))
        assert worker.next_event() is NEED_DATA
    assert deliver(data[-1:], worker) == [req(1)]
    frames = [
        jf.JobAccepted(job_id=1, price_nanoton=2, unit="token"),
        jf.JobChunk(job_id=1, seq=0, token_ids=(1,)),
        jf.JobChunk(job_id=1, seq=1, token_ids=(2,)),
        jf.JobResult(job_id=1, usage_units=2, cost_nanoton=4),
    ]
    wire = b"".join(worker.send(f) for f in frames)
    assert deliver(wire, client) == frames
    assert client.jobs == {} and worker.jobs == {}


@pytest.mark.parametrize(
    ("worker_frames", "error"),
    [
        ([jf.JobChunk(job_id=1, seq=0)], "chunk before accepted"),
        ([jf.JobAccepted(job_id=1, price_nanoton=1, unit="item"), jf.JobChunk(job_id=1, seq=1)], "chunk out of order"),
        ([jf.JobResult(job_id=1, usage_units=1, cost_nanoton=1)], "result before accepted"),
        ([jf.JobError(job_id=7, code=jf.BUSY)], "unknown job"),
        ([jf.JobError(job_id=1, code=jf.BUSY), jf.JobError(job_id=1, code=jf.BUSY)], "job already ended"),
    ],
)
def test_worker_frames_out_of_order_are_remote_errors(worker_frames: list[jf.Frame], error: str) -> None:
    client = JobConnection(Role.CLIENT)
    client.send(req(1))
    wire = b"".join(jf.encode_frame(f) for f in worker_frames)
    with pytest.raises(MalformedMessage):
        deliver(wire, client)
    with pytest.raises(LocalProtocolError):  # after a remote error the connection is dead
        client.send(req(2))


def test_replayed_and_decreasing_job_ids_are_refused() -> None:
    worker = JobConnection(Role.WORKER)
    deliver(jf.encode_frame(req(5)), worker)
    with pytest.raises(ReplayedMessage):
        deliver(jf.encode_frame(req(5)), worker)
    worker2 = JobConnection(Role.WORKER)
    deliver(jf.encode_frame(req(5)), worker2)
    with pytest.raises(ReplayedMessage):
        deliver(jf.encode_frame(req(4)), worker2)


def test_cancel_that_crossed_the_result_is_ignored() -> None:
    client, worker = JobConnection(Role.CLIENT), JobConnection(Role.WORKER)
    deliver(client.send(req(1)), worker)
    to_client = worker.send(jf.JobError(job_id=1, code=jf.BUSY))
    cancel = client.send(jf.JobCancel(job_id=1))  # sent before the error arrived
    assert deliver(cancel, worker) == []
    assert deliver(to_client, client) == [jf.JobError(job_id=1, code=jf.BUSY)]


def test_each_side_may_only_send_its_own_frames() -> None:
    client, worker = JobConnection(Role.CLIENT), JobConnection(Role.WORKER)
    with pytest.raises(LocalProtocolError):
        client.send(jf.JobAccepted(job_id=1, price_nanoton=1, unit="item"))
    with pytest.raises(LocalProtocolError):
        worker.send(req(1))
    with pytest.raises(MalformedMessage):
        deliver(jf.encode_frame(req(1)), JobConnection(Role.CLIENT))


def test_oversized_length_prefix_fails_before_buffering() -> None:
    worker = JobConnection(Role.WORKER, max_frame=1024)
    with pytest.raises(MessageTooLarge) as err:
        deliver((4096).to_bytes(4, "big") + b"x", worker)
    assert err.value.code == "too-large"


def test_a_frame_too_large_to_send_leaves_no_trace() -> None:
    import numpy as np

    from cocoon_p2p.execution.tensors import from_numpy

    client = JobConnection(Role.CLIENT, max_frame=1024)
    big = jf.JobRequest(
        job_id=1,
        model_id=MODEL,
        inputs=(from_numpy("x", np.zeros((1024,), np.float32)),),
        deadline_ms=1,
        max_price_nanoton=1,
    )
    with pytest.raises(LocalProtocolError) as err:
        client.send(big)
    assert err.value.code == jf.TOO_LARGE and client.jobs == {}
    client.send(req(1))  # the id was not used up, and the connection still works
