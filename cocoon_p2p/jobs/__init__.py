"""Jobs over ``/cocoon/job/1`` streams (Noise + yamux): the protocol, routing, client and worker.

Pure cores: frames and their codec (:mod:`.frames`), the per-stream rules of
order (:mod:`.connection`), a worker's job slots, held per stream
(:mod:`.slots`), batching (:mod:`.batching`), worker choice (:mod:`.routing`)
and the retry policy (:mod:`.attempts`); the simulator runs these unchanged.
Trio services: :class:`~.worker.JobWorker` serves models,
:class:`~.client.JobClient` sends jobs, each through its end of a job stream
(:mod:`.worker_link`, :mod:`.client_link`). Payment and peer scoring are not
decided here: the services take the ports of :mod:`.ports` at construction
and call them.

Cancellation: both services run their tasks in the node's nursery, so they stop
with the node. A caller cancelled while waiting for a job sends a best-effort
``JobCancel`` and the job is forgotten; the worker then stops it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .attempts import JobFailed

if TYPE_CHECKING:
    from .client import ClientStats, InferenceResult, JobClient
    from .worker import JobWorker, WorkerStats

__all__ = ["ClientStats", "InferenceResult", "JobClient", "JobFailed", "JobWorker", "WorkerStats"]

_LAZY = {
    "ClientStats": "client",
    "InferenceResult": "client",
    "JobClient": "client",
    "JobWorker": "worker",
    "WorkerStats": "worker",
}


def __getattr__(name: str) -> Any:
    # The trio services load on first use, so that the pure modules of this
    # package import without trio (the simulator uses them).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
