"""The client's retry policy (JobAttempts): pure, table-driven, no trio."""

from __future__ import annotations

import math
import random

import pytest

from cocoon_p2p.core.errors import LocalProtocolError
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.jobs.attempts import (
    ATTEMPTS,
    BUSY_BACKOFF_S,
    MAX_BUSY,
    MAX_BUSY_BACKOFF_S,
    JobAttempts,
    JobFailed,
    retryable,
)
from cocoon_p2p.jobs.routing import COOLDOWN_S, DEFAULT_JOB_S, EWMA_ALPHA, Router

from .helpers import worker_offer as offer

A, B, C = offer(1), offer(2), offer(3)


def plan(*, max_attempts: int = 3, deadline: float = math.inf, max_price: int = 1) -> JobAttempts:
    return JobAttempts(Router(rng=random.Random(1)), max_price=max_price, max_attempts=max_attempts, deadline=deadline)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (jf.BUSY, True),
        (jf.BACKEND, True),
        (jf.SHUTTING_DOWN, True),
        (jf.UNKNOWN_MODEL, True),
        (jf.PRICE, True),
        (jf.WORKER_LOST, True),
        (jf.PAYMENT_SETUP, True),
        (jf.BAD_INPUT, False),
        (jf.TOO_LARGE, False),
        (jf.DEADLINE, False),
        (jf.CANCELLED, False),
        (jf.PAYMENT, False),
        (jf.NO_WORKERS, False),
    ],
)
def test_which_codes_go_to_another_worker(code: str, expected: bool) -> None:
    assert retryable(code) is expected
    assert JobFailed(code, "x").retryable is expected


@pytest.mark.parametrize(
    ("code", "streamed", "retry", "forget", "then"),
    [
        (jf.BACKEND, False, True, False, None),  # another worker may take it
        (jf.WORKER_LOST, False, True, True, None),  # and the lost one is forgotten
        (jf.PAYMENT_SETUP, False, True, False, None),
        (jf.BAD_INPUT, False, False, False, jf.BAD_INPUT),  # would fail anywhere: the job ends
        (jf.DEADLINE, False, False, False, jf.DEADLINE),
        (jf.BACKEND, True, False, False, jf.BACKEND),  # the caller saw part of an answer: never retried
        (jf.WORKER_LOST, True, False, True, jf.WORKER_LOST),
    ],
)
def test_what_a_failed_attempt_leads_to(code: str, streamed: bool, retry: bool, forget: bool, then: str | None) -> None:
    p = plan()
    p.started(A.peer_id)
    after = p.failed(A.peer_id, code, now=10.0, streamed=streamed)
    assert (after.retry, after.forget_worker) == (retry, forget)
    assert p.stop(10.0) == then
    assert p.router.estimates[A.peer_id].avoid_until == 10.0 + COOLDOWN_S  # every failure cools the worker down


@pytest.mark.parametrize(
    ("max_attempts", "failures", "now", "deadline", "stop"),
    [
        (3, [], 0.0, math.inf, None),
        (3, [jf.BACKEND, jf.BACKEND], 0.0, math.inf, None),
        (3, [jf.SHUTTING_DOWN, jf.BACKEND, jf.PRICE], 0.0, math.inf, jf.PRICE),  # out of attempts: the last code
        (1, [jf.BUSY, jf.BUSY, jf.BUSY], 0.0, math.inf, None),  # busy uses up no attempt
        (1, [jf.WORKER_LOST], 0.0, math.inf, jf.WORKER_LOST),
        (3, [], 5.0, 5.0, jf.DEADLINE),  # no attempt starts at the deadline
        (3, [jf.BUSY], 6.0, 5.0, jf.DEADLINE),  # nor does it outlive the deadline
        (3, [jf.BACKEND, jf.BAD_INPUT], 6.0, 5.0, jf.BAD_INPUT),  # a job already ended keeps its reason
    ],
)
def test_when_to_stop(max_attempts: int, failures: list[str], now: float, deadline: float, stop: str | None) -> None:
    p = plan(max_attempts=max_attempts, deadline=deadline)
    for i, code in enumerate(failures):
        p.started(offer(i + 1).peer_id)
        p.failed(offer(i + 1).peer_id, code, now=0.0)
    assert p.stop(now) == stop
    assert p.count == len(failures) and p.last_code == (failures[-1] if failures else None)


def test_each_worker_is_tried_once_then_no_worker_is_left() -> None:
    p = plan(max_attempts=5)
    seen = []
    while p.stop(0.0) is None and (o := p.choose([A, B, C], now=0.0)) is not None:
        p.started(o.peer_id)
        seen.append(o.peer_id)
        p.failed(o.peer_id, jf.BACKEND, now=0.0)
    assert sorted(seen) == sorted([A.peer_id, B.peer_id, C.peer_id]) and p.exclude == frozenset(seen)
    assert p.stop(0.0) is None and p.choose([A, B, C], now=0.0) is None  # the caller ends it: no-workers


def test_busy_is_waited_out_with_a_growing_jittered_back_off_on_any_worker() -> None:
    """Backpressure: the only worker refusing busy is asked again after a short wait, as
    often as it takes (up to MAX_BUSY), using up no attempt; it is not cooled down for long."""
    p = plan(max_attempts=1)
    now, waits = 0.0, []
    for k in range(MAX_BUSY):
        o = p.choose([A], now=now)
        assert o == A, f"busy refusal {k}: the worker is not eligible again after its back-off"
        p.started(A.peer_id)
        after = p.failed(A.peer_id, jf.BUSY, now=now)
        assert after.retry and not after.forget_worker and p.stop(now) is None
        base = min(MAX_BUSY_BACKOFF_S, BUSY_BACKOFF_S * 2**k)
        assert base / 2 <= after.wait_s <= base
        assert p.router.estimates[A.peer_id].avoid_until == now + after.wait_s
        waits.append(after.wait_s)
        now += after.wait_s
    assert waits[0] < waits[3] < MAX_BUSY_BACKOFF_S and sum(waits) < 25
    p.started(A.peer_id)  # the next busy counts as an ordinary failure: the job's one attempt is spent
    after = p.failed(A.peer_id, jf.BUSY, now=now)
    assert after.wait_s == 0 and p.stop(now) == jf.BUSY


def test_choice_keeps_the_price_cap() -> None:
    p = plan(max_price=5)
    assert p.choose([offer(1, price=10), offer(2, price=5)], now=0.0) == offer(2, price=5)
    assert p.choose([offer(1, price=10)], now=0.0) is None


@pytest.mark.parametrize(
    ("elapsed_s", "compute_us", "learnt"),
    [
        (2.0, 20_000, 0.02),  # the worker's own compute time, not the queueing around it
        (0.3, 0, 0.3),  # no figure from the worker: the elapsed time stands in
    ],
)
def test_a_result_teaches_the_router(elapsed_s: float, compute_us: int, learnt: float) -> None:
    p = plan()
    p.started(A.peer_id)
    assert p.router.estimates[A.peer_id].running == 1
    p.succeeded(A.peer_id, elapsed_s, compute_us=compute_us)
    est = p.router.estimates[A.peer_id]
    assert est.running == 0 and est.jobs_ok == 1
    assert est.avg_job_s == pytest.approx(DEFAULT_JOB_S + EWMA_ALPHA * (learnt - DEFAULT_JOB_S))


def test_an_interrupted_attempt_is_not_the_workers_fault() -> None:
    p = plan()
    p.started(A.peer_id)
    p.interrupted(A.peer_id, now=3.0)
    est = p.router.estimates[A.peer_id]
    assert est.running == 0 and est.avoid_until == 3.0  # no cool-down


@pytest.mark.parametrize("max_attempts", [0, -1])
def test_a_job_needs_an_attempt(max_attempts: int) -> None:
    with pytest.raises(LocalProtocolError):
        plan(max_attempts=max_attempts)


def test_attempts_code_when_none_failed() -> None:
    p = plan(max_attempts=1)
    p.started(A.peer_id)  # started, and never reported back
    assert p.stop(0.0) == ATTEMPTS
