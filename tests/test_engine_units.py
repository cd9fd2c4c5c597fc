"""The engine backend's pure parts: SSE decoding, completion chunks, a generation over a
scripted stream, request bodies, health transitions, usage bounds and the receipt's text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cocoon_p2p.core.errors import LocalProtocolError, MalformedMessage
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.chat_options import MAX_OPTIONS_BYTES, ChatOptions, ToolCall
from cocoon_p2p.execution.engine import (
    EngineError,
    EngineFault,
    EngineGeneration,
    EngineKind,
    fault_for_status,
    offer_backend,
)
from cocoon_p2p.execution.engine_runner import EngineHealth, EngineRunner, Probe
from cocoon_p2p.execution.engine_stream import (
    DONE,
    ENDED,
    MIN_LOGPROB,
    NEED_DATA,
    EngineStreamError,
    SseDecoder,
    SseEvent,
    Usage,
    parse_chunk,
)
from cocoon_p2p.execution.executor import Executor, RunRequest
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.sampling import FinishReason, Sampling, TokenLogprob
from cocoon_p2p.jobs.receipts import outputs_digest


def _events(decoder: SseDecoder) -> list[object]:
    out: list[object] = []
    while (e := decoder.next_event()) is not NEED_DATA:
        out.append(e)
        if e is ENDED:
            break
    return out


@pytest.mark.parametrize(
    ("feeds", "want"),
    [
        ([b"data: a\n\n"], [SseEvent("a")]),
        ([b"data: a\r\n\r\ndata: b\n\n"], [SseEvent("a"), SseEvent("b")]),  # CRLF (sse_starlette's default)
        ([b"da", b"ta: a", b"\n", b"\n"], [SseEvent("a")]),  # split anywhere
        ([b": ping - 2024\n\ndata: x\n\n"], [SseEvent("x")]),  # comments are keep-alives
        ([b"event: e\nid: 1\ndata: 1\ndata: 2\n\n"], [SseEvent("1\n2")]),  # data lines joined
        ([b"data: last", b""], [SseEvent("last"), ENDED]),  # a body ending without its newline
        ([b"data: [DONE]\n\n", b""], [SseEvent("[DONE]"), ENDED]),
        ([b""], [ENDED]),
    ],
)
def test_sse_decoder(feeds: list[bytes], want: list[object]) -> None:
    d = SseDecoder()
    got: list[object] = []
    for data in feeds:
        d.receive_data(data)
        got += _events(d)
    assert got == want


def test_sse_line_limit() -> None:
    d = SseDecoder(max_line=16)
    d.receive_data(b"data: " + b"x" * 32)
    with pytest.raises(EngineStreamError):
        d.next_event()


def _chunk(text: str | None = None, **extra: Any) -> str:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": extra.pop("finish", None)}
    if "logprobs" in extra:
        choice["logprobs"] = extra.pop("logprobs")
    return json.dumps({"id": "c", "object": "text_completion", "choices": [choice], **extra})


@pytest.mark.parametrize(
    ("data", "text", "finish", "usage", "n_logprobs"),
    [
        (_chunk("Hi"), "Hi", None, None, 0),
        (_chunk("", finish="length"), "", "length", None, 0),
        # vLLM/SGLang: the usage report in a last chunk without choices
        (json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}), "", None, Usage(7, 3), 0),
        (json.dumps({"choices": [], "usage": {"prompt_tokens": -1, "completion_tokens": 3}}), "", None, None, 0),
        (json.dumps({"choices": [{"index": 0, "delta": {"content": "chat"}}]}), "chat", None, None, 0),
        (_chunk("\ud83d"), "?", None, None, 0),  # a lone surrogate from a JSON escape
        (
            _chunk(
                " a", logprobs={"tokens": [" a", "b"], "token_logprobs": [-0.5, None], "top_logprobs": [None, None]}
            ),
            " a",
            None,
            None,
            2,
        ),
    ],
)
def test_parse_chunk(data: str, text: str, finish: str | None, usage: Usage | None, n_logprobs: int) -> None:
    chunk = parse_chunk(data)
    assert (chunk.text, chunk.finish_reason, chunk.usage, len(chunk.logprobs)) == (text, finish, usage, n_logprobs)


def test_parse_chunk_logprobs_ranked_and_bounded() -> None:
    # llama-cpp-python puts the chosen token among its top alternatives (k + 1 of them)
    lp = {"tokens": ["x"], "token_logprobs": [-0.1], "top_logprobs": [{"y": -3.0, "x": -0.1, "z": float("-inf")}]}
    chunk = parse_chunk(_chunk("x", logprobs=lp).replace("-Infinity", "-1e400"), top_logprobs=2)
    (entry,) = chunk.logprobs
    assert entry.token == "x" and entry.logprob == pytest.approx(-0.1)
    assert entry.top == (("x", pytest.approx(-0.1)), ("y", -3.0))
    chunk = parse_chunk(_chunk("x", logprobs={**lp, "top_logprobs": [{"z": -1e400}]}), top_logprobs=1)
    assert chunk.logprobs[0].top == (("z", MIN_LOGPROB),)


@pytest.mark.parametrize(
    "data",
    ["not json", "[1, 2]", json.dumps({"error": {"message": "boom"}}), json.dumps({"choices": "x"})],
)
def test_parse_chunk_refuses(data: str) -> None:
    with pytest.raises(EngineStreamError):
        parse_chunk(data)
    assert parse_chunk("[DONE]") is DONE


@pytest.mark.parametrize(
    ("status", "fault", "code"),
    [
        (400, EngineFault.REJECTED, "bad-input"),
        (404, EngineFault.REJECTED, "bad-input"),
        (413, EngineFault.TOO_LARGE, "too-large"),
        (429, EngineFault.OVERLOADED, "busy"),
        (500, EngineFault.FAILED, "backend"),
        (503, EngineFault.FAILED, "backend"),
    ],
)
def test_http_status_to_job_code(status: int, fault: EngineFault, code: str) -> None:
    assert fault_for_status(status) is fault
    assert EngineError(fault, "x").code == code
    assert EngineError(EngineFault.UNREACHABLE, "x").code == EngineError(EngineFault.TIMEOUT, "x").code == "backend"


class ScriptedStream:
    """An EngineStream that hands out prepared byte pieces (or raises one)."""

    def __init__(self, pieces: list[bytes | Exception]) -> None:
        self.pieces = list(pieces)
        self.opened = self.closed = 0

    def open(self) -> None:
        self.opened += 1

    def read(self) -> bytes:
        if self.closed or not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if isinstance(piece, Exception):
            raise piece
        return piece

    def close(self) -> None:
        self.closed += 1


def _sse(*datas: str) -> bytes:
    return b"".join(f"data: {d}\n\n".encode() for d in datas)


def _drain(gen: EngineGeneration) -> list[str]:
    out = []
    while (step := gen.next_step()) is not None:
        assert not step.token_ids  # an engine streams no token ids
        out.append(step.text)
    return out


def test_generation_streams_deltas_and_bills_the_engines_usage() -> None:
    stream = ScriptedStream(
        [
            _sse(_chunk("Hel"), _chunk("")),  # an empty delta is no chunk
            _sse(_chunk("lo", finish="length")),
            _sse(json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}), "[DONE]"),
        ]
    )
    gen = EngineGeneration(stream, prompt="abcdef", max_tokens=8)
    assert stream.opened == 0  # lazy: nothing sent until the first step
    assert _drain(gen) == ["Hel", "lo"]
    assert stream.opened == 1 and stream.closed >= 1
    assert gen.units(2) == (4, 2)
    assert gen.units(1) == (4, 1)  # never more completion tokens than chunks sent
    assert gen.reason(2) is FinishReason.LENGTH  # the engine's word


def test_generation_without_usage_counts_the_prompt_once() -> None:
    asked: list[str] = []

    def count(prompt: str) -> int:
        asked.append(prompt)
        return 500  # more than the prompt's bytes: a client could not check that

    stream = ScriptedStream([_sse(_chunk("a"), _chunk("b"), _chunk("", finish="stop"), "[DONE]")])
    gen = EngineGeneration(stream, prompt="hello", max_tokens=8, count_prompt=count)
    assert _drain(gen) == ["a", "b"]
    assert asked == ["hello"]
    assert gen.units(2) == (len(b"hello"), 2)
    assert gen.reason(2) is FinishReason.STOP


def test_generation_splits_multi_token_logprobs_and_caps_max_tokens() -> None:
    lp = {"tokens": ["a", "b", "c"], "token_logprobs": [-1.0, -2.0, -3.0], "top_logprobs": [{}, {}, {}]}
    stream = ScriptedStream([_sse(_chunk("abc", logprobs=lp), _chunk("d"), _chunk("e", finish="length"))])
    gen = EngineGeneration(stream, prompt="p", max_tokens=4, top_logprobs=0)
    steps = []
    while (step := gen.next_step()) is not None:
        steps.append((step.text, [x.logprob for x in step.logprobs]))
    assert steps == [("abc", [-1.0]), ("", [-2.0]), ("", [-3.0]), ("d", [])]  # the 5th is past max_tokens


@pytest.mark.parametrize(
    ("pieces", "fault"),
    [
        ([_sse(_chunk("a"))], EngineFault.FAILED),  # the body ended before the last chunk
        ([_sse(_chunk("a"), "[DONE]")], EngineFault.FAILED),  # ended without a finish reason: preempted
        ([_sse(json.dumps({"error": {"message": "oom"}}))], EngineFault.FAILED),
        ([_sse(_chunk("a")), EngineError(EngineFault.TIMEOUT, "silent")], EngineFault.TIMEOUT),
    ],
)
def test_generation_failures(pieces: list[bytes | Exception], fault: EngineFault) -> None:
    stream = ScriptedStream(pieces)
    gen = EngineGeneration(stream, prompt="p", max_tokens=8)
    with pytest.raises(EngineError) as info:
        _drain(gen)
    assert info.value.fault is fault
    assert stream.closed


def test_generation_closed_mid_stream_says_closed() -> None:
    stream = ScriptedStream([_sse(_chunk("a")), b""])
    gen = EngineGeneration(stream, prompt="p", max_tokens=8)
    assert gen.next_step() is not None
    gen.close()  # as a cancel from the event loop does
    with pytest.raises(EngineError) as info:
        gen.next_step()
    assert info.value.fault is EngineFault.CLOSED


class Recorder:
    """An EngineTransport that records requests and answers from a table."""

    def __init__(self, answers: dict[str, tuple[int, Any] | Exception]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str, Any]] = []

    def stream(self, path: str, body: dict[str, Any]) -> ScriptedStream:
        self.asked.append(("STREAM", path, body))
        return ScriptedStream([])

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, root: bool = False, timeout_s: float
    ) -> tuple[int, Any]:
        self.asked.append((method, path, body))
        answer = self.answers.get(path, (404, None))
        if isinstance(answer, Exception):
            raise answer
        return answer


def _runner(kind: EngineKind = EngineKind.LLAMA_CPP, answers: dict[str, Any] | None = None) -> EngineRunner:
    spec = ModelSpec(name="smol", path=Path("x.gguf"), model_id=b"\1" * 32, kind="generation")
    return EngineRunner(spec, Recorder(answers or {}), name="smol", kind=kind)


def test_completion_body_maps_sampling() -> None:
    greedy = _runner().completion_body(RunRequest(texts=("<|im_start|>user\nhi",), max_tokens=5))
    assert greedy["prompt"] == "<|im_start|>user\nhi" and greedy["max_tokens"] == 5 and greedy["stream"] is True
    assert greedy["temperature"] == 0.0 and greedy["stream_options"] == {"include_usage": True}
    assert greedy["repeat_penalty"] == 1.0 and greedy["top_k"] == 0  # llama-cpp-python's own defaults are off
    assert "seed" not in greedy and "stop" not in greedy and "logprobs" not in greedy
    s = Sampling(temperature=0.7, top_p=0.9, seed=42, stop=("\n",), logprobs=2, presence_penalty=0.5)
    sampled = _runner(EngineKind.OPENAI).completion_body(RunRequest(texts=("p",), max_tokens=3, sampling=s))
    assert {k: sampled[k] for k in ("temperature", "top_p", "seed", "stop", "logprobs", "presence_penalty")} == {
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["\n"],
        "logprobs": 2,
        "presence_penalty": 0.5,
    }
    assert "repeat_penalty" not in sampled and "top_k" not in sampled  # OpenAI's fields only
    assert _runner(EngineKind.VLLM).completion_body(RunRequest(texts=("p",), max_tokens=1))["top_k"] == -1


@pytest.mark.parametrize(
    ("req", "code"),
    [
        (RunRequest(texts=("p",), max_tokens=1, verify_tokens=(1,)), "bad-input"),
        (RunRequest(texts=("p", "q"), max_tokens=1), "bad-input"),
        (RunRequest(texts=("p",), max_tokens=0), "bad-input"),
        (RunRequest(texts=("",), max_tokens=1), "bad-input"),
        (RunRequest(texts=("p",), max_tokens=10**6), "too-large"),
        (RunRequest(texts=("p" * 10**6,), max_tokens=1), "too-large"),
    ],
)
def test_check_refuses(req: RunRequest, code: str) -> None:
    with pytest.raises(MalformedMessage) as info:
        _runner().check(req)
    assert info.value.code == code


def test_check_accepts_and_engine_cannot_verify_or_rerun() -> None:
    runner = _runner()
    assert runner.check(RunRequest(texts=("p",), max_tokens=4)) == "prompt"
    for call in (
        lambda: runner.verify(RunRequest()),
        lambda: runner.token_stream(RunRequest()),
        lambda: runner.run([]),
    ):
        with pytest.raises(MalformedMessage):
            call()


@pytest.mark.parametrize(
    ("answers", "busy", "probe"),
    [
        ({"/health": (200, None)}, False, Probe.OK),
        ({"/health": (503, None)}, False, Probe.FAILED),
        ({"/models": (200, {"data": [{"id": "smol"}]})}, False, Probe.OK),  # no /health: llama-cpp-python
        ({"/models": (200, {"data": [{"id": "other"}]})}, False, Probe.FAILED),
        ({"/models": (200, {"data": [{"id": "other"}]})}, True, Probe.OK),  # alive; /models would disturb jobs
        ({"/health": EngineError(EngineFault.UNREACHABLE, "refused")}, True, Probe.FAILED),
        ({"/health": EngineError(EngineFault.TIMEOUT, "t")}, True, Probe.INCONCLUSIVE),
        ({"/models": EngineError(EngineFault.TIMEOUT, "t")}, False, Probe.FAILED),
    ],
)
def test_probe(answers: dict[str, Any], busy: bool, probe: Probe) -> None:
    assert _runner(answers=answers).probe(busy=busy) is probe


@pytest.mark.parametrize(
    ("probes", "changes", "up"),
    [
        ("FFF", [None, None, False], False),
        ("FFOFF", [None, None, None, None, None], True),  # failures must come in a row
        ("FFFIO", [None, None, False, None, True], True),
        ("FFFFO", [None, None, False, None, True], True),
        ("III", [None, None, None], True),
    ],
)
def test_health_transitions(probes: str, changes: list[bool | None], up: bool) -> None:
    table = {"O": Probe.OK, "F": Probe.FAILED, "I": Probe.INCONCLUSIVE}
    health = EngineHealth(failures=3)
    assert [health.observe(table[p]) for p in probes] == changes
    assert health.up is up


def test_count_prompt_tokens_falls_back_through_routes() -> None:
    assert _runner(answers={"/extras/tokenize/count": (200, {"count": 9})}).count_prompt_tokens("x") == 9
    assert _runner(answers={"/tokenize": (200, {"tokens": [1, 2]})}).count_prompt_tokens("x") == 2
    assert _runner().count_prompt_tokens("x") is None


def test_offer_backend_names_engine_and_variant() -> None:
    assert offer_backend(EngineKind.LLAMA_CPP, "q4_1") == "engine:llama.cpp/q4_1"
    assert EngineKind.from_owner("vllm") is EngineKind.VLLM and EngineKind.from_owner("me") is EngineKind.LLAMA_CPP
    assert EngineKind.from_owner("someone") is EngineKind.OPENAI


def test_outputs_digest_binds_text_only_without_token_ids() -> None:
    assert outputs_digest((), (), "") == outputs_digest((), ())  # embeddings: unchanged
    assert outputs_digest((), (1, 2), "ab") == outputs_digest((), (1, 2))  # token ids: as before
    assert outputs_digest((), (), "ab") != outputs_digest((), (), "ac")
    assert outputs_digest((), (), "ab") != outputs_digest((), ())


def _chat_chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})


def _call(index: int, arguments: str, **first: str) -> dict[str, Any]:
    fn: dict[str, str] = {"arguments": arguments, **({"name": first["name"]} if "name" in first else {})}
    return {"index": index, **({"id": first["id"]} if "id" in first else {}), "type": "function", "function": fn}


def test_a_chat_stream_gathers_tool_calls_and_reads_chat_logprobs() -> None:
    lp = {"content": [{"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "b", "logprob": -2.0}]}]}
    stream = ScriptedStream(
        [
            _sse(
                _chat_chunk({"role": "assistant", "content": "a"}, logprobs=lp),
                _chat_chunk({"tool_calls": [_call(0, '{"ci', id="call_x", name="get_weather")]}),
                _chat_chunk({"tool_calls": [_call(0, 'ty": "Paris"}')]}),
                _chat_chunk({"tool_calls": [_call(1, "{}", name="second")]}, finish="tool_calls"),
                "[DONE]",
            )
        ]
    )
    gen = EngineGeneration(stream, prompt="p", max_tokens=16, top_logprobs=1)
    steps = []
    while (step := gen.next_step()) is not None:
        steps.append(step)
    # the text with its logprobs, then one empty step per piece of a call (each a generated token)
    assert [s.text for s in steps] == ["a", "", "", ""]
    assert steps[0].logprobs == (TokenLogprob("a", -0.5, (("b", -2.0),)),)
    assert gen.tool_calls() == (
        ToolCall("call_x", "get_weather", '{"city": "Paris"}'),
        ToolCall("call_1", "second", "{}"),  # no id from the engine: one made up
    )
    assert gen.reason(len(steps)) is FinishReason.TOOL_CALLS and gen.units(len(steps))[1] == 4


def test_a_chat_job_asks_the_engines_chat_route_and_an_onnx_model_refuses_one(tiny_model: ModelSpec) -> None:
    chat = ChatOptions(({"role": "user", "content": "hi"},), {"type": "json_object"}, (WEATHER_TOOL,), "auto")
    runner = _runner(EngineKind.VLLM)
    body = runner.completion_body(RunRequest(texts=("p",), max_tokens=4, chat=chat, sampling=Sampling(logprobs=2)))
    assert body["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in body
    assert body["response_format"] == {"type": "json_object"} and body["tools"] == [WEATHER_TOOL]
    assert body["tool_choice"] == "auto" and (body["logprobs"], body["top_logprobs"]) == (True, 2)
    assert ChatOptions.from_wire(chat.to_wire()) == chat
    executor = Executor(tiny_model, OnnxRuntimeBackend(tiny_model.path, threads=1))
    with pytest.raises(MalformedMessage) as err:
        executor.check(RunRequest(inputs=(), texts=("p",), max_tokens=4, chat=chat))
    assert err.value.code == "bad-input" and "chat options" in str(err.value)


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_chat_options_too_large_to_send_are_refused_before_sending() -> None:
    huge = ChatOptions(tuple({"role": "user", "content": "x" * 30_000} for _ in range(10)))
    with pytest.raises(LocalProtocolError) as err:
        huge.to_wire()
    assert err.value.code == "too-large"  # the client's own error: the job stream stays usable
    with pytest.raises(MalformedMessage):
        ChatOptions.from_wire(b"x" * (MAX_OPTIONS_BYTES + 1))
