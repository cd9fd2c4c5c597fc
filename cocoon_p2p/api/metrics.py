"""The gateway's request metrics, exported on its ``/metrics`` beside the node's.

- ``cocoon_gateway_requests_total{route, status}``: requests answered, by route and HTTP
  status (a stream counts with the status of its head; routes outside the API count as
  ``other``, so a scanner cannot grow the label set);
- ``cocoon_gateway_request_seconds{route}``: from the request to its whole answer (for a
  stream, to its last event);
- ``cocoon_gateway_job_seconds{route}``: the part of a whole answer spent in the network's
  job (embeddings: sending it, its run on a worker, its result back), the rest being the
  gateway's own work (parsing, routing, encoding the answer);
- ``cocoon_gateway_ttft_seconds{route}``: from the request to the first generated token
  (of any choice), whole or streamed; Prometheus' ``histogram_quantile`` gives p50/p99;
- ``cocoon_gateway_completion_tokens_per_second{route}``: each choice's tokens over the
  time from its first token to its last (the decoding rate a client sees);
- ``cocoon_gateway_completion_tokens_total{route}``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cocoon_p2p.core.metrics import Histogram, Metric

ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"})
Sample = tuple[dict[str, str], float | Histogram]
RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)


def route_of(path: str) -> str:
    """The ``route`` label of a request path."""
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return path if path in ROUTES else "other"


@dataclass
class GatewayStats:
    """What the gateway's requests came to (exported by :meth:`metrics`)."""

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    latency_s: dict[str, Histogram] = field(default_factory=dict)
    job_s: dict[str, Histogram] = field(default_factory=dict)
    ttft_s: dict[str, Histogram] = field(default_factory=dict)
    tokens_per_s: dict[str, Histogram] = field(default_factory=dict)
    completion_tokens: Counter[str] = field(default_factory=Counter)

    def answered(self, route: str, status: int) -> None:
        """A request on ``route`` was answered ``status`` (a stream: its head was sent)."""
        self.requests[(route, status)] += 1

    def took(self, route: str, seconds: float) -> None:
        """A request on ``route`` was answered whole (a stream: to its last event) in ``seconds``."""
        self.latency_s.setdefault(route, Histogram()).observe(seconds)

    def job_took(self, route: str, seconds: float) -> None:
        """A request on ``route`` spent ``seconds`` in its network job."""
        self.job_s.setdefault(route, Histogram()).observe(seconds)

    def first_token(self, route: str, seconds: float) -> None:
        self.ttft_s.setdefault(route, Histogram()).observe(seconds)

    def choice_done(self, route: str, tokens: int, decode_s: float) -> None:
        """A choice of ``tokens`` finished ``decode_s`` after its first token."""
        self.completion_tokens[route] += tokens
        if tokens > 1 and decode_s > 0:
            self.tokens_per_s.setdefault(route, Histogram(bounds=RATE_BUCKETS)).observe(tokens / decode_s)

    def metrics(self) -> list[Metric]:
        """The series for ``/metrics``; every family is declared before its first sample (a
        dashboard's query names a metric that exists from the start)."""
        requests: list[Sample] = [
            ({"route": route, "status": str(status)}, n) for (route, status), n in sorted(self.requests.items())
        ]
        out = [Metric("cocoon_gateway_requests_total", "counter", "Requests answered, by route and HTTP status",
                      tuple(requests))]  # fmt: skip
        histograms = (
            ("cocoon_gateway_request_seconds", "Time from a request to its whole answer", self.latency_s),
            ("cocoon_gateway_job_seconds", "Time a whole answer spent in its network job", self.job_s),
            ("cocoon_gateway_ttft_seconds", "Time from a request to its first generated token", self.ttft_s),
            ("cocoon_gateway_completion_tokens_per_second", "Each choice's tokens per second of decoding",
             self.tokens_per_s),
        )  # fmt: skip
        for name, help_text, by_route in histograms:
            per_route: list[Sample] = [({"route": r}, h) for r, h in sorted(by_route.items())]
            out.append(Metric(name, "histogram", help_text, tuple(per_route)))
        tokens: list[Sample] = [({"route": route}, n) for route, n in sorted(self.completion_tokens.items())]
        out.append(Metric("cocoon_gateway_completion_tokens_total", "counter",
                          "Tokens generated for the gateway's clients", tuple(tokens)))  # fmt: skip
        return out
