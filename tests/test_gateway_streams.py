"""The gateway's choices over a scripted node (no peers, no models): n choices interleaved in
one stream in the order their tokens come, failures before the head (an HTTP status) and
after it (an error event), a client that leaves cancelling every job, usage counting a
prompt once, and finish reasons; driven by the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest
import trio

from cocoon_p2p.api.gateway import Gateway, GatewayModel
from cocoon_p2p.execution.sampling import Sampling, TokenLogprob
from cocoon_p2p.jobs import InferenceResult, JobFailed
from cocoon_p2p.jobs import frames as jf

WORKER = b"\x00\x24\x08\x01\x12\x20" + bytes(range(32))  # an identity-multihash PeerId's bytes
PROMPT_TOKENS = 10


class ScriptedNode:
    """Just what the gateway asks of a node. Choice i (seed 100 + i) follows ``plans[i]``:
    texts to stream one token each, then a result; ``"fail:<code>"`` raises JobFailed there;
    ``"ahead:<k>"`` waits until choice k has streamed more tokens than this one, ``"even:<k>"``
    as many (or until choice k's plan is done)."""

    def __init__(self, plans: list[list[str]]) -> None:
        self.plans = plans
        self.sent = [0] * len(plans)
        self.progress = trio.Condition()  # choices wait for one another through it
        self.closed: set[int] = set()

    async def generate(self, model_id: bytes, prompt: str, *, max_tokens: int, sampling: Sampling, **_: Any
                       ) -> AsyncGenerator[jf.JobChunk | InferenceResult, None]:  # fmt: skip
        i = (sampling.seed or 100) - 100
        try:
            for step in self.plans[i][:max_tokens]:
                if step.startswith("fail:"):
                    raise JobFailed(step[5:], "scripted")
                if step.startswith(("ahead:", "even:")):
                    kind, k = step.split(":")[0], int(step.split(":")[1])
                    lag = 0 if kind == "ahead" else 1
                    async with self.progress:
                        while self.sent[k] + lag <= self.sent[i] and i not in self.closed and k not in self.closed:
                            await self.progress.wait()
                    continue
                lp = (TokenLogprob(step or "<end>", -0.5, ()),) if sampling.logprobs is not None else ()
                yield jf.JobChunk(job_id=1, seq=self.sent[i], token_ids=(self.sent[i],), text=step, logprobs=lp)
                async with self.progress:
                    self.sent[i] += 1
                    self.progress.notify_all()
                await trio.sleep(0)
            n = self.sent[i]
            units = PROMPT_TOKENS + n
            yield InferenceResult(outputs=(), worker=WORKER, usage_units=units, cost_nanoton=units, price_nanoton=1,
                                  latency_s=0.0, attempts=1, token_ids=tuple(range(n)))  # fmt: skip
        finally:
            self.closed.add(i)
            with trio.CancelScope(shield=True):
                async with self.progress:
                    self.progress.notify_all()

    async def find_workers(self, model_id: bytes, **_: Any) -> list[Any]:
        return []

    def metrics(self) -> list[Any]:
        return []


@asynccontextmanager
async def serving(node: ScriptedNode) -> AsyncIterator[tuple[str, Gateway]]:
    gateway = Gateway(node, [GatewayModel("m", b"\x01" * 32, "generation")], max_price_nanoton=1)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(gateway.serve, "127.0.0.1", 0)
        yield f"http://127.0.0.1:{port}", gateway
        nursery.cancel_scope.cancel()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=20)


def stream_chat(base: str, **kw: Any) -> list[Any]:
    chunks = client(base).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}], seed=100, stream=True, **kw
    )
    return list(chunks)


async def test_two_choices_stream_interleaved_in_the_order_their_tokens_come() -> None:
    # Each choice waits for the other's token before sending its next: 0, 1, 0, 1, ...
    node = ScriptedNode([["A", "even:1", "B", "even:1", "C"], ["ahead:0", "a", "ahead:0", "b", "ahead:0", "c"]])
    async with serving(node) as (base, gateway):
        chunks = await trio.to_thread.run_sync(
            lambda: stream_chat(base, n=2, max_tokens=8, stream_options={"include_usage": True})
        )
    content = [(ch.index, ch.delta.content) for c in chunks for ch in c.choices if ch.delta.content]
    assert content == [(0, "A"), (1, "a"), (0, "B"), (1, "b"), (0, "C"), (1, "c")]
    roles = [ch.index for c in chunks for ch in c.choices if ch.delta.role == "assistant"]
    assert roles == [0, 1]  # each choice opens with its role
    finish = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert finish == {0: "stop", 1: "stop"}
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == 6
    assert usage.prompt_tokens == PROMPT_TOKENS  # once for the shared prompt, as OpenAI counts
    assert usage.cost_nanoton == 2 * PROMPT_TOKENS + 6  # type: ignore[attr-defined]  # each job paid for it
    assert gateway.stats.requests[("/v1/chat/completions", 200)] == 1


@pytest.mark.parametrize(
    ("plan", "max_tokens", "finish"),
    [
        (["a", "b", "c"], 3, "length"),
        (["a", "b", ""], 3, "stop"),  # the end token on the last position: no text
        (["a", ""], 3, "stop"),
    ],
)
async def test_finish_reasons(plan: list[str], max_tokens: int, finish: str) -> None:
    async with serving(ScriptedNode([plan])) as (base, _):
        out = await trio.to_thread.run_sync(
            lambda: client(base).completions.create(model="m", prompt="x", max_tokens=max_tokens, seed=100, logprobs=0)
        )
    choice = out.choices[0]
    assert choice.finish_reason == finish and choice.text == "".join(plan)
    assert choice.logprobs.tokens == [t or "<end>" for t in plan]


async def test_a_failure_before_the_first_token_is_an_http_status_and_after_it_an_error_event() -> None:
    async with serving(ScriptedNode([[f"fail:{jf.NO_WORKERS}"]])) as (base, gateway):
        with pytest.raises(openai.APIStatusError) as err:
            await trio.to_thread.run_sync(lambda: stream_chat(base, max_tokens=4))
        assert err.value.status_code == 503 and err.value.body["code"] == jf.NO_WORKERS  # type: ignore[index]
        assert gateway.stats.requests[("/v1/chat/completions", 503)] == 1
    node = ScriptedNode([["A", "B", "C"], ["ahead:0", f"fail:{jf.DEADLINE}"]])
    async with serving(node) as (base, _):
        with pytest.raises(openai.APIError) as mid:
            await trio.to_thread.run_sync(lambda: stream_chat(base, n=2, max_tokens=4))
        assert mid.value.body["code"] == jf.DEADLINE  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as whole:  # whole: the request's status is the failure's
            await trio.to_thread.run_sync(
                lambda: client(base).chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}], seed=100, n=2, max_tokens=4
                )
            )
        assert whole.value.status_code == 504
    assert node.closed == {0, 1}


async def test_a_client_that_leaves_cancels_every_job() -> None:
    node = ScriptedNode([["A", "ahead:1"], ["a", "ahead:0"]])  # both stall after one token, until cancelled
    async with serving(node) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        body = json.dumps({"model": "m", "prompt": "x", "n": 2, "seed": 100, "stream": True}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: h\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(head + body)
        seen = b""
        with trio.fail_after(10):
            while seen.count(b'"text":"') < 2:  # both choices have streamed
                seen += await stream.receive_some(65536)
        assert seen.startswith(b"HTTP/1.1 200") and node.closed == set()
        await stream.aclose()
        with trio.fail_after(10):
            while node.closed != {0, 1}:
                await trio.sleep(0.01)
