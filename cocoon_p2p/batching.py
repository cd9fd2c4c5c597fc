"""Worker-side batching of concurrent jobs for the same model (pure, time passed in).

Jobs wait at most ``max_wait_s`` for company; a batch leaves as soon as it holds
``max_batch`` items or its oldest job has waited long enough. The trio worker
service calls :meth:`Batcher.add` when a job arrives and :meth:`Batcher.due`
when the timer it sets from :meth:`Batcher.next_deadline` fires; the simulator
does the same with a virtual clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Items to run together on one model. ``key`` names the model (and its shape class)."""

    key: object
    items: tuple[T, ...]


@dataclass
class _Queue(Generic[T]):
    items: deque[tuple[float, T]] = field(default_factory=deque)  # (arrival time, item)

    @property
    def since(self) -> float:
        return self.items[0][0]


class Batcher(Generic[T]):
    """Collects items per key into batches of at most ``max_batch``."""

    def __init__(self, *, max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError("max_batch >= 1 and max_wait_s >= 0")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queues: dict[object, _Queue[T]] = {}

    def add(self, key: object, item: T, now: float) -> list[Batch[T]]:
        """Queue ``item``; return the batches that are ready now (full ones)."""
        q = self._queues.setdefault(key, _Queue())
        q.items.append((now, item))
        out = []
        while len(q.items) >= self.max_batch:
            out.append(Batch(key, tuple(q.items.popleft()[1] for _ in range(self.max_batch))))
        if not q.items:
            del self._queues[key]
        elif self.max_wait_s == 0:
            out.extend(self._flush(key))
        return out

    def due(self, now: float) -> list[Batch[T]]:
        """Batches whose oldest item has waited ``max_wait_s`` or more."""
        out: list[Batch[T]] = []
        # The epsilon absorbs float error in now - since (timers fire at since + wait).
        for key in [k for k, q in self._queues.items() if now - q.since >= self.max_wait_s - 1e-9]:
            out.extend(self._flush(key))
        return out

    def remove(self, key: object, item: T) -> bool:
        """Take a waiting item back (its job was cancelled); False if not waiting."""
        q = self._queues.get(key)
        if q is None:
            return False
        entry = next((e for e in q.items if e[1] is item), None)
        if entry is None:
            return False
        q.items.remove(entry)
        if not q.items:
            del self._queues[key]
        return True

    def next_deadline(self) -> float | None:
        """When :meth:`due` will next return something; None when nothing waits."""
        if not self._queues:
            return None
        return min(q.since for q in self._queues.values()) + self.max_wait_s

    def waiting(self) -> int:
        return sum(len(q.items) for q in self._queues.values())

    def _flush(self, key: object) -> list[Batch[T]]:
        q = self._queues.pop(key)
        return [Batch(key, tuple(item for _, item in q.items))]
