"""A node's ``/metrics`` through ``prometheus_client``, still read when scraped.

The services keep reporting :class:`~cocoon_p2p.core.metrics.Metric` families from their
own statistics (sans-IO, no second bookkeeping). :class:`MetricsCollector` is a custom
``prometheus_client`` collector that calls the node's ``metrics()`` at every scrape and
turns what it returns into ``prometheus_client`` families; :func:`node_registry` puts it
in a registry of its own (never the process-wide default one, so two nodes in one process
do not clash) beside ``prometheus_client``'s process and platform collectors and
``cocoon_build_info{version, python, libp2p}``. :func:`exposition` renders a registry in
the text format with ``prometheus_client``'s own writer, served as :data:`CONTENT_TYPE`.

Names stay what the services call them: a counter family ``x_total`` exports its samples
as ``x_total`` (``prometheus_client`` names the family ``x`` and appends ``_total`` to its
samples); a counter without that suffix is exported untyped, under its own name.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.registry import Collector

from cocoon_p2p._version import __version__
from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.metrics import Histogram, Metric

__all__ = [
    "CONTENT_TYPE",
    "MetricError",
    "MetricsCollector",
    "build_info",
    "exposition",
    "families",
    "node_registry",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST  # of what exposition() returns, on a /metrics response
BUILD_INFO = "cocoon_build_info"


class MetricError(CocoonError):
    """A service reported a family that cannot be exported (a bug in that service)."""


def _library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_info() -> GaugeMetricFamily:
    """``cocoon_build_info{version, python, libp2p} 1``: what this process runs."""
    family = GaugeMetricFamily(
        BUILD_INFO,
        "The cocoon-p2p build: package, Python and py-libp2p versions",
        labels=["version", "python", "libp2p"],
    )
    family.add_metric([__version__, platform.python_version(), _library_version("libp2p")], 1)
    return family


def families(metrics: Iterable[Metric]) -> list[Family]:
    """``prometheus_client`` families of ``metrics``, merged by name, in first-seen order.

    A family's label names are the union over its samples: a sample without one of them
    exports it empty (which Prometheus reads as the label being absent)."""
    groups: dict[str, list[Metric]] = {}
    for m in metrics:
        groups.setdefault(m.name, []).append(m)
    return [_family(name, group) for name, group in groups.items()]


def _family(name: str, group: list[Metric]) -> Family:
    kind, help_text = group[0].kind, group[0].help
    if any(m.kind != kind for m in group):
        raise MetricError(f"{name}: reported as {sorted({m.kind for m in group})}")
    samples = [(labels, value) for m in group for labels, value in m.samples]
    names = sorted({k for labels, _ in samples for k in labels})
    family: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily | UnknownMetricFamily
    if kind == "histogram":
        family = HistogramMetricFamily(name, help_text, labels=names)
        for labels, value in samples:
            if not isinstance(value, Histogram):
                raise MetricError(f"{name}: a histogram sample that is not a Histogram")
            family.add_metric([labels.get(k, "") for k in names], _buckets(value), value.total)
        return family
    if kind == "counter" and name.endswith("_total"):
        family = CounterMetricFamily(name, help_text, labels=names)  # exported as name, _total kept
    elif kind == "gauge":
        family = GaugeMetricFamily(name, help_text, labels=names)
    elif kind == "counter":
        family = UnknownMetricFamily(name, help_text, labels=names)  # its name, not name_total
    else:
        raise MetricError(f"{name}: unknown metric type {kind!r}")
    for labels, value in samples:
        if isinstance(value, Histogram):
            raise MetricError(f"{name}: a Histogram in a {kind}")
        family.add_metric([labels.get(k, "") for k in names], float(value))
    return family


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    out, seen = [], 0
    for bound, n in zip(h.bounds, h.counts, strict=True):
        seen += n
        out.append((repr(float(bound)), float(seen)))  # as prometheus_client writes le: 1.0
    out.append(("+Inf", float(h.count)))
    return out


class MetricsCollector(Collector):
    """Reads ``source()`` at every scrape (the node's services' statistics as they are then)."""

    def __init__(self, source: Callable[[], Iterable[Metric]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Family]:
        yield from families(self.source())

    def describe(self) -> list[Family]:
        """Nothing up front: registering must not call ``source()`` (the node may not be up yet)."""
        return []


class _BuildInfo(Collector):
    def collect(self) -> Iterator[Family]:
        yield build_info()


def node_registry(source: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry of its own for one node: ``source()`` read at each scrape, the process's
    CPU, memory and file descriptors (``process_*``), ``python_info`` and ``cocoon_build_info``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(source))
    registry.register(_BuildInfo())
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """What the registry's collectors report now, in the text exposition format."""
    return generate_latest(registry)


def render(metrics: Iterable[Metric]) -> bytes:
    """``metrics`` alone (no process metrics, no build info) in the text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(lambda: metrics))
    return generate_latest(registry)
