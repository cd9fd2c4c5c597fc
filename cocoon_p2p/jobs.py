"""Trio services that carry jobs over ``/cocoon/job/1`` streams (Noise + yamux).

:class:`~.jobworker.JobWorker` serves models (:mod:`.jobworker`);
:class:`~.jobclient.JobClient` sends jobs to them (:mod:`.jobclient`); both
read and write their streams through :mod:`.jobstream`. The protocol itself,
sans-IO, is :mod:`.jobframes` (frames) and :mod:`.jobconn` (rules of order).

Cancellation: both services run their tasks in the node's nursery, so they stop
with the node. A caller cancelled while waiting for a job sends a best-effort
``JobCancel`` and the job is forgotten; the worker then stops it.
"""

from __future__ import annotations

from .jobclient import ClientStats, InferenceResult, JobClient, JobFailed
from .jobstream import now_ms
from .jobworker import JobWorker, WorkerStats

__all__ = ["ClientStats", "InferenceResult", "JobClient", "JobFailed", "JobWorker", "WorkerStats", "now_ms"]
