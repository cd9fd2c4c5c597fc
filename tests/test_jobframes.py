"""Job frames: round trips, limits, and rejection of malformed input."""

from __future__ import annotations

import numpy as np
import pytest

from cocoon_p2p.core.errors import LocalProtocolError, MalformedMessage, MessageTooLarge
from cocoon_p2p.core.wire import pack
from cocoon_p2p.execution.chat_options import ChatOptions, ToolCall
from cocoon_p2p.execution.sampling import FinishReason
from cocoon_p2p.execution.tensors import Tensor, from_numpy, to_numpy
from cocoon_p2p.jobs import frames as jf

MODEL = bytes(range(32))
X = from_numpy("x", np.arange(8, dtype=np.float32).reshape(2, 4))

FRAMES: list[jf.Frame] = [
    jf.JobRequest(job_id=1, model_id=MODEL, inputs=(X,), deadline_ms=10**13, max_price_nanoton=5),
    jf.JobRequest(job_id=2, model_id=MODEL, texts=("hi", "yo"), max_tokens=16, deadline_ms=1, max_price_nanoton=0),
    jf.JobAccepted(job_id=1, price_nanoton=3, unit="item"),
    jf.JobChunk(job_id=1, seq=0, token_ids=(5, 6), text="hi"),
    jf.JobResult(job_id=1, outputs=(X,), usage_units=2, cost_nanoton=6, compute_us=10),
    # two prices, and a generation's split usage and finish reason (with and without a receipt)
    jf.JobAccepted(job_id=1, price_nanoton=3, unit="token", completion_price_nanoton=9),
    jf.JobResult(
        job_id=1, usage_units=7, cost_nanoton=4 * 3 + 3 * 9, completion_units=3, finish_reason=FinishReason.LENGTH
    ),  # fmt: skip
    jf.JobResult(
        job_id=1, usage_units=7, cost_nanoton=7, receipt=b"s" * 64, completion_units=3, finish_reason=FinishReason.STOP
    ),  # fmt: skip
    # a chat for an engine (sampling nil before it), and the tool calls it answered with
    jf.JobRequest(
        job_id=3,
        model_id=MODEL,
        texts=("p",),
        max_tokens=8,
        deadline_ms=1,
        max_price_nanoton=1,
        chat=ChatOptions(({"role": "user", "content": "hi"},), {"type": "json_object"}),
    ),  # fmt: skip
    jf.JobResult(
        job_id=1,
        usage_units=9,
        cost_nanoton=9,
        completion_units=5,
        finish_reason=FinishReason.TOOL_CALLS,
        tool_calls=(ToolCall("call_0", "get_weather", '{"city":"Paris"}'),),
    ),  # fmt: skip
    jf.JobError(job_id=1, code=jf.BUSY, message="full"),
    jf.JobCancel(job_id=1),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: jf.Frame) -> None:
    data = jf.encode_frame(frame)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert jf.decode_frame(data[4:]) == frame


def test_tensor_round_trip_keeps_values() -> None:
    a = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    assert np.array_equal(to_numpy(from_numpy("a", a)), a)
    big_endian = a.astype(">f4")
    assert np.array_equal(to_numpy(from_numpy("a", big_endian)), a)


@pytest.mark.parametrize(
    ("wire", "what"),
    [
        ([99, 1], "unknown type"),
        ([1, 1, MODEL[:31], [], [], 0, 0, 0], "short model id"),
        ([1, -1, MODEL, [], [], 0, 0, 0], "negative job id"),
        ([1, 1, MODEL, [["x", "float32", [2, 4], b"\0" * 31]], [], 0, 0, 0], "tensor bytes do not match shape"),
        ([1, 1, MODEL, [["x", "complex64", [1], b"\0" * 8]], [], 0, 0, 0], "unsupported dtype"),
        ([1, 1, MODEL, [["x", "float32", [1] * 9, b"\0" * 4]], [], 0, 0, 0], "rank above limit"),
        ([1, 1, MODEL, [], [""], 0, 0, 0], "empty text"),
        ([1, 1, MODEL, [], [], jf.MAX_TOKENS + 1, 0, 0], "too many tokens"),
        ([5, 1, "no-such-code", ""], "unknown error code"),
        ([3, 1, 0, ["a"], ""], "token id not int"),
        ([4, 1, [], 1, True, 0], "bool as int"),
        ([4, 1, [], 1, 1, 0, None, 1, "eos"], "unknown finish reason"),
        ([4, 1, [], 1, 1, 0, None, -1, "stop"], "negative completion units"),
        ([4, 1, [], 1, 1, 0, b"short", 1, "stop"], "short receipt"),
        ([2, 1, 3, "token", "9"], "completion price not an int"),
        ([1, 1, MODEL, [], ["p"], 8, 0, 0, [], None, b"[1]"], "chat options not an object"),
        ([1, 1, MODEL, [], ["p"], 8, 0, 0, [], None, b'{"messages":[]}'], "chat without messages"),
        ([1, 1, MODEL, [], ["p"], 8, 0, 0, [], None, b'{"messages":[{"role":"user"}],"x":1}'], "unknown chat key"),
        ([1, 1, MODEL, [], ["p"], 8, 0, 0, [], None, b"[" * 100_000], "chat nested too deep"),
        ([4, 1, [], 1, 1, 0, None, 1, "stop", [["id", "", "{}"]]], "tool call without a name"),
        ([4, 1, [], 1, 1, 0, None, 1, "stop", [["id", "f", "{}"]] * 17], "too many tool calls"),
        ({"a": 1}, "not an array"),
    ],
)
def test_malformed_frames_are_rejected(wire: object, what: str) -> None:
    with pytest.raises(MalformedMessage):
        jf.decode_frame(pack(wire))


def test_size_limits() -> None:
    with pytest.raises(MessageTooLarge):
        jf.decode_frame(b"\x90" * 100, max_frame=50)
    big = from_numpy("x", np.zeros((1024, 1024), dtype=np.float32))
    req = jf.JobRequest(job_id=1, model_id=MODEL, inputs=(big,), deadline_ms=1, max_price_nanoton=1)
    with pytest.raises(LocalProtocolError) as err:
        jf.encode_frame(req, max_frame=1 << 20)
    assert err.value.code == jf.TOO_LARGE


def test_tensor_checks_itself() -> None:
    with pytest.raises(LocalProtocolError):
        Tensor("x", "float32", (2,), b"\0" * 4)
    with pytest.raises(LocalProtocolError):
        jf.JobError(job_id=1, code="made-up")


def test_golden_vectors() -> None:
    """The exact bytes of each frame type: the wire format may not drift without a
    version bump (other implementations test against tests/vectors/jobframes.json)."""
    import json
    from pathlib import Path

    vec = json.loads((Path(__file__).parent / "vectors" / "jobframes.json").read_text())
    assert [v["type"] for v in vec["frames"]] == [type(f).__name__ for f in FRAMES]
    for v, frame in zip(vec["frames"], FRAMES, strict=True):
        data = bytes.fromhex(v["hex"])
        assert jf.encode_frame(frame) == data
        assert jf.decode_frame(data[4:]) == frame
