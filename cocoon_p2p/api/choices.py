"""The jobs behind one chat or text completion request, and their answer, whole or streamed.

Each choice is one generation job (``n`` per prompt; choice i of a prompt uses seed + i
when a seed was given), all run at once, up to :data:`MAX_PARALLEL_JOBS`. Their chunks
become OpenAI's choices: a whole response when every job is done, or one server-sent
event per chunk, the choices interleaved as their tokens arrive (each event names its
choice's ``index``, as OpenAI's streams do). A streamed answer's head waits for the first
token, so a request that fails before any (no worker, none attested, bad input) is
answered with its HTTP status; a failure after it is an ``error`` event, then ``[DONE]``.

Cancellation: the jobs run in a nursery in the connection's task. When the client goes
away (the next write fails) or the server stops, the nursery is cancelled, which cancels
every job on its worker; nothing outlives the request.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from cocoon_p2p.execution.chat_options import ChatOptions
from cocoon_p2p.execution.sampling import Sampling, TokenLogprob
from cocoon_p2p.jobs import InferenceResult, JobFailed
from cocoon_p2p.jobs import frames as jf

from . import chat, completions, results, wire
from . import openai as api
from .http import Response, ResponseSink
from .metrics import GatewayStats
from .models import GatewayModel
from .params import Endpoint, Params

if TYPE_CHECKING:  # no import cycle at run time
    from cocoon_p2p.node import Node

MAX_PARALLEL_JOBS = 8  # of one request's choices, at once


@dataclass(frozen=True)
class ChoiceJob:
    """The job behind choice ``index``."""

    index: int
    prompt: str
    sampling: Sampling


@dataclass(frozen=True)
class Delta:
    """Choice ``index`` produced one more token (``text`` may be empty: held back, or no text)."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Finished:
    """Choice ``index``'s job is done."""

    index: int
    result: InferenceResult


@dataclass(frozen=True)
class Failed:
    """Choice ``index``'s job failed."""

    index: int
    error: JobFailed


Event = Delta | Finished | Failed


@dataclass
class _Choice:
    index: int
    logprobs_asked: bool
    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    result: InferenceResult | None = None
    first_at: float | None = None
    offset: int = 0  # characters of token text streamed so far (completions' text_offset)
    last_text: str | None = None  # what the last token added (an end token: nothing)


@dataclass(frozen=True, kw_only=True)
class Terms:
    """What the gateway pays and waits for each job, and whether it must run in a TEE."""

    max_price_nanoton: int
    timeout_s: float
    require_tee: bool


class Generation:
    """One chat or completions request: ``prompts`` (one for chat) x ``params.n`` choices
    of ``model``, run on ``node``. ``started_at``: when the request arrived
    (``time.perf_counter``), for time to first token."""

    def __init__(
        self,
        node: Node,
        endpoint: Endpoint,
        model: GatewayModel,
        prompts: Sequence[str],
        params: Params,
        *,
        terms: Terms,
        stats: GatewayStats,
        started_at: float,
        chat_options: ChatOptions | None = None,
    ) -> None:
        model.check_options(params.engine)
        self.chat_options = chat_options
        self.node, self.endpoint, self.model, self.params, self.terms = node, endpoint, model, params, terms
        self.stats, self.started_at, self.route = stats, started_at, endpoint.value
        n = params.n
        self.jobs = [
            ChoiceJob(p * n + j, prompt, params.sampling_for(j)) for p, prompt in enumerate(prompts) for j in range(n)
        ]
        asked = params.sampling.logprobs is not None
        self.choices = [_Choice(job.index, asked) for job in self.jobs]
        prefix = "chatcmpl" if endpoint is Endpoint.CHAT else "cmpl"
        self.id, self.created = f"{prefix}-{secrets.token_hex(12)}", int(time.time())
        self._first_token = False

    # ---- running the jobs ---------------------------------------------------------------------

    async def run(self, send: trio.MemorySendChannel[Event]) -> None:
        """Run every choice's job; each chunk, result and failure goes to ``send`` (closed at the end)."""
        limiter = trio.CapacityLimiter(MAX_PARALLEL_JOBS)

        async def one(job: ChoiceJob) -> None:
            async with limiter:
                items = self.node.generate(
                    self.model.model_id,
                    job.prompt,
                    max_tokens=self.params.max_tokens,
                    max_price_nanoton=self.terms.max_price_nanoton,
                    timeout_s=self.terms.timeout_s,
                    require_tee=self.terms.require_tee,
                    sampling=job.sampling,
                    chat=self.chat_options,
                )
                try:
                    async with aclosing(items) as stream:
                        async for item in stream:
                            if isinstance(item, InferenceResult):
                                event: Event = Finished(job.index, item)
                            elif isinstance(item, jf.JobChunk):  # an engine's carry text and no token ids
                                event = Delta(job.index, item.text, item.logprobs)
                            else:
                                continue
                            if not _put(send, event):
                                return  # nobody reads any more: the answer is settled
                except JobFailed as exc:
                    _put(send, Failed(job.index, exc))

        async with send, trio.open_nursery() as nursery:
            for job in self.jobs:
                nursery.start_soon(one, job)

    def _note(self, event: Event) -> None:
        """Fold ``event`` into its choice; time to first token and decoding rate."""
        now = time.perf_counter()
        choice = self.choices[event.index]
        if isinstance(event, Delta):
            if choice.first_at is None:
                choice.first_at = now
            if not self._first_token:
                self._first_token = True
                self.stats.first_token(self.route, now - self.started_at)
            choice.parts.append(event.text)
            choice.last_text = event.text
            choice.logprobs += event.logprobs
        elif isinstance(event, Finished):
            choice.result = event.result
            tokens = _generated(event.result)
            self.stats.choice_done(self.route, tokens, now - (choice.first_at or now))

    def _finish_reason(self, choice: _Choice) -> str:
        assert choice.result is not None
        if choice.result.finish_reason is not None:  # the worker's own word (an engine's too)
            return str(choice.result.finish_reason)
        return api.finish_reason(_generated(choice.result), self.params.max_tokens, last_text=choice.last_text)

    async def _usage(self, *, with_attestation: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
        done = [c.result for c in self.choices if c.result is not None]
        completion = sum(_generated(r) for r in done)
        n = self.params.n
        # OpenAI counts a prompt once however many choices it has (each job was billed for it).
        prompt = sum(c.result.usage_units - _generated(c.result) for c in self.choices if c.result and c.index % n == 0)
        att = await results.attestation(self.node, done[0], self.terms.require_tee) if with_attestation else None
        return results.usage_of(self.model, done, completion=completion, prompt=prompt, attestation=att), att

    # ---- a whole answer -----------------------------------------------------------------------

    async def whole(self) -> Response:
        """Run the jobs to the end and answer at once (APIError when one fails)."""
        failure: JobFailed | None = None
        async with trio.open_nursery() as nursery:
            send, recv = trio.open_memory_channel[Event](math.inf)
            nursery.start_soon(self.run, send)
            async with recv:
                async for event in recv:
                    if isinstance(event, Failed):
                        failure = event.error
                        nursery.cancel_scope.cancel()  # the other choices are of no use now
                        break
                    self._note(event)
        if failure is not None:
            raise results.failed(failure)
        usage, att = await self._usage(with_attestation=True)
        finished = [
            chat.Choice(
                c.index,
                "".join(c.parts),
                self._finish_reason(c),
                tuple(c.logprobs) if c.logprobs_asked else None,
                c.result.tool_calls if c.result is not None else (),
            )
            for c in self.choices
        ]
        build = chat.chat_response if self.endpoint is Endpoint.CHAT else completions.completion_response
        body = build(self.id, self.created, self.model.name, finished, usage, self.model.fingerprint)
        response = Response.of_json(body)
        response.headers += results.attested_headers(att)
        return response

    # ---- a streamed answer ---------------------------------------------------------------------

    async def stream(self, sink: ResponseSink) -> None:
        """Run the jobs and stream their chunks to ``sink`` (a :class:`~.http.Response` writer)."""
        async with trio.open_nursery() as nursery:
            send, recv = trio.open_memory_channel[Event](math.inf)
            nursery.start_soon(self.run, send)
            try:
                async with recv:
                    await self._stream(sink, recv)
            finally:
                nursery.cancel_scope.cancel()

    async def _stream(self, sink: ResponseSink, recv: trio.MemoryReceiveChannel[Event]) -> None:
        first = await _next(recv)
        if isinstance(first, Failed):
            error = results.failed(first.error)
            self.stats.answered(self.route, error.status)
            return await sink.respond(Response.of_json(error.body(), error.status))
        await sink.start(200, content_type="text/event-stream", headers=[("cache-control", "no-cache")])
        self.stats.answered(self.route, 200)
        if self.endpoint is Endpoint.CHAT:  # each choice opens with the role, as OpenAI's streams do
            for c in self.choices:  # held: they go out with the first token, in one write
                await sink.send(self._chunk(c.index, delta={"role": "assistant", "content": ""}), more=True)
        event: Event | None = first
        while event is not None:
            if isinstance(event, Failed):  # the head is sent: the error goes in the stream, as OpenAI does
                await sink.send(wire.sse_event(results.failed(event.error).body()))
                break
            self._note(event)
            if isinstance(event, Delta) and (
                event.text or (event.logprobs and self.choices[event.index].logprobs_asked)
            ):
                await sink.send(self._delta(event))
            elif isinstance(event, Finished):
                if event.result.tool_calls:  # whole calls, in one delta (a stream may split them; it need not)
                    calls = [c.as_openai(i) for i, c in enumerate(event.result.tool_calls)]
                    await sink.send(self._chunk(event.index, delta={"tool_calls": calls}), more=True)
                await sink.send(
                    self._chunk(event.index, delta={}, finish=self._finish_reason(self.choices[event.index]))
                )
            event = await _next(recv)
        else:
            if self.params.include_usage:
                usage, _ = await self._usage(with_attestation=True)
                await sink.send(self._chunk(None, usage=usage), more=True)
        await sink.send(wire.SSE_DONE, more=True)  # with the stream's end
        self.stats.took(self.route, time.perf_counter() - self.started_at)

    def _delta(self, event: Delta) -> bytes:
        choice = self.choices[event.index]
        logprobs = event.logprobs if choice.logprobs_asked else None
        if self.endpoint is Endpoint.CHAT:
            return self._chunk(event.index, delta={"content": event.text}, logprobs=logprobs)
        offset = choice.offset
        choice.offset += sum(len(lp.token) for lp in event.logprobs)
        return self._chunk(event.index, text=event.text, logprobs=logprobs, offset=offset)

    def _chunk(
        self,
        index: int | None,
        *,
        delta: dict[str, Any] | None = None,
        text: str | None = None,
        finish: str | None = None,
        logprobs: Sequence[TokenLogprob] | None = None,
        offset: int = 0,
        usage: dict[str, Any] | None = None,
    ) -> bytes:
        """One event; ``index`` None: the closing usage chunk (no choices)."""
        common: dict[str, Any] = {
            "finish": finish,
            "logprobs": logprobs,
            "usage": usage,
            "with_usage": self.params.include_usage,
            "fingerprint": self.model.fingerprint,
        }
        if self.endpoint is Endpoint.CHAT:
            return chat.chat_chunk(
                self.id,
                self.created,
                self.model.name,
                index=index or 0,
                delta=None if index is None else delta,
                **common,
            )
        if index is not None and text is None:
            text = ""  # a finish chunk
        return completions.completion_chunk(
            self.id, self.created, self.model.name, index=index or 0, text=text, offset=offset, **common
        )


def _put(send: trio.MemorySendChannel[Event], event: Event) -> bool:
    """Send ``event`` unless the reader has gone (the answer was settled, or the client left):
    a job resumed with a chunk in hand may get here before its cancellation does."""
    try:
        send.send_nowait(event)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _next(recv: trio.MemoryReceiveChannel[Event]) -> Event | None:
    try:
        return await recv.receive()
    except trio.EndOfChannel:
        return None


def _generated(result: InferenceResult) -> int:
    """The tokens a generation's worker billed as generated (an engine streams text without
    token ids); a worker that did not split its bill streamed one id per token."""
    return result.completion_units or len(result.token_ids)
