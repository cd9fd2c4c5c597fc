"""The gateway as a faithful OpenAI server, driven by clients nobody here wrote: the official
``openai`` Python client (sync, async, streaming) and the official ``openai`` npm package
(streaming chat), against one real worker serving SmolLM2 and MiniLM (ONNX) behind a real
gateway with API keys. One network serves the whole module: it runs in its own thread (its
own trio loop), so the tests are plain functions using the clients as apps do.

Each parameter is tested for its effect: stop cuts the text (finish "stop"); the same seed
gives the same text and other seeds other texts; n=2 gives the texts of seeds s and s+1;
logprobs agree with the greedy choice; content parts and the developer role give the same
prompt as plain strings; what cannot be honoured is 400 naming its parameter.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from cocoon_p2p.api.gateway import Gateway, GatewayModel
from cocoon_p2p.api.keys import ApiKeys
from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.metrics import parse, total
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2
from cocoon_p2p.node import Node

from .netutil import fast_config, wait_for

pytestmark = pytest.mark.slow

PRICE = 7
KEY = "sk-cocoon-test-key-0123456789"
JS = Path(__file__).parent / "interop-openai"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
POEM = [{"role": "user", "content": "Write one unusual word."}]


@dataclass
class Net:
    base: str
    gateway: Gateway


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    """A worker serving both models and a keyed gateway in front, in a thread of their own."""
    models = ensure_minilm(), ensure_smollm2()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        async with Node(fast_config()) as worker, Node(fast_config(bootstrap=[worker.addrs[0]])) as gw_node:
            for spec in models:
                worker.serve_model(spec, OnnxRuntimeBackend(spec.path, threads=1), price_nanoton=PRICE)
            await wait_for(lambda: all(gw_node.directory.workers_for(m.model_id, now_ms=now_ms()) for m in models))
            offered = [GatewayModel.of(m, name) for m, name in zip(models, ("minilm", "smollm2"), strict=True)]
            gateway = Gateway(
                gw_node, offered, max_price_nanoton=PRICE, api_keys=ApiKeys.of([KEY, "sk-other-key-abcdefghij"])
            )
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                port = await nursery.start(gateway.serve, "127.0.0.1", 0)
                box.update(
                    net=Net(f"http://127.0.0.1:{port}", gateway), stop=stop, token=trio.lowlevel.current_trio_token()
                )
                ready.set()
                await stop.wait()
                nursery.cancel_scope.cancel()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(120), "the network did not start"
    if "error" in box:
        raise box["error"]
    yield box["net"]
    box["token"].run_sync_soon(box["stop"].set)
    thread.join(30)


def client(net: Net, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{net.base}/v1", api_key=key, max_retries=0, timeout=60)


def chat(c: openai.OpenAI, messages: list[dict[str, Any]] = QUESTION, **kw: Any) -> Any:
    return c.chat.completions.create(model="smollm2", messages=messages, **kw)  # type: ignore[arg-type]


def get(net: Net, path: str, key: str | None = KEY) -> tuple[int, Any]:
    req = urllib.request.Request(f"{net.base}{path}", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read().decode()
            return r.status, json.loads(body) if r.headers["content-type"] == "application/json" else body
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ---- parameters, each for its effect ---------------------------------------------------------------


def test_stop_seed_n_and_logprobs_with_the_sync_client(net: Net) -> None:
    c = client(net)
    greedy = chat(c, max_tokens=16, temperature=0)
    text = greedy.choices[0].message.content
    words = text.split()
    assert len(words) >= 4, text
    stop = " " + words[2]  # a stop string the greedy text reaches
    cut = chat(c, max_tokens=16, temperature=0, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < greedy.usage.completion_tokens
    assert greedy.choices[0].finish_reason == "stop" and greedy.usage.completion_tokens < 16  # the model's end token

    by_seed = {s: chat(c, POEM, max_tokens=8, temperature=1.0, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert chat(c, POEM, max_tokens=8, temperature=1.0, seed=1).choices[0].message.content == by_seed[1]
    assert len(set(by_seed.values())) > 1, by_seed  # sampled: seeds matter
    two = chat(c, POEM, max_tokens=8, temperature=1.0, seed=1, n=2)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert [ch.message.content for ch in two.choices] == [by_seed[1], by_seed[2]]  # choice i: seed + i
    assert two.usage.cost_nanoton == (two.usage.total_tokens + two.usage.prompt_tokens) * PRICE  # prompt billed twice
    assert len(two.usage.workers) == 2  # type: ignore[attr-defined]

    lp = chat(c, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.logprob <= 0
    assert (
        "".join(e.token for e in content) == lp.choices[0].message.content == text[: len(lp.choices[0].message.content)]
    )
    assert chat(c, max_tokens=2).choices[0].logprobs is None


def test_models_the_network_names_resolve_without_the_gateway_having_them(net: Net) -> None:
    """The gateway knows "smollm2" as an alias; the names workers announce resolve too."""
    c = client(net)
    want = chat(c, max_tokens=6, temperature=0).choices[0].message.content
    for name in (
        "smollm2-135m-instruct",
        "smollm2-135m-instruct:fp32",
        f"smollm2-135m-instruct@{net.gateway.models['smollm2'].model_id.hex()[:8]}",
    ):
        r = c.chat.completions.create(model=name, messages=QUESTION, max_tokens=6, temperature=0)  # type: ignore[arg-type]
        assert r.choices[0].message.content == want and r.model == name
    for name, status in (("smollm2-135m-instruct:q4", 404), ("all-minilm-l6-v2", 400)):  # no q4 worker; not chat
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model=name, messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
        assert err.value.status_code == status


def test_content_parts_developer_role_and_tool_messages(net: Net) -> None:
    c = client(net)
    system = {"role": "system", "content": "Answer briefly."}
    plain = chat(
        c, [system, {"role": "user", "content": "What is the capital\nof France?"}], max_tokens=8, temperature=0
    )
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    developer = {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]}
    parts = chat(c, [developer, {"role": "user", "content": parts}], max_tokens=8, temperature=0)
    assert parts.choices[0].message.content == plain.choices[0].message.content  # the same prompt
    call = {"id": "call_1", "type": "function", "function": {"name": "capital", "arguments": '{"country": "France"}'}}
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Paris"}]  # fmt: skip
    assert chat(c, history, max_tokens=4, temperature=0).choices[0].message.content


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"n": 9}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "tool", "content": "Paris", "tool_call_id": "x"}]}, "messages[0].role"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_400_naming_the_parameter(net: Net, kw: dict[str, Any], param: str) -> None:
    c = client(net)
    kw = {"messages": QUESTION, "max_tokens": 2, **kw}
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="smollm2", **kw)
    body: Any = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error", body


def test_completions_with_prompts_logprobs_echo_and_suffix(net: Net) -> None:
    c = client(net)
    prompts = ["The capital of France is", "One, two, three,"]
    out = c.completions.create(model="smollm2", prompt=prompts, max_tokens=5, temperature=0, logprobs=2)
    assert out.object == "text_completion" and [ch.index for ch in out.choices] == [0, 1]
    for choice, prompt in zip(out.choices, prompts, strict=True):
        single = c.completions.create(model="smollm2", prompt=prompt, max_tokens=5, temperature=0)
        assert choice.text == single.choices[0].text and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.tokens and "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
        assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens, strict=False))
        for token, top, chosen in zip(lp.tokens, lp.top_logprobs, lp.token_logprobs, strict=True):
            assert top[token] == chosen == max(top.values()) and len(top) <= 3
    assert out.usage.completion_tokens == 10
    for kw, param in (({"echo": True}, "echo"), ({"suffix": "!"}, "suffix"), ({"prompt": [[1, 2]]}, "prompt")):
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(**{"model": "smollm2", "prompt": "x", "max_tokens": 2, **kw})
        assert err.value.body["param"] == param  # type: ignore[index]

    pieces, usage, finish = [], None, None
    for chunk in c.completions.create(model="smollm2", prompt=prompts[0], max_tokens=5, temperature=0, stream=True,
                                      stream_options={"include_usage": True}):  # fmt: skip
        usage = chunk.usage or usage
        for ch in chunk.choices:
            pieces.append(ch.text)
            finish = ch.finish_reason or finish
    assert "".join(pieces) == out.choices[0].text and finish == "length"
    assert usage is not None and usage.completion_tokens == 5 and usage.prompt_tokens > 0


# ---- streaming, async, and a JS client ------------------------------------------------------------


def test_async_client_streams_two_choices_interleaved_with_usage(net: Net) -> None:
    async def go() -> tuple[dict[int, str], dict[int, str], Any, list[int], Any]:
        c = openai.AsyncOpenAI(base_url=f"{net.base}/v1", api_key=KEY, max_retries=0, timeout=60)
        texts: dict[int, str] = {}
        finish: dict[int, str] = {}
        order: list[int] = []
        usage = None
        stream = await c.chat.completions.create(
            model="smollm2", messages=POEM, max_tokens=8, temperature=1.0, seed=1, n=2, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        async for chunk in stream:
            assert chunk.usage is None or not chunk.choices
            usage = chunk.usage or usage
            for ch in chunk.choices:
                texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
                order.append(ch.index)
                if ch.finish_reason:
                    finish[ch.index] = ch.finish_reason
        whole = await c.chat.completions.create(
            model="smollm2", messages=POEM, max_tokens=8, temperature=1.0, seed=1, n=2
        )
        await c.close()
        return texts, finish, usage, order, whole

    texts, finish, usage, order, whole = asyncio.run(go())
    assert texts == {ch.index: ch.message.content for ch in whole.choices}  # seeded: streamed as whole
    assert set(finish) == {0, 1} and set(order) == {0, 1}
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.cost_nanoton == whole.usage.cost_nanoton  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def js_client_dir() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: the openai npm client is not tested here")
    if not (JS / "node_modules" / "openai").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS, check=True, timeout=600)
    return JS


@pytest.mark.interop  # npm installs the package on first run
def test_the_openai_npm_client_streams_a_chat(net: Net, js_client_dir: Path) -> None:
    c = client(net)
    want = chat(c, max_tokens=8, temperature=0)
    run = subprocess.run(
        ["node", "stream_chat.mjs", f"{net.base}/v1", KEY, "smollm2", json.dumps(QUESTION)],
        cwd=js_client_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["text"] == want.choices[0].message.content and got["chunks"] > 2
    assert got["finish_reason"] == want.choices[0].finish_reason == "stop"  # its end token was the 8th
    assert got["usage"]["completion_tokens"] == want.usage.completion_tokens == 8
    bad = subprocess.run(
        ["node", "stream_chat.mjs", f"{net.base}/v1", "sk-wrong-key-0000000000", "smollm2", json.dumps(QUESTION)],
        cwd=js_client_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 3 and json.loads(bad.stdout)["status"] == 401


# ---- keys, health, metrics ---------------------------------------------------------------------------


def test_keys_health_models_and_request_metrics(net: Net) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client(net, "sk-not-a-key-at-all-000000").models.list()
    body: Any = err.value.body
    assert err.value.status_code == 401 and body["code"] == "invalid_api_key"
    assert get(net, "/v1/models", key=None)[0] == 401 and get(net, "/metrics", key=None)[0] == 401
    listed = [m.id for m in client(net, "sk-other-key-abcdefghij").models.list().data]
    assert listed[:2] == ["minilm", "smollm2"] and "smollm2-135m-instruct:fp32" in listed
    assert client(net).models.retrieve("smollm2").workers == 1  # type: ignore[attr-defined]

    status, health = get(net, "/health", key=None)  # open: load balancers probe it without keys
    assert status == 200 and health["status"] == "ok" and health["models"]["minilm"] == health["models"]["smollm2"] == 1
    assert health["peers"] >= 1 and health["workers_known"] >= 1

    emb = client(net).embeddings.create(model="minilm", input=["one text", "another"])
    # Tokens, as OpenAI counts them: [CLS] one text [SEP], [CLS] another [SEP].
    assert emb.usage.prompt_tokens == emb.usage.total_tokens == 4 + 3
    assert emb.usage.billed_unit == "token"  # type: ignore[attr-defined]

    chat(client(net), max_tokens=3, temperature=0)
    status, text = get(net, "/metrics")
    samples = parse(text)
    assert samples['cocoon_gateway_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert samples['cocoon_gateway_requests_total{route="/v1/models",status="401"}'] >= 2
    assert samples['cocoon_gateway_ttft_seconds_count{route="/v1/chat/completions"}'] >= 1
    assert samples['cocoon_gateway_completion_tokens_per_second_count{route="/v1/chat/completions"}'] >= 1
    assert samples['cocoon_gateway_completion_tokens_total{route="/v1/chat/completions"}'] >= 3
    assert total(samples, "cocoon_client_jobs_total", outcome="ok") >= 1  # the node's own, beside
