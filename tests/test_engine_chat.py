"""The gateway in front of a worker that fronts a real engine (llama.cpp's OpenAI server on
the SmolLM2 GGUF), asked with the official ``openai`` client: a chat reaches the engine as
messages (its model's own template) and answers as the engine answers it directly;
``response_format`` constrains the answer to JSON; a forced tool call comes back as
OpenAI's ``tool_calls`` (whole and streamed), billed and finished as ``tool_calls``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from cocoon_p2p.api.gateway import Gateway

from . import test_engine
from .test_engine import NAME, NEUTRAL, PRICE, LlamaServer, engine_network

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
FORCED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


server = test_engine.server  # the same fixture, for this module: its own engine process


@asynccontextmanager
async def gateway(server: LlamaServer, tmp: Path) -> AsyncIterator[openai.OpenAI]:
    """A client node with a gateway, a worker fronting the engine: the gateway knows the
    model only by the name the worker announces."""
    async with engine_network(server, tmp) as (client, _worker, _offer):
        gw = Gateway(client, [], max_price_nanoton=PRICE)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gw.serve, "127.0.0.1", 0)
            yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
            nursery.cancel_scope.cancel()


async def ask(fn: Any, **kw: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(**kw))


def direct(server: LlamaServer, **body: Any) -> dict[str, Any]:
    status, reply = server.call("POST", "/v1/chat/completions", {"model": NAME, **NEUTRAL, **body})
    assert status == 200, reply
    return dict(reply)


async def test_a_chat_through_the_network_is_the_engines_own_chat(server: LlamaServer, tmp_path: Path) -> None:
    want = await trio.to_thread.run_sync(lambda: direct(server, messages=ASK, max_tokens=24, temperature=0))
    async with gateway(server, tmp_path) as c:
        got = await ask(c.chat.completions.create, model=NAME, messages=ASK, max_tokens=24, temperature=0)
        shaped = await ask(
            c.chat.completions.create,
            model=NAME,
            messages=[{"role": "user", "content": "Give a JSON object with one key: capital of France."}],
            max_tokens=32,
            temperature=0,
            response_format={"type": "json_object"},
        )
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]  # its template, not ours
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.completion_tokens == want["usage"]["completion_tokens"]
    assert got.usage.cost_nanoton == got.usage.total_tokens * PRICE  # type: ignore[attr-defined]
    text = shaped.choices[0].message.content
    assert text is not None and shaped.choices[0].finish_reason in ("stop", "length")
    if shaped.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)  # the engine's grammar held it to JSON
    else:
        assert text.lstrip().startswith("{")  # cut by max_tokens, but JSON from the first character


async def test_a_forced_tool_call_comes_back_as_tool_calls(server: LlamaServer, tmp_path: Path) -> None:
    ask_tools = dict(messages=ASK, max_tokens=48, temperature=0, tools=[WEATHER], tool_choice=FORCED)
    want = await trio.to_thread.run_sync(lambda: direct(server, **ask_tools))
    (want_call,) = want["choices"][0]["message"]["tool_calls"]
    async with gateway(server, tmp_path) as c:
        whole = await ask(c.chat.completions.create, model=NAME, **ask_tools)

        def streamed() -> tuple[list[Any], str | None]:
            calls, finish = [], None
            for chunk in c.chat.completions.create(model=NAME, stream=True, **ask_tools):  # type: ignore[call-overload]
                for choice in chunk.choices:
                    calls += choice.delta.tool_calls or []
                    finish = choice.finish_reason or finish
            return calls, finish

        calls, finish = await trio.to_thread.run_sync(streamed)
    (call,) = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.function.arguments == want_call["function"]["arguments"]  # the engine's call, byte for byte
    assert "city" in json.loads(call.function.arguments)
    assert whole.usage.completion_tokens > 0  # the call's tokens are generated tokens, billed
    (piece,) = calls
    assert finish == "tool_calls" and piece.index == 0
    assert (piece.function.name, piece.function.arguments) == (call.function.name, call.function.arguments)
