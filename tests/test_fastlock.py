"""FastLock: mutual exclusion without a scheduler trip when free."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cocoon_p2p.transport.fastlock import FastLock


async def test_excludes_and_hands_over() -> None:
    lock = FastLock()
    inside: list[int] = []
    overlaps: list[int] = []

    async def worker(k: int) -> None:
        for _ in range(20):
            async with lock:
                if inside:
                    overlaps.append(k)
                inside.append(k)
                await trio.sleep(0)  # others run while we hold it, and must wait
                inside.remove(k)

    async with trio.open_nursery() as n:
        for k in range(5):
            n.start_soon(worker, k)
    assert overlaps == [] and not lock.locked()


async def test_free_lock_is_taken_without_yielding() -> None:
    lock = FastLock()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with trio.open_nursery() as n:
        n.start_soon(other)
        async with lock:  # no checkpoint: the task started above has not run yet
            assert ran == []
    assert ran == ["other"]


async def test_a_cancelled_waiter_leaves_the_lock_usable() -> None:
    lock = FastLock()
    await lock.acquire()
    with trio.move_on_after(0.01) as scope:
        await lock.acquire()
    assert scope.cancelled_caught and lock.locked()
    lock.release()
    assert lock.acquire_nowait() and not lock.acquire_nowait()
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


async def test_release_wakes_a_waiter() -> None:
    lock = FastLock()
    got: list[str] = []

    async def waiter() -> None:
        async with lock:
            got.append("waiter")

    async with trio.open_nursery() as n:
        await lock.acquire()
        n.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        lock.release()
    assert got == ["waiter"]


async def test_waiters_get_the_lock_in_arrival_order() -> None:
    """A release hands the lock to the longest waiter: a task that comes along
    meanwhile cannot jump the queue (job ids must reach the wire in order)."""
    lock = FastLock()
    order: list[int] = []

    async def take(k: int) -> None:
        async with lock:
            order.append(k)

    async with trio.open_nursery() as n:
        await lock.acquire()
        for k in range(4):
            n.start_soon(take, k)
            await trio.testing.wait_all_tasks_blocked()
        lock.release()
        assert not lock.acquire_nowait()  # handed to waiter 0, not free for a newcomer
        n.start_soon(take, 99)
    assert order == [0, 1, 2, 3, 99]
