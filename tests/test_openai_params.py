"""The gateway's OpenAI request parsing, sans-IO: what each parameter becomes, what is accepted
and ignored, what is 400 naming which parameter; chat rendering; response shapes; API keys;
the gateway's CLI options."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cocoon_p2p.nodes import config as config_mod
from cocoon_p2p.nodes import gatewaycli

from cocoon_p2p.api import openai as api
from cocoon_p2p.api.completions import completion_logprobs
from cocoon_p2p.api.keys import ENV_VAR, ApiKeys, check_exposure, is_loopback
from cocoon_p2p.api.metrics import GatewayStats, route_of
from cocoon_p2p.api.models import GatewayModel, find_model
from cocoon_p2p.api.params import IGNORED, MIN_TOP_P, Feature
from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.core.metrics import parse, render
from cocoon_p2p.execution.sampling import MAX_SEED, TokenLogprob

HI = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> api.ChatRequest:
    return api.parse_chat({"model": "m", "messages": HI, **kw})


def test_defaults_follow_openai() -> None:
    req = chat()
    s = req.params.sampling
    assert (s.temperature, s.top_p, s.seed, s.stop, s.logprobs) == (1.0, 1.0, None, (), None)  # samples by default
    assert (req.max_tokens, req.params.n, req.stream, req.include_usage) == (128, 1, False, False)
    text = api.parse_completion({"model": "m", "prompt": "x"})
    assert text.params.max_tokens == 16 and text.prompts == ("x",)  # OpenAI's completions default


@pytest.mark.parametrize(
    ("kw", "check"),
    [
        ({"temperature": 0}, lambda r: r.params.sampling.greedy),
        ({"top_p": 0}, lambda r: r.params.sampling.top_p == MIN_TOP_P),  # the top token alone
        ({"seed": -1}, lambda r: r.params.sampling.seed == MAX_SEED),  # OpenAI takes any 64-bit seed
        ({"seed": 7, "n": 3}, lambda r: [r.params.sampling_for(i).seed for i in range(3)] == [7, 8, 9]),
        ({"n": 2}, lambda r: r.params.sampling_for(1).seed is None),  # no seed: each choice draws afresh
        ({"stop": "\n"}, lambda r: r.params.sampling.stop == ("\n",)),
        ({"stop": ["a", "a", "b"]}, lambda r: r.params.sampling.stop == ("a", "b")),
        ({"logprobs": True}, lambda r: r.params.sampling.logprobs == 0),
        ({"logprobs": True, "top_logprobs": 5}, lambda r: r.params.sampling.logprobs == 5),
        ({"max_tokens": 5, "max_completion_tokens": 7}, lambda r: r.max_tokens == 7),
        ({"max_tokens": None, "temperature": None}, lambda r: r.max_tokens == 128),  # null: absent
        ({"presence_penalty": -2, "frequency_penalty": 2}, lambda r: r.params.sampling.frequency_penalty == 2),
        ({"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}},
         lambda r: r.stream and r.include_usage),
        ({"response_format": {"type": "text"}}, lambda r: not r.params.engine.needs()),
        ({"response_format": {"type": "json_object"}},
         lambda r: r.params.engine.needs() == [(Feature.RESPONSE_FORMAT, "response_format")]),
        ({"tools": [{"type": "function"}], "tool_choice": "auto"},
         lambda r: [p for _, p in r.params.engine.needs()] == ["tools", "tool_choice"]),
        ({"cocoon": {"require_tee": True}}, lambda r: r.params.require_tee),
        ({"modalities": ["text"], "logit_bias": {}}, lambda r: True),
    ],
)  # fmt: skip
def test_each_parameter_becomes(kw: dict[str, Any], check: Any) -> None:
    assert check(chat(**kw))


def test_harmless_parameters_are_accepted_and_ignored() -> None:
    values = {"user": "u", "metadata": {"a": "b"}, "store": True, "service_tier": "auto",
              "parallel_tool_calls": False, "prediction": {"type": "content", "content": "x"},
              "safety_identifier": "s", "prompt_cache_key": "k"}  # fmt: skip
    assert set(values) == IGNORED
    assert chat(**values).params == chat().params


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"seed": 2**64}, "seed"),
        ({"seed": "1"}, "seed"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 5000}, "max_completion_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"stream": True, "stream_options": {"x": 1}}, "stream_options.x"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "x"}}, "audio"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"tools": "f"}, "tools"),
        ({"cocoon": {"require_te": True}}, "cocoon.require_te"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, "messages[0].weight"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
        ({"messages": [*HI, {"role": "tool", "content": "x"}]}, "messages[1].role"),  # no call to answer
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 1}}]}]},
         "messages[0].tool_calls[0].function.name"),
        ({"model": ""}, "model"),
    ],
)  # fmt: skip
def test_bad_chat_requests_name_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(api.APIError) as err:
        api.parse_chat({"model": "m", "messages": HI, **body})
    assert err.value.status == 400 and err.value.param == param, err.value
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["x"] * 17}, "prompt"),
        ({"prompt": ["x"] * 4, "n": 5}, "n"),
        ({"logprobs": True}, "logprobs"),  # an integer here
        ({"top_logprobs": 2}, "top_logprobs"),  # a chat parameter
        ({"messages": HI}, "messages"),
    ],
)
def test_bad_completion_requests_name_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(api.APIError) as err:
        api.parse_completion({"model": "m", "prompt": "x", **body})
    assert err.value.status == 400 and err.value.param == param, err.value


def test_completion_prompts_echo_false_and_best_of_n() -> None:
    req = api.parse_completion({"model": "m", "prompt": ["a", "b"], "n": 2, "best_of": 2, "echo": False,
                                "suffix": None, "logprobs": 3})  # fmt: skip
    assert req.prompts == ("a", "b") and req.params.n == 2 and req.params.sampling.logprobs == 3


def test_chat_renders_roles_parts_and_tool_calls_in_chatml() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    req = api.parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "function", "name": "f", "content": "old style"},
    ]})  # fmt: skip
    assert req.prompt() == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"  # developer as system: no default system prompt added
        "<|im_start|>user\na\nb<|im_end|>\n"
        '<|im_start|>assistant\n{"name": "f", "arguments": "{\\"x\\": 1}"}<|im_end|>\n'
        "<|im_start|>tool\n42<|im_end|>\n"
        "<|im_start|>function\nold style<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert api.parse_chat({"model": "m", "messages": HI}).prompt().startswith("<|im_start|>system\nYou are")


def test_models_are_found_by_name_or_id_and_features_are_checked() -> None:
    gen = GatewayModel("smol", bytes(range(32)), "generation")
    emb = GatewayModel("mini", b"\xaa" * 32, "embedding")
    assert gen.unit == emb.unit == "token" and gen.fingerprint == "cocoon-000102030405060708"[:23]
    assert find_model([gen, emb], "smol", "generation") is gen
    assert find_model([gen, emb], "AA" * 32, "embedding") is emb
    for name, kind, status in (("nope", "generation", 404), ("mini", "generation", 400)):
        with pytest.raises(api.APIError) as err:
            find_model([gen, emb], name, kind)
        assert err.value.status == status and err.value.param == "model"
    options = chat(response_format={"type": "json_schema", "json_schema": {}}).params.engine
    with pytest.raises(api.APIError) as unsupported:
        gen.check_options(options)
    assert unsupported.value.param == "response_format" and unsupported.value.code == "unsupported_parameter"
    GatewayModel("engine", b"\x01" * 32, "generation", features=frozenset({Feature.RESPONSE_FORMAT})).check_options(
        options
    )  # a backend that honours it


def test_response_shapes_and_logprobs() -> None:
    lps = (TokenLogprob("The", -0.1, (("The", -0.1), ("A", -2.0))), TokenLogprob(" cat", float("-inf"), ()))
    body = api.chat_response("id", 1, "m", [api.Choice(0, "The cat", "stop", lps)], {"prompt_tokens": 1})
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "The", "logprob": -0.1, "bytes": [84, 104, 101],
                          "top_logprobs": [{"token": "The", "logprob": -0.1, "bytes": [84, 104, 101]},
                                           {"token": "A", "logprob": -2.0, "bytes": [65]}]}  # fmt: skip
    assert content[1]["logprob"] == -9999.0  # JSON has no -inf
    json.dumps(body, allow_nan=False)
    legacy = completion_logprobs(lps, start=5)
    assert legacy["tokens"] == ["The", " cat"] and legacy["text_offset"] == [5, 8]
    assert legacy["top_logprobs"][0] == {"The": -0.1, "A": -2.0} and legacy["top_logprobs"][1] == {" cat": -9999.0}
    chunk = json.loads(api.chat_chunk("id", 1, "m", index=1, delta={"content": "x"}, with_usage=True)[6:])
    assert chunk["choices"][0]["index"] == 1 and chunk["usage"] is None  # null until the usage chunk
    assert "usage" not in json.loads(api.chat_chunk("id", 1, "m", delta={"content": "x"})[6:])
    last = json.loads(api.completion_chunk("id", 1, "m", usage={"total_tokens": 3})[6:])
    assert last["choices"] == [] and last["object"] == "text_completion"


@pytest.mark.parametrize(
    ("tokens", "limit", "last", "reason"),
    [(3, 8, "x", "stop"), (8, 8, "x", "length"), (8, 8, "", "stop"), (8, 8, None, "length")],
)
def test_finish_reason(tokens: int, limit: int, last: str | None, reason: str) -> None:
    assert api.finish_reason(tokens, limit, last_text=last) == reason


@pytest.mark.parametrize(
    ("body", "param"),
    [({"dimensions": 128}, "dimensions"), ({"frobnicate": 1}, "frobnicate"), ({"encoding_format": "int8"},
     "encoding_format")],
)  # fmt: skip
def test_embeddings_requests_refuse_what_they_cannot_honour(body: dict[str, Any], param: str) -> None:
    with pytest.raises(api.APIError) as err:
        api.parse_embeddings({"model": "m", "input": "x", **body})
    assert err.value.param == param


# ---- API keys -------------------------------------------------------------------------------------


def test_api_keys_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# the gateway's clients\nsk-alice-0123456789abcdef\n\n  sk-bob-0123456789abcdef   # bob\n")
    keys = ApiKeys.load(path, {ENV_VAR: " sk-carol-0123456789abcdef , ,"})
    assert len(keys) == 3
    for header, ok in (
        ("Bearer sk-alice-0123456789abcdef", True),
        ("bearer sk-bob-0123456789abcdef", True),
        ("Bearer  sk-carol-0123456789abcdef ", True),
        ("Bearer sk-alice-0123456789abcde", False),  # a prefix
        ("Bearer sk-alice-0123456789abcdefX", False),
        ("Basic sk-alice-0123456789abcdef", False),
        ("sk-alice-0123456789abcdef", False),
        ("Bearer ", False),
        (None, False),
    ):
        assert keys.check(header) is ok, header
    assert not ApiKeys.load(None, {}) and ApiKeys.load(None, {ENV_VAR: "sk-carol-0123456789abcdef"})
    empty = tmp_path / "empty"
    empty.write_text("# nobody yet\n\n")
    for bad in (empty, tmp_path / "missing"):
        with pytest.raises(ConfigError):  # never "no keys, so no authentication"
            ApiKeys.load(bad, {})
    with pytest.raises(ConfigError):
        ApiKeys.of(["short"])


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.org", False), ("", False)],
)  # fmt: skip
def test_a_gateway_off_loopback_needs_keys(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    check_exposure(host, ApiKeys.of(["sk-0123456789abcdef"]))
    check_exposure(host, ApiKeys(()), insecure_no_auth=True)
    if loopback:
        check_exposure(host, ApiKeys(()))
    else:
        with pytest.raises(ConfigError, match="--api-key-file"):
            check_exposure(host, ApiKeys(()))


def test_gateway_cli_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "keys"
    path.write_text("sk-alice-0123456789abcdef\n")
    monkeypatch.delenv(ENV_VAR, raising=False)
    opts = gatewaycli.gateway_options(SimpleNamespace(api_key_file=str(path), insecure_no_auth=None))
    assert opts.api_keys.check("Bearer sk-alice-0123456789abcdef") and not opts.insecure_no_auth
    assert not gatewaycli.gateway_options(SimpleNamespace()).api_keys
    assert gatewaycli.gateway_options(SimpleNamespace(), {ENV_VAR: "sk-env-0123456789abcdef"}).api_keys
    parser = argparse.ArgumentParser()
    gatewaycli.add_gateway_flags(parser)
    if "api_key_file" in config_mod.RoleConfig.__dataclass_fields__:
        args = parser.parse_args(["--api-key-file", str(path), "--insecure-no-auth"])
        assert gatewaycli.gateway_options(args).insecure_no_auth
    else:  # the role config cannot carry them yet: refused, never silently dropped
        with pytest.raises(SystemExit):
            parser.parse_args(["--api-key-file", str(path)])
    with pytest.raises(ConfigError, match="without API keys"):
        gatewaycli.build_gateway(None, [], config_mod.RoleConfig(http="0.0.0.0:8080"))  # type: ignore[arg-type]
    monkeypatch.setenv(ENV_VAR, "sk-env-0123456789abcdef")
    gw = gatewaycli.build_gateway(None, [], config_mod.RoleConfig(http="0.0.0.0:8080"))  # type: ignore[arg-type]
    assert gw.api_keys.check("Bearer sk-env-0123456789abcdef")


def test_request_metrics_render() -> None:
    stats = GatewayStats()
    stats.answered(route_of("/v1/chat/completions"), 200)
    stats.answered(route_of("/wp-admin.php"), 404)
    stats.answered(route_of("/v1/models/smollm2"), 401)
    stats.first_token("/v1/chat/completions", 0.02)
    stats.choice_done("/v1/chat/completions", 10, 0.5)
    stats.choice_done("/v1/chat/completions", 1, 0.0)  # one token: no rate
    stats.took("/v1/chat/completions", 0.6)
    samples = parse(render(stats.metrics()))
    assert samples['cocoon_gateway_requests_total{route="other",status="404"}'] == 1
    assert samples['cocoon_gateway_requests_total{route="/v1/models",status="401"}'] == 1
    assert samples['cocoon_gateway_ttft_seconds_bucket{route="/v1/chat/completions",le="0.025"}'] == 1
    assert samples['cocoon_gateway_completion_tokens_per_second_bucket{route="/v1/chat/completions",le="20"}'] == 1
    assert samples['cocoon_gateway_completion_tokens_per_second_count{route="/v1/chat/completions"}'] == 1
    assert samples['cocoon_gateway_completion_tokens_total{route="/v1/chat/completions"}'] == 11
    assert samples['cocoon_gateway_request_seconds_count{route="/v1/chat/completions"}'] == 1
