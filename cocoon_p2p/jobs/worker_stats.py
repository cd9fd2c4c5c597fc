"""What a worker's jobs came to, and its series for ``/metrics``."""

from __future__ import annotations

from dataclasses import dataclass, field

from cocoon_p2p.core.metrics import Histogram, Metric, metric


@dataclass
class WorkerStats:
    """What a worker's jobs came to (exported by :meth:`JobWorker.metrics`)."""

    jobs_ok: int = 0
    jobs_failed: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # by error code
    batches: int = 0
    batched_items: int = 0
    earned_nanoton: int = 0
    latency_s: Histogram = field(default_factory=Histogram)  # admission to result, jobs that succeeded


def worker_metrics(stats: WorkerStats, *, running: int, capacity: int) -> list[Metric]:
    """A worker's series: jobs, load (``running`` of ``capacity``), batches, earnings, refusals."""
    ws = stats
    out = [
        metric("cocoon_worker_jobs_total", "counter", "Jobs this worker ran", ws.jobs_ok, outcome="ok"),
        metric("cocoon_worker_jobs_total", "counter", "Jobs this worker ran", ws.jobs_failed, outcome="failed"),
        metric("cocoon_worker_jobs_running", "gauge", "Jobs admitted and not finished (queue depth)", running),
        metric("cocoon_worker_capacity", "gauge", "Jobs this worker admits at once", capacity),
        metric("cocoon_worker_batches_total", "counter", "Batches run", ws.batches),
        metric("cocoon_worker_earned_nanoton_total", "counter", "Nanoton billed for jobs", ws.earned_nanoton),
        metric("cocoon_worker_job_seconds", "histogram", "Admission to result, successful jobs", ws.latency_s),
    ]
    out += [
        metric("cocoon_worker_refused_total", "counter", "Jobs refused", n, code=code)
        for code, n in sorted(ws.refused.items())
    ]
    return out
