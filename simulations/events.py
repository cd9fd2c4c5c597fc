"""Virtual time: a heap of timed callbacks, run in order, deterministically.

Ties run in scheduling order (a sequence number breaks them), so a run depends
only on its seed. Callbacks schedule more callbacks; nothing sleeps.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any


class EventQueue:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.processed = 0

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` at virtual time ``t`` (never before now)."""
        self._seq += 1
        heapq.heappush(self._heap, (max(t, self.now), self._seq, fn, args))

    def after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def run_until(self, end: float, progress: Callable[[float], None] | None = None, every_s: float = 60.0) -> None:
        """Process events up to ``end``; ``progress(now)`` every ``every_s`` of virtual time."""
        heap, next_report = self._heap, every_s
        while heap and heap[0][0] <= end:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            if progress is not None and t >= next_report:
                progress(t)
                next_report = (t // every_s + 1) * every_s
            fn(*args)
            self.processed += 1
        self.now = end
