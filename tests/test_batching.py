"""Batcher: full batches leave at once, partial ones after the wait; cancellation."""

from cocoon_p2p.batching import Batch, Batcher


def test_full_batch_leaves_at_once_and_rest_waits() -> None:
    b: Batcher[int] = Batcher(max_batch=3, max_wait_s=0.01)
    assert b.add("m", 1, now=0.0) == []
    assert b.add("m", 2, now=0.001) == []
    assert b.add("m", 3, now=0.002) == [Batch("m", (1, 2, 3))]
    assert b.add("m", 4, now=0.003) == []
    assert b.next_deadline() == 0.003 + 0.01
    assert b.due(0.005) == []
    assert b.due(0.013) == [Batch("m", (4,))]
    assert b.next_deadline() is None and b.waiting() == 0


def test_keys_batch_separately_and_removal() -> None:
    b: Batcher[str] = Batcher(max_batch=4, max_wait_s=0.01)
    b.add("a", "a1", 0.0)
    b.add("b", "b1", 0.005)
    b.add("a", "a2", 0.006)
    assert b.remove("a", "a2") and not b.remove("a", "a2")
    assert b.due(0.011) == [Batch("a", ("a1",))]
    assert b.due(0.015) == [Batch("b", ("b1",))]


def test_zero_wait_runs_everything_now() -> None:
    b: Batcher[int] = Batcher(max_batch=8, max_wait_s=0)
    assert b.add("m", 1, 0.0) == [Batch("m", (1,))]
