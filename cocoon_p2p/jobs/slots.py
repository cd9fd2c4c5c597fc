"""A worker's job slots, and the slots each of its streams holds (pure: no trio).

A worker admits ``capacity`` jobs at once. Each slot is held by the stream whose
request took it (a :class:`StreamSlots`), keyed by job id, and goes back when the
job ends; when the stream ends, for whatever reason (a clean close, a reset, a
protocol violation, an exception on any path of the worker), closing its
:class:`StreamSlots` gives back every slot it still holds, and a closed one takes
no more. So no slot can outlive its stream, whichever path ended it (issue 15: a
flood of pipelined requests left one slot taken per closed stream).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from cocoon_p2p.core.errors import ConfigError, LocalProtocolError

T = TypeVar("T")


class Slots:
    """The worker's ``capacity`` slots, shared by all its streams."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ConfigError(f"a worker admits at least one job at once, not {capacity}")
        self.capacity = capacity
        self.taken = 0

    @property
    def free(self) -> int:
        return self.capacity - self.taken

    def stream(self) -> StreamSlots[T]:
        """The slots of a new stream (empty)."""
        return StreamSlots(self)


class StreamSlots(Generic[T]):
    """The slots one stream holds, one per admitted job, by job id."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self._held: dict[int, T] = {}
        self.closed = False

    def hold(self, job_id: int, job: T) -> bool:
        """Take a slot for ``job``; False when none is free or the stream has ended."""
        if self.closed or self._slots.free <= 0:
            return False
        if job_id in self._held:
            raise LocalProtocolError(f"job {job_id} already holds a slot")
        self._held[job_id] = job
        self._slots.taken += 1
        return True

    def release(self, job_id: int) -> T | None:
        """Give back the slot of ``job_id``: its job, or None when it held none (already ended)."""
        job = self._held.pop(job_id, None)
        if job is not None:
            self._slots.taken -= 1
        return job

    def close(self) -> list[T]:
        """The stream ended: give back every slot; the jobs that held them (now abandoned)."""
        self.closed = True
        jobs = list(self._held.values())
        self._slots.taken -= len(jobs)
        self._held.clear()
        return jobs

    def get(self, job_id: int) -> T | None:
        return self._held.get(job_id)

    def __len__(self) -> int:
        return len(self._held)

    def __iter__(self) -> Iterator[int]:
        return iter(self._held)

    def values(self) -> list[T]:
        return list(self._held.values())
