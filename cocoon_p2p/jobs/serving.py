"""One model as a worker serves it: what runs it (an ONNX :class:`~.executor.Executor`
or an engine's :class:`~cocoon_p2p.execution.engine_runner.EngineRunner`: a :class:`Runner`),
its batcher and timing, a generation's stream as the worker drives it
(:func:`open_generation`), and the frame that ends each of its jobs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import LocalProtocolError
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.pricing import FREE, Price
from cocoon_p2p.execution.chat_options import ToolCall
from cocoon_p2p.execution.engine import EngineError, Generation, GenerationStep
from cocoon_p2p.execution.engine_runner import EngineHealth, EngineRunner
from cocoon_p2p.execution.executor import Outcome, RunRequest
from cocoon_p2p.execution.generation import TokenStream
from cocoon_p2p.execution.limits import InputLimits
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.sampling import GREEDY, FinishReason

from . import frames as jf
from .batching import Batcher
from .receipts import Receipt, inputs_digest, outputs_digest
from .worker_link import WorkerJob

# Batches faster than this run on the event loop's thread, when the model is idle: the
# thread hop costs ~0.1 ms and blocks the loop at most this long. Under load the
# average run grows and batches go to a thread.
INLINE_RUN_S = 0.005
FLUSH_ACCEPTED_S = 0.05  # batches slower than this send JobAccepted before they run
EWMA_ALPHA = 0.2  # weight of the latest run in a model's average run time
CLIENT_CANCELLED = (jf.CANCELLED, "cancelled by the client")
_STREAM_CODES = frozenset({jf.BAD_INPUT, jf.TOO_LARGE, jf.BUSY, jf.BACKEND})  # what an engine failure may be
# Where a worker says that an engine model went down (False) or came back (True): the
# node stops advertising it, then advertises it again.
HealthHook = Callable[[bytes, bool], None]
log = logging.getLogger(__name__)


class Runner(Protocol):
    """What a worker needs of what runs a model (an Executor or an EngineRunner)."""

    limits: InputLimits

    def check(self, req: RunRequest) -> object: ...

    def run(self, requests: list[RunRequest]) -> list[Outcome]: ...

    def verify(self, req: RunRequest) -> Outcome: ...

    def token_stream(self, req: RunRequest) -> tuple[Iterator[tuple[int, str]], int]: ...


@dataclass
class Served:
    """A model being served: what runs it, what it costs, and its batches' state.

    ``limit``: jobs of this model at once (None: the worker's capacity alone), beyond
    which it answers ``busy``; ``available``: False while its engine is down (jobs are
    refused with ``backend``)."""

    spec: ModelSpec
    executor: Runner
    price: Price
    batcher: Batcher[WorkerJob]
    wake: trio.Event = field(default_factory=trio.Event)
    avg_run_s: float = 0.01  # EWMA of one batch's run time; assume slow until measured
    busy: bool = False  # a batch of this model is running
    limit: int | None = None
    running: int = 0  # its jobs admitted and not finished
    available: bool = True
    threads: trio.CapacityLimiter | None = None  # an engine's streams wait in their own threads

    def observe_run(self, elapsed_s: float) -> None:
        self.avg_run_s += EWMA_ALPHA * (elapsed_s - self.avg_run_s)

    def accepted(self, job_id: int) -> jf.JobAccepted:
        """The frame that tells a client its job runs, and at what price."""
        return jf.JobAccepted(
            job_id=job_id,
            price_nanoton=self.price.unit,
            unit=self.spec.unit,
            completion_price_nanoton=self.price.completion_wire,
        )

    def quick_and_idle(self) -> bool:
        """A job may run inline now: the model is idle, nothing waits for it, and its runs are quick."""
        return not self.busy and not self.batcher.waiting() and self.avg_run_s < INLINE_RUN_S


def run_request(req: jf.JobRequest) -> RunRequest:
    """What the executor needs of a wire request."""
    return RunRequest(
        inputs=req.inputs,
        texts=req.texts,
        max_tokens=req.max_tokens,
        verify_tokens=req.verify_tokens,
        sampling=req.sampling or GREEDY,
        chat=req.chat,
    )


class _TokenGeneration:
    """An executor's token stream as a :class:`Generation`: one token per step. A model
    step cannot be cut off, so the worker stops it between tokens (not interruptible)."""

    interruptible = False

    def __init__(self, stream: TokenStream, prompt_tokens: int) -> None:
        self.stream = stream
        self.prompt_tokens = prompt_tokens
        self._seq = 0

    def next_step(self) -> GenerationStep | None:
        step = self.stream.next_or_none()
        if step is None:
            return None
        token, text = step
        logprobs = tuple(self.stream.logprobs[self._seq : self._seq + 1])  # this token's, when asked for
        self._seq += 1
        return GenerationStep(text, (token,), logprobs)

    def buffered(self) -> bool:
        return False

    def close(self) -> None:
        pass  # the stream's generator goes with it

    def units(self, chunks: int) -> tuple[int, int]:
        return self.prompt_tokens, chunks

    def reason(self, chunks: int) -> FinishReason | None:
        ids = self.stream.ids
        if self.stream.stopped or (ids and ids[-1] in self.stream.eos):
            return FinishReason.STOP
        return FinishReason.LENGTH if len(ids) >= self.stream.max_new else None

    def tool_calls(self) -> tuple[ToolCall, ...]:
        return ()  # our models call no tools


def open_generation(runner: Runner, run: RunRequest) -> Generation:
    """A checked generation job's stream on ``runner`` (nothing runs yet)."""
    if isinstance(runner, EngineRunner):
        return runner.open_generation(run)
    stream, prompt_tokens = runner.token_stream(run)
    assert isinstance(stream, TokenStream)  # an Executor's; for mypy
    return _TokenGeneration(stream, prompt_tokens)


@dataclass(frozen=True)
class Streamed:
    """How a generation's stream ended: ``chunks`` sent (their token ids and text), or an
    ``error`` (code, message) to end the job with."""

    chunks: int
    tokens: tuple[int, ...] = ()
    text: str = ""
    error: tuple[str, str] | None = None


async def stream_generation(served: Served, job: WorkerJob, gen: Generation) -> Streamed:
    """Send ``gen``'s chunks to the job's client until it ends, the job is cancelled, its
    deadline passes or the client goes away.

    An ONNX model stops between tokens. An engine's stream is cut off at once: a cancel
    closes it (the worker's ``_cancel``), and so does its deadline or this task's
    cancellation (the thread is abandoned, and wakes when its stream closes)."""
    seq = 0
    tokens: list[int] = []
    texts: list[str] = []
    deadline = trio.current_time() + max(0, job.req.deadline_ms - now_ms()) / 1000
    while True:
        if job.cancelled:
            return Streamed(seq, error=CLIENT_CANCELLED)
        if job.req.deadline_ms <= now_ms():
            return Streamed(seq, error=(jf.DEADLINE, f"deadline passed after {seq} chunks"))
        try:
            if not gen.interruptible:
                step = await trio.to_thread.run_sync(gen.next_step)
            elif gen.buffered():  # already here: no thread hop
                step = gen.next_step()
            else:
                step = None
                with trio.move_on_at(deadline) as scope:
                    step = await trio.to_thread.run_sync(  # type: ignore[call-arg]  # mypy and Unpack
                        gen.next_step, abandon_on_cancel=True, limiter=served.threads
                    )
                if scope.cancelled_caught:  # the deadline, with the engine silent
                    gen.close()  # the abandoned thread wakes and ends; nobody calls next_step again
                    return Streamed(seq, error=(jf.DEADLINE, f"deadline passed after {seq} chunks"))
        except Exception as exc:
            if job.cancelled:  # our own close() woke it
                return Streamed(seq, error=CLIENT_CANCELLED)
            code = exc.code if isinstance(exc, EngineError) and exc.code in _STREAM_CODES else jf.BACKEND
            log.warning(
                "generation failed: %s",
                exc,
                extra=fields(model=served.spec.name, peer=job.link.peer, job=job.req.job_id),
            )
            return Streamed(seq, error=(code, str(exc)[:200]))
        if step is None:
            return Streamed(seq, tuple(tokens), "".join(texts))
        try:
            chunk = jf.JobChunk(
                job_id=job.req.job_id, seq=seq, token_ids=step.token_ids, text=step.text, logprobs=step.logprobs
            )
            await job.link.send(chunk)
        except Exception:  # the client is gone: stop generating for nobody
            job.cancelled = True
            continue
        tokens.extend(step.token_ids)
        texts.append(step.text)
        seq += 1


class EngineWatch:
    """How a worker checks an engine: a probe every ``interval_s``; down after ``failures``
    failed probes in a row (see :class:`~cocoon_p2p.execution.engine_runner.EngineHealth`)."""

    def __init__(self, interval_s: float = 5.0, failures: int = 3) -> None:
        self.interval_s = interval_s
        self.failures = failures


async def watch_engine(served: Served, runner: EngineRunner, watch: EngineWatch, on_health: HealthHook | None) -> None:
    """Probe the engine every ``watch.interval_s``; mark the model unavailable after
    ``watch.failures`` failed probes in a row, available again at the first good one,
    and tell ``on_health``. Runs until cancelled (a probe under way is abandoned)."""
    health = EngineHealth(watch.failures)
    while True:
        await trio.sleep(watch.interval_s)
        probe = partial(runner.probe, busy=served.running > 0)
        result = await trio.to_thread.run_sync(probe, abandon_on_cancel=True)  # type: ignore[call-arg]
        changed = health.observe(result)
        if changed is None:
            continue
        served.available = changed
        log.warning("engine is %s", "back up" if changed else "down", extra=fields(model=served.spec.name))
        if on_health is not None:
            on_health(served.spec.model_id, changed)


def timed_run(served: Served, runs: list[RunRequest]) -> tuple[list[Outcome], float]:
    """The run alone, and how long it took (without any thread hop)."""
    t0 = time.perf_counter()
    outcomes = served.executor.run(runs)
    return outcomes, time.perf_counter() - t0


def last_frame(
    job: WorkerJob,
    *,
    outcome: Outcome | None = None,
    price: Price = FREE,
    compute_us: int = 0,
    error: tuple[str, str] | None = None,
    signer: Identity | None = None,
    token_ids: tuple[int, ...] = (),
    text: str = "",
) -> jf.JobResult | jf.JobError:
    """The frame that ends ``job``: its result (``outcome`` at ``price``; with
    ``signer``, its receipt signed over the outputs and the ``token_ids`` streamed, or the
    ``text`` streamed when there are no token ids: an engine's), or ``error`` as (code,
    message). A result too large to send is a ``too-large`` error."""
    if outcome is not None:
        req = job.req
        receipt = b""
        cost = price.cost(outcome.units, outcome.completion_units)
        if signer is not None:
            receipt = (
                Receipt(
                    worker=signer.peer_id,
                    client=job.link.peer,
                    job_id=req.job_id,
                    model_id=req.model_id,
                    inputs_digest=inputs_digest(
                        req.model_id, req.inputs, req.texts, req.max_tokens, req.verify_tokens, req.sampling, req.chat
                    ),
                    outputs_digest=outputs_digest(outcome.outputs, token_ids, text, outcome.tool_calls),
                    usage_units=outcome.units,
                    cost_nanoton=cost,
                )
                .signed_by(signer)
                .signature
            )
        frame = jf.JobResult(
            job_id=req.job_id,
            outputs=outcome.outputs,
            usage_units=outcome.units,
            cost_nanoton=cost,
            compute_us=compute_us,
            receipt=receipt,
            completion_units=outcome.completion_units,
            finish_reason=outcome.finish_reason,
            tool_calls=outcome.tool_calls,
        )
        if not _maybe_large(outcome):
            return frame
        try:
            jf.encode_frame(frame)
        except LocalProtocolError:  # a result too large to send: the job fails, unpaid
            error = (jf.TOO_LARGE, "the result exceeds the frame limit")
        else:
            return frame
    if error is None:
        raise LocalProtocolError("a job ends with an outcome or an error")
    return jf.JobError(job_id=job.req.job_id, code=error[0], message=error[1])


def _maybe_large(outcome: Outcome) -> bool:
    """Whether a result could exceed the frame limit (only then is it encoded twice)."""
    return sum(len(t.data) for t in outcome.outputs) > jf.MAX_FRAME // 2
