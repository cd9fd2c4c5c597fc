"""Metrics, sans-IO: the :class:`Metric` families every service reports, histograms, and
reading an exposition back.

Counters and gauges are read from the node's own statistics when scraped (no
second bookkeeping to drift from the first); latencies are observed into
:class:`Histogram` objects as they happen. Each service's ``metrics()`` returns
:class:`Metric` families; :mod:`cocoon_p2p.api.prometheus` turns them into what a
Prometheus server scrapes (through ``prometheus_client``, with process metrics and build
info beside). :func:`render` is the plain text exposition (format 0.0.4) without them.
:func:`parse` and :func:`total` read an exposition back (``cocoon-node status``, tests).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
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

# Seconds: from a loopback embedding (~1 ms) to a long generation (minutes). The top buckets
# reach past the gateway's request timeout (120 s by default, api.gateway), so requests that
# ran into it (a little over 120 s) are told apart from slow ones that made it.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 180.0, 300.0,
)  # fmt: skip


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

    def minus(self, other: Histogram) -> Histogram:
        """What was observed here and not in ``other`` (same bounds; ``other`` a part of this one)."""
        if tuple(other.bounds) != tuple(self.bounds):
            raise ValueError("histograms with different buckets")
        rest = Histogram(self.bounds)
        rest.counts = [a - b for a, b in zip(self.counts, other.counts, strict=True)]
        rest.count, rest.total = self.count - other.count, self.total - other.total
        return rest

    def merged(self, other: Histogram) -> Histogram:
        """Both histograms' observations in one (same bounds)."""
        if tuple(other.bounds) != tuple(self.bounds):
            raise ValueError("histograms with different buckets")
        both = Histogram(self.bounds)
        both.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        both.count, both.total = self.count + other.count, self.total + other.total
        return both

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
    """A family of one sample."""
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
    """The plain text exposition of ``metrics``; families with the same name are merged.

    A node's ``/metrics`` is :func:`cocoon_p2p.api.prometheus.exposition` (process metrics and
    build info beside); this one stays for pure code and tests that need no more."""
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
    """Samples of a text exposition by name and labels as written (``name{a="b"}``), comments
    skipped. Exporters differ in label order and number format: :func:`total` reads past both."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


_UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


def split_key(key: str) -> tuple[str, dict[str, str]]:
    """A :func:`parse` key's metric name and labels: ``a{b="c"}`` -> ``("a", {"b": "c"})``;
    ValueError if the labels are malformed."""
    name, brace, rest = key.partition("{")
    labels: dict[str, str] = {}
    i = 0
    try:
        while brace and rest[i] != "}":
            eq = rest.index("=", i)
            label, i, chars = rest[i:eq].strip(), eq + 2, []  # past '="'
            while rest[i] != '"':
                if rest[i] == "\\":
                    i += 1
                    chars.append(_UNESCAPE.get(rest[i], rest[i]))
                else:
                    chars.append(rest[i])
                i += 1
            labels[label] = "".join(chars)
            i += 2 if rest[i + 1] == "," else 1  # past the closing quote (and a comma)
    except IndexError:
        raise ValueError(f"malformed labels in {key!r}") from None
    return name, labels


def total(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """The sum of the :func:`parse` samples of ``name`` whose labels include ``labels``
    (others, such as ``model``, summed over); 0 when there are none. Bucket bounds compare
    as numbers (``le="1"`` finds ``le="1.0"``)."""
    want = {k: _canonical(k, v) for k, v in labels.items()}
    out = 0.0
    for key, value in samples.items():
        got_name, got = split_key(key)
        if got_name == name and all(k in got and _canonical(k, got[k]) == v for k, v in want.items()):
            out += value
    return out


def _canonical(label: str, value: str) -> str:
    return repr(float(value)) if label == "le" else value
