"""Worker-side batching of concurrent jobs for the same model (pure, time passed in).

A model runs one batch at a time; jobs that arrive meanwhile queue up and leave
together as the next batch (up to ``max_batch``, jobs with equal keys only). So
batching costs an idle worker no latency, and a loaded one gets big batches.
``max_wait_s`` > 0 additionally holds a lone job that long for company.

The trio worker calls :meth:`Batcher.add` as jobs arrive and :meth:`Batcher.take`
whenever the model is free; the simulator does the same in virtual time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cocoon_p2p.core.errors import ConfigError

T = TypeVar("T")
_EPS = 1e-9  # absorbs float error in now - since when a timer fires at since + wait


@dataclass(frozen=True)
class Batch(Generic[T]):
    """Items to run together on one model. ``key`` names their shape class."""

    key: object
    items: tuple[T, ...]


@dataclass
class _Queue(Generic[T]):
    items: deque[tuple[float, T]] = field(default_factory=deque)  # (arrival time, item)

    @property
    def since(self) -> float:
        return self.items[0][0]


class Batcher(Generic[T]):
    """Queues items per key; hands out batches of at most ``max_batch``, oldest key first."""

    def __init__(self, *, max_batch: int, max_wait_s: float = 0.0) -> None:
        if max_batch < 1 or max_wait_s < 0:
            raise ConfigError(f"need max_batch >= 1 and max_wait_s >= 0, not {max_batch} and {max_wait_s}")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queues: dict[object, _Queue[T]] = {}

    def add(self, key: object, item: T, now: float) -> None:
        """Queue ``item`` (batch key ``key``), arrived at ``now``."""
        self._queues.setdefault(key, _Queue()).items.append((now, item))

    def take(self, now: float) -> Batch[T] | None:
        """The next batch to run, or None when nothing is ready (see :meth:`next_deadline`).

        Ready: the oldest key's queue is full, or its oldest item has waited ``max_wait_s``.
        """
        if not self._queues:
            return None
        key, q = min(self._queues.items(), key=lambda kv: kv[1].since)
        if len(q.items) < self.max_batch and now - q.since < self.max_wait_s - _EPS:
            full = [(k, fq) for k, fq in self._queues.items() if len(fq.items) >= self.max_batch]
            if not full:
                return None
            key, q = full[0]
        n = min(self.max_batch, len(q.items))
        items = tuple(q.items.popleft()[1] for _ in range(n))
        if not q.items:
            del self._queues[key]
        return Batch(key, items)

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
        """When :meth:`take` will next return a batch without new arrivals; None when empty."""
        if not self._queues:
            return None
        return min(q.since for q in self._queues.values()) + self.max_wait_s

    def waiting(self) -> int:
        """Items queued, all keys together."""
        return sum(len(q.items) for q in self._queues.values())
