"""Where a sweep's points run: a local process pool, or a Dask cluster (``dask.distributed``).

Both are :class:`concurrent.futures.Executor` objects, so the sweep (:mod:`.sweep`) submits
its points the same way to either: Dask's ``Client.get_executor()`` is one. Which one a
command line asks for is decided by :func:`choose` (pure); :func:`open_executor` starts it
and shuts it down. Dask is imported only when asked for: a process-pool sweep runs without it.
"""

from __future__ import annotations

import concurrent.futures
import enum
import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core.errors import CocoonError

# A cluster whose scheduler answers but has no worker would take the points and never run
# them: the sweep waits this long for a first worker, then says so.
WAIT_FOR_WORKERS_S = 120.0
CONNECT_TIMEOUT_S = 30.0


class ClusterError(CocoonError):
    """The executor asked for cannot be used: conflicting options, Dask missing, or a
    scheduler that cannot be reached or has no worker."""


class ExecutorKind(enum.Enum):
    PROCESS = "process"  # concurrent.futures.ProcessPoolExecutor on this machine
    DASK = "dask"  # a dask.distributed cluster: a scheduler's address, or a LocalCluster started here


@dataclass(frozen=True, kw_only=True)
class ExecutorSpec:
    """An executor to start: ``workers`` local processes (``None``: one per CPU), or for Dask
    with ``scheduler`` set, the cluster at that address (``workers`` then unused)."""

    kind: ExecutorKind = ExecutorKind.PROCESS
    workers: int | None = None
    scheduler: str | None = None

    def describe(self) -> str:
        """What it is, in words, for the progress lines."""
        if self.scheduler is not None:
            return f"the Dask cluster at {self.scheduler}"
        n = self.workers or os.cpu_count() or 1
        if self.kind is ExecutorKind.DASK:
            return f"a local Dask cluster of {n} worker process{'es' if n != 1 else ''}"
        return f"a local pool of {n} process{'es' if n != 1 else ''}"


def choose(
    *, executor: str = "auto", scheduler: str | None = None, workers: int | None = None, processes: int | None = None
) -> ExecutorSpec:
    """The executor the sweep command's options ask for.

    ``--scheduler ADDR``: that Dask cluster. ``--workers N``: a local Dask cluster of N
    worker processes (``--executor process``: a process pool of N instead). ``--processes N``:
    a process pool of N (the older flag). None of them: a process pool, one process per CPU
    (``--executor dask``: a local Dask cluster of that size)."""
    kinds = {"auto": None, "dask": ExecutorKind.DASK, "process": ExecutorKind.PROCESS}
    if executor not in kinds:
        raise ClusterError(f"--executor must be auto, dask or process, not {executor!r}")
    kind = kinds[executor]
    for name, n in (("--workers", workers), ("--processes", processes)):
        if n is not None and n < 1:
            raise ClusterError(f"{name} must be at least 1, not {n}")
    if scheduler is not None:
        if kind is ExecutorKind.PROCESS or workers is not None or processes is not None:
            raise ClusterError("--scheduler runs the points on that Dask cluster: drop --executor process, "
                               "--workers and --processes")  # fmt: skip
        return ExecutorSpec(kind=ExecutorKind.DASK, scheduler=scheduler)
    if processes is not None:
        if kind is ExecutorKind.DASK or workers is not None:
            raise ClusterError("--processes is a local process pool: use --workers N with --executor dask")
        return ExecutorSpec(kind=ExecutorKind.PROCESS, workers=processes)
    if workers is not None:
        return ExecutorSpec(kind=kind or ExecutorKind.DASK, workers=workers)
    return ExecutorSpec(kind=kind or ExecutorKind.PROCESS)


@contextmanager
def open_executor(spec: ExecutorSpec) -> Iterator[concurrent.futures.Executor]:
    """Start the executor of ``spec`` and yield it; on exit (an exception included) its
    unfinished points are cancelled and everything it started is shut down."""
    if spec.kind is ExecutorKind.PROCESS:
        pool = concurrent.futures.ProcessPoolExecutor(max_workers=spec.workers or os.cpu_count() or 1)
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return
    with _dask_executor(spec) as ex:
        yield ex


@contextmanager
def _dask_executor(spec: ExecutorSpec) -> Iterator[concurrent.futures.Executor]:
    try:  # as Any: distributed's API is only partly annotated (mypy strict refuses its untyped calls)
        dist: Any = importlib.import_module("distributed")
    except ImportError as exc:
        raise ClusterError("a Dask sweep needs dask.distributed: pip install 'cocoon-p2p[sim]'") from exc
    cluster = None
    try:
        if spec.scheduler is None:
            # One thread per worker: a point is pure Python (the GIL), so parallelism is processes.
            # The scheduler's HTTP server (and dashboard, with bokeh) on any free port: never
            # 8787's "already in use" when two sweeps run side by side.
            cluster = dist.LocalCluster(n_workers=spec.workers or os.cpu_count() or 1, threads_per_worker=1,
                                        processes=True, dashboard_address="127.0.0.1:0",
                                        silence_logs=logging.WARNING)  # fmt: skip
            client = dist.Client(cluster)
        else:
            client = dist.Client(spec.scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        raise ClusterError(f"cannot start or reach {spec.describe()}: {exc}") from exc
    try:
        try:
            client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        except TimeoutError as exc:
            raise ClusterError(f"{spec.describe()} has had no worker for {WAIT_FOR_WORKERS_S:.0f} s") from exc
        # pure=False: two submissions are two runs, never merged by Dask's content hashing.
        ex = client.get_executor(pure=False)
        try:
            yield ex
        finally:
            ex.shutdown(wait=False)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
