"""Where and when a benchmark ran: the ``meta`` block its results JSON begins with.

Every benchmark writes the same keys under the same names, so that result files of
different runs (and of different benchmarks) can be set side by side:

* ``python``, ``machine``, ``cpus``: the interpreter and the machine;
* ``load_avg_at_end`` (and ``load_avg_at_start`` for a run taken at both ends, with
  :class:`RunMeta`): the 1-, 5- and 15-minute load averages, since other work on a
  shared machine moves every figure;
* ``when``: the local time the run ended.

A benchmark adds its own keys (``quick``, ``settings``, ``seconds``...) after these.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["RunMeta", "load_1min", "load_avg", "run_meta"]


def load_avg() -> list[float]:
    """The 1-, 5- and 15-minute load averages now, to two places."""
    return [round(x, 2) for x in os.getloadavg()]


def load_1min() -> float:
    """The 1-minute load average now, to two places."""
    return round(os.getloadavg()[0], 2)


def run_meta() -> dict[str, Any]:
    """The run's machine and its load at the end: ``python``, ``machine``, ``cpus``,
    ``load_avg_at_end``, ``when``. Call it once the measuring is done."""
    return {**_machine(), "load_avg_at_end": load_avg(), "when": _now()}


@dataclass(frozen=True)
class RunMeta:
    """A run's metadata taken at both ends: :meth:`start` before measuring notes the load
    then, :meth:`finish` after it gives :func:`run_meta`'s keys and ``load_avg_at_start``."""

    load_at_start: list[float]  # as :func:`load_avg` gives it

    @classmethod
    def start(cls) -> RunMeta:
        """Note the load average as the run begins."""
        return cls(load_avg())

    def finish(self, *, one_minute: bool = False) -> dict[str, Any]:
        """``python``, ``machine``, ``cpus``, ``load_avg_at_start``, ``load_avg_at_end``,
        ``when``. With ``one_minute`` both loads are the 1-minute average alone, a float
        (the form ``gateway_embeddings`` results have always had)."""
        start, end = (self.load_at_start[0], load_1min()) if one_minute else (self.load_at_start, load_avg())
        return {**_machine(), "load_avg_at_start": start, "load_avg_at_end": end, "when": _now()}


def _machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
