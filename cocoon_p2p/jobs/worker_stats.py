"""What a worker's jobs came to, and its series for ``/metrics`` (a client's job series too).

Jobs are counted in all and by model (the ``model`` label: the name of a model this node
serves, or of one it asks for, so the label set stays as small as that list; never a
peer). :meth:`JobCounts.job_done` and :meth:`JobCounts.job_failed` keep both; a count made
straight on the totals (``stats.jobs_ok += 1``), or with no model, is exported without the
``model`` label.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cocoon_p2p.core.metrics import Histogram, Metric, metric
from cocoon_p2p.execution.models import ModelSpec


def model_label(spec: ModelSpec) -> str:
    """The ``model`` label of a model's jobs: its name (one per file: q4 and fp32 apart)."""
    return spec.name


@dataclass
class ModelJobs:
    """One model's jobs: outcomes, the latency of those that succeeded, refusals by code."""

    ok: int = 0
    failed: int = 0
    latency_s: Histogram = field(default_factory=Histogram)
    refused: dict[str, int] = field(default_factory=dict)


@dataclass
class JobCounts:
    """Jobs that succeeded (and how long they took) or failed: in all, and ``by_model`` the
    part that was told its model."""

    jobs_ok: int = 0
    jobs_failed: int = 0
    latency_s: Histogram = field(default_factory=Histogram)  # jobs that succeeded
    by_model: dict[str, ModelJobs] = field(default_factory=dict)

    def job_done(self, model: str | None, seconds: float) -> None:
        """A job of ``model`` (None: not known) succeeded in ``seconds``."""
        self.jobs_ok += 1
        self.latency_s.observe(seconds)
        if model is not None:
            mine = self.by_model.setdefault(model, ModelJobs())
            mine.ok += 1
            mine.latency_s.observe(seconds)

    def job_failed(self, model: str | None) -> None:
        """A job of ``model`` (None: not known) ended without a result."""
        self.jobs_failed += 1
        if model is not None:
            self.by_model.setdefault(model, ModelJobs()).failed += 1

    def series(self, prefix: str, help_jobs: str, help_seconds: str) -> list[Metric]:
        """``{prefix}_jobs_total{model, outcome}`` and ``{prefix}_job_seconds{model}`` (:func:`job_series`)."""
        return job_series(
            prefix,
            help_jobs,
            help_seconds,
            ok=self.jobs_ok,
            failed=self.jobs_failed,
            latency_s=self.latency_s,
            by_model=self.by_model,
        )


@dataclass
class WorkerStats(JobCounts):
    """What a worker's jobs came to (exported by :meth:`JobWorker.metrics`); ``latency_s``:
    from admission to result."""

    refused: dict[str, int] = field(default_factory=dict)  # by error code
    batches: int = 0
    batched_items: int = 0
    earned_nanoton: int = 0

    def job_refused(self, code: str, model: str | None) -> None:
        """A job was refused with ``code``; ``model``: None unless this worker serves it (a
        client's unknown model ids must not grow the label set)."""
        self.refused[code] = self.refused.get(code, 0) + 1
        if model is not None:
            mine = self.by_model.setdefault(model, ModelJobs())
            mine.refused[code] = mine.refused.get(code, 0) + 1


def job_series(
    prefix: str,
    help_jobs: str,
    help_seconds: str,
    *,
    ok: int,
    failed: int,
    latency_s: Histogram,
    by_model: dict[str, ModelJobs],
) -> list[Metric]:
    """``{prefix}_jobs_total{model, outcome}`` and ``{prefix}_job_seconds{model}`` (a worker's
    or a client's): a series per model, and the rest of the totals (what was counted without
    a model) without the label; that rest also stands, at zero, before any job."""
    jobs: list[tuple[dict[str, str], float | Histogram]] = []
    seconds: list[tuple[dict[str, str], float | Histogram]] = []
    told = Histogram(latency_s.bounds)
    for name, m in sorted(by_model.items()):
        jobs += [({"model": name, "outcome": "ok"}, m.ok), ({"model": name, "outcome": "failed"}, m.failed)]
        seconds.append(({"model": name}, m.latency_s))
        told = told.merged(m.latency_s)
    rest_ok = ok - sum(m.ok for m in by_model.values())
    rest_failed = failed - sum(m.failed for m in by_model.values())
    if rest_ok or rest_failed or not by_model:
        jobs += [({"outcome": "ok"}, rest_ok), ({"outcome": "failed"}, rest_failed)]
    if (rest := latency_s.minus(told)).count or not by_model:
        seconds.append(({}, rest))
    return [
        Metric(f"{prefix}_jobs_total", "counter", help_jobs, tuple(jobs)),
        Metric(f"{prefix}_job_seconds", "histogram", help_seconds, tuple(seconds)),
    ]


def worker_metrics(stats: WorkerStats, *, running: int, capacity: int) -> list[Metric]:
    """A worker's series: jobs, load (``running`` of ``capacity``), batches, earnings, refusals
    (a family declared before the first refusal, so that dashboards find it)."""
    ws = stats
    out = ws.series("cocoon_worker", "Jobs this worker ran", "Admission to result, successful jobs")
    out += [
        metric("cocoon_worker_jobs_running", "gauge", "Jobs admitted and not finished (queue depth)", running),
        metric("cocoon_worker_capacity", "gauge", "Jobs this worker admits at once", capacity),
        metric("cocoon_worker_batches_total", "counter", "Batches run", ws.batches),
        metric("cocoon_worker_earned_nanoton_total", "counter", "Nanoton billed for jobs", ws.earned_nanoton),
    ]
    refused: list[tuple[dict[str, str], float | Histogram]] = []
    told: dict[str, int] = {}
    for name, m in sorted(ws.by_model.items()):
        for code, n in sorted(m.refused.items()):
            refused.append(({"code": code, "model": name}, n))
            told[code] = told.get(code, 0) + n
    refused += [
        ({"code": code}, n - told.get(code, 0)) for code, n in sorted(ws.refused.items()) if n > told.get(code, 0)
    ]
    out.append(Metric("cocoon_worker_refused_total", "counter", "Jobs refused", tuple(refused)))
    return out
