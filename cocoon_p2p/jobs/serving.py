"""One model as a worker serves it: its executor, batcher and timing, and the
frame that ends each of its jobs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from cocoon_p2p.core.errors import LocalProtocolError
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.execution.executor import Executor, Outcome, RunRequest
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.sampling import GREEDY

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


@dataclass
class Served:
    """A model being served: what runs it, what it costs, and its batches' state."""

    spec: ModelSpec
    executor: Executor
    price_nanoton: int
    batcher: Batcher[WorkerJob]
    wake: trio.Event = field(default_factory=trio.Event)
    avg_run_s: float = 0.01  # EWMA of one batch's run time; assume slow until measured
    busy: bool = False  # a batch of this model is running

    def observe_run(self, elapsed_s: float) -> None:
        self.avg_run_s += EWMA_ALPHA * (elapsed_s - self.avg_run_s)

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
    )


def timed_run(served: Served, runs: list[RunRequest]) -> tuple[list[Outcome], float]:
    """The run alone, and how long it took (without any thread hop)."""
    t0 = time.perf_counter()
    outcomes = served.executor.run(runs)
    return outcomes, time.perf_counter() - t0


def last_frame(
    job: WorkerJob,
    *,
    outcome: Outcome | None = None,
    price: int = 0,
    compute_us: int = 0,
    error: tuple[str, str] | None = None,
    signer: Identity | None = None,
    token_ids: tuple[int, ...] = (),
) -> jf.JobResult | jf.JobError:
    """The frame that ends ``job``: its result (``outcome`` at ``price`` per unit; with
    ``signer``, its receipt signed over the outputs and the ``token_ids`` streamed), or
    ``error`` as (code, message). A result too large to send is a ``too-large`` error."""
    if outcome is not None:
        req = job.req
        receipt = b""
        if signer is not None:
            receipt = (
                Receipt(
                    worker=signer.peer_id,
                    client=job.link.peer,
                    job_id=req.job_id,
                    model_id=req.model_id,
                    inputs_digest=inputs_digest(
                        req.model_id, req.inputs, req.texts, req.max_tokens, req.verify_tokens, req.sampling
                    ),
                    outputs_digest=outputs_digest(outcome.outputs, token_ids),
                    usage_units=outcome.units,
                    cost_nanoton=outcome.units * price,
                )
                .signed_by(signer)
                .signature
            )
        frame = jf.JobResult(
            job_id=req.job_id,
            outputs=outcome.outputs,
            usage_units=outcome.units,
            cost_nanoton=outcome.units * price,
            compute_us=compute_us,
            receipt=receipt,
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
