"""Prometheus text exposition (format 0.0.4), sans-IO: histograms and a renderer.

Counters and gauges are read from the node's own statistics when scraped (no
second bookkeeping to drift from the first); latencies are observed into
:class:`Histogram` objects as they happen. :func:`render` turns samples into the
text a Prometheus server scrapes from ``/metrics``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


def percentile(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (the smallest value with at least ``q``%
    of ``values`` at or below it); NaN when there are none. Benchmarks, the demo
    and the simulator all report with this one definition."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


CONTENT_TYPE = "text/plain; version=0.0.4"  # of the text exposition, on a /metrics response

# Seconds: from a loopback embedding (~1 ms) to a long generation (~1 min).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    """Cumulative buckets, a count and a sum, as Prometheus histograms are."""

    bounds: Sequence[float] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.count += 1
        self.total += value

    def quantile(self, q: float) -> float:
        """An estimate (the bucket's upper bound), for status displays."""
        if self.count == 0:
            return math.nan
        seen = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            seen += n
            if seen >= q * self.count:
                return bound
        return math.inf


@dataclass(frozen=True)
class Metric:
    """One metric family: name, type ("counter", "gauge", "histogram"), help, samples."""

    name: str
    kind: str
    help: str
    samples: tuple[tuple[dict[str, str], float | Histogram], ...]


def metric(name: str, kind: str, help_text: str, value: float | Histogram, **labels: str) -> Metric:
    return Metric(name, kind, help_text, ((labels, value),))


def _labels(labels: dict[str, str], extra: tuple[str, str] | None = None) -> str:
    items = list(labels.items()) + ([extra] if extra else [])
    if not items:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in items)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(items, esc, strict=True)) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def render(metrics: Iterable[Metric]) -> str:
    """The text exposition of ``metrics``; families with the same name are merged."""
    families: dict[str, list[Metric]] = {}
    for m in metrics:
        families.setdefault(m.name, []).append(m)
    out: list[str] = []
    for name, group in families.items():
        out.append(f"# HELP {name} {group[0].help}")
        out.append(f"# TYPE {name} {group[0].kind}")
        for m in group:
            for labels, value in m.samples:
                if isinstance(value, Histogram):
                    seen = 0
                    for bound, n in zip(value.bounds, value.counts, strict=True):
                        seen += n
                        out.append(f"{name}_bucket{_labels(labels, ('le', _num(bound)))} {seen}")
                    out.append(f"{name}_bucket{_labels(labels, ('le', '+Inf'))} {value.count}")
                    out.append(f"{name}_sum{_labels(labels)} {_num(value.total)}")
                    out.append(f"{name}_count{_labels(labels)} {value.count}")
                else:
                    out.append(f"{name}{_labels(labels)} {_num(value)}")
    return "\n".join(out) + "\n"


def parse(text: str) -> dict[str, float]:
    """Samples of a text exposition by name and labels (``name{a="b"}``), comments skipped."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples
