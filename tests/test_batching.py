"""Batcher: no added latency when idle, full batches under load, optional wait, cancellation."""

import pytest

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.jobs.batching import Batch, Batcher


def test_idle_model_runs_a_lone_job_at_once() -> None:
    b: Batcher[int] = Batcher(max_batch=4)
    b.add("m", 1, now=0.0)
    assert b.take(0.0) == Batch("m", (1,))
    assert b.take(0.0) is None and b.next_deadline() is None


def test_jobs_queued_while_busy_leave_together_in_order() -> None:
    b: Batcher[int] = Batcher(max_batch=3)
    for i in range(7):
        b.add("m", i, now=i * 0.001)
    assert b.take(0.01) == Batch("m", (0, 1, 2))
    assert b.take(0.01) == Batch("m", (3, 4, 5))
    assert b.take(0.01) == Batch("m", (6,))
    assert b.waiting() == 0


def test_keys_batch_separately_oldest_first() -> None:
    b: Batcher[str] = Batcher(max_batch=4)
    b.add("a", "a1", 0.0)
    b.add("b", "b1", 0.001)
    b.add("a", "a2", 0.002)
    assert b.take(0.003) == Batch("a", ("a1", "a2"))
    assert b.take(0.003) == Batch("b", ("b1",))


def test_optional_wait_for_company() -> None:
    b: Batcher[int] = Batcher(max_batch=3, max_wait_s=0.01)
    b.add("m", 1, now=0.0)
    assert b.take(0.005) is None
    assert b.next_deadline() == 0.01
    b.add("m", 2, now=0.006)
    assert b.take(0.01) == Batch("m", (1, 2))
    for i in range(3):
        b.add("m", i, now=0.02)
    assert b.take(0.02) == Batch("m", (0, 1, 2))  # full: no wait


def test_cancelled_item_is_taken_back() -> None:
    b: Batcher[str] = Batcher(max_batch=4)
    b.add("a", "x", 0.0)
    b.add("a", "y", 0.0)
    assert b.remove("a", "x") and not b.remove("a", "x") and not b.remove("zz", "x")
    assert b.take(0.0) == Batch("a", ("y",))


@pytest.mark.parametrize(("max_batch", "max_wait_s"), [(0, 0.0), (4, -0.1)])
def test_batcher_limits_are_checked(max_batch: int, max_wait_s: float) -> None:
    with pytest.raises(ConfigError):
        Batcher(max_batch=max_batch, max_wait_s=max_wait_s)
