"""A worker's job slots, and the slots each of its streams holds (pure: no trio).

A worker admits ``capacity`` jobs at once. Each slot is held by the stream whose
request took it (a :class:`StreamSlots`), keyed by job id, and goes back when the
job ends; when the stream ends, for whatever reason (a clean close, a reset, a
protocol violation, an exception on any path of the worker), closing its
:class:`StreamSlots` gives back every slot it still holds, and a closed one takes
no more. So no slot can outlive its stream, whichever path ended it (issue 15: a
flood of pipelined requests left one slot taken per closed stream).

``per_client`` caps the slots one client (a PeerId, over all its streams) may hold,
so one greedy client cannot take every slot; its bytes in flight are then bounded
too, by that many jobs of the models' input limits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Generic, TypeVar

from cocoon_p2p.core.errors import ConfigError, LocalProtocolError

T = TypeVar("T")


class Slots:
    """The worker's ``capacity`` slots, shared by all its streams."""

    def __init__(self, capacity: int, *, per_client: int | None = None) -> None:
        if capacity < 1:
            raise ConfigError(f"a worker admits at least one job at once, not {capacity}")
        if per_client is not None and per_client < 1:
            raise ConfigError(f"a client may run at least one job at once, not {per_client}")
        self.capacity = capacity
        self.per_client = min(per_client or capacity, capacity)
        self.taken = 0
        self.by_client: Counter[bytes] = Counter()

    @property
    def free(self) -> int:
        return self.capacity - self.taken

    def free_for(self, client: bytes) -> int:
        """Slots ``client`` may still take."""
        return min(self.free, self.per_client - self.by_client[client])

    def stream(self, client: bytes = b"") -> StreamSlots[T]:
        """The slots of a new stream from ``client`` (empty)."""
        return StreamSlots(self, client)

    def _add(self, client: bytes, n: int) -> None:
        self.taken += n
        self.by_client[client] += n
        if self.by_client[client] <= 0:
            del self.by_client[client]


class StreamSlots(Generic[T]):
    """The slots one stream holds, one per admitted job, by job id."""

    def __init__(self, slots: Slots, client: bytes) -> None:
        self._slots = slots
        self._client = client
        self._held: dict[int, T] = {}
        self.closed = False

    def hold(self, job_id: int, job: T) -> bool:
        """Take a slot for ``job``; False when none is free (for this client) or the stream has ended."""
        if self.closed or self._slots.free_for(self._client) <= 0:
            return False
        if job_id in self._held:
            raise LocalProtocolError(f"job {job_id} already holds a slot")
        self._held[job_id] = job
        self._slots._add(self._client, 1)
        return True

    def release(self, job_id: int) -> T | None:
        """Give back the slot of ``job_id``: its job, or None when it held none (already ended)."""
        job = self._held.pop(job_id, None)
        if job is not None:
            self._slots._add(self._client, -1)
        return job

    def close(self) -> list[T]:
        """The stream ended: give back every slot; the jobs that held them (now abandoned)."""
        self.closed = True
        jobs = list(self._held.values())
        if jobs:
            self._slots._add(self._client, -len(jobs))
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
