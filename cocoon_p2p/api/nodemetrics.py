"""What a running :class:`~.node.Node` exports on ``/metrics``, read from its statistics at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.metrics import Metric, metric

if TYPE_CHECKING:
    from cocoon_p2p.node import Node


def node_metrics(node: Node) -> list[Metric]:
    """Peers, gossip and DHT counters, jobs (as worker and as client), channels and earnings."""
    s = node.stats
    now = now_ms()
    out = [
        metric("cocoon_peers_connected", "gauge", "Peers with an open connection", len(node.connected_peers())),
        metric(
            "cocoon_workers_known", "gauge", "Workers whose announcement is live", len(node.directory.known_peers(now))
        ),
        metric("cocoon_announcements_sent_total", "counter", "Announcements published", s.announcements_sent),
        metric("cocoon_announcements_accepted_total", "counter", "Announcements accepted", s.announcements_accepted),
        metric("cocoon_gossip_overflows_total", "counter", "Gossip messages dropped: queue full", s.gossip_overflows),
        metric("cocoon_dials_total", "counter", "Outbound dials", s.dials_ok, outcome="ok"),
        metric("cocoon_dials_total", "counter", "Outbound dials", s.dials_failed, outcome="failed"),
        metric("cocoon_dht_lookups_total", "counter", "DHT capability lookups", node.dht_stats.lookups),
        metric("cocoon_dht_records_rejected_total", "counter", "Invalid DHT records", node.dht_stats.records_rejected),
    ]
    out += [
        metric("cocoon_announcements_rejected_total", "counter", "Announcements rejected", n, code=code)
        for code, n in sorted(s.rejected_by_code.items())
    ]
    y = node.muxer_stats
    out += [
        metric("cocoon_streams_total", "counter", "Streams opened", y.streams_opened, direction="outbound"),
        metric("cocoon_streams_total", "counter", "Streams opened", y.streams_accepted, direction="inbound"),
        metric("cocoon_streams_refused_total", "counter", "Inbound streams over the limit", y.streams_refused),
        metric("cocoon_stream_bytes_total", "counter", "Stream payload bytes", y.bytes_sent, direction="sent"),
        metric("cocoon_stream_bytes_total", "counter", "Stream payload bytes", y.bytes_received, direction="received"),
        metric(
            "cocoon_connections_dropped_total",
            "counter",
            "Connections closed on a peer's fault",
            y.protocol_errors,
            reason="protocol-error",
        ),
        metric(
            "cocoon_connections_dropped_total",
            "counter",
            "Connections closed on a peer's fault",
            y.write_timeouts,
            reason="write-timeout",
        ),
    ]
    w = node.job_worker
    if w is not None:
        ws = w.stats
        out += [
            metric("cocoon_worker_jobs_total", "counter", "Jobs this worker ran", ws.jobs_ok, outcome="ok"),
            metric("cocoon_worker_jobs_total", "counter", "Jobs this worker ran", ws.jobs_failed, outcome="failed"),
            metric("cocoon_worker_jobs_running", "gauge", "Jobs admitted and not finished (queue depth)", w.running),
            metric("cocoon_worker_capacity", "gauge", "Jobs this worker admits at once", w.capacity),
            metric("cocoon_worker_batches_total", "counter", "Batches run", ws.batches),
            metric("cocoon_worker_earned_nanoton_total", "counter", "Nanoton billed for jobs", ws.earned_nanoton),
            metric("cocoon_worker_job_seconds", "histogram", "Admission to result, successful jobs", ws.latency_s),
        ]
        out += [
            metric("cocoon_worker_refused_total", "counter", "Jobs refused", n, code=code)
            for code, n in sorted(ws.refused.items())
        ]
    c = node.job_client
    if c is not None:
        cs = c.stats
        out += [
            metric("cocoon_client_jobs_total", "counter", "Jobs this client sent", cs.jobs_ok, outcome="ok"),
            metric("cocoon_client_jobs_total", "counter", "Jobs this client sent", cs.jobs_failed, outcome="failed"),
            metric("cocoon_client_retries_total", "counter", "Jobs retried on another worker", cs.retries),
            metric("cocoon_client_paid_nanoton_total", "counter", "Nanoton paid for jobs", cs.paid_nanoton),
            metric("cocoon_client_job_seconds", "histogram", "End-to-end latency, successful jobs", cs.latency_s),
        ]
    p = node.payments
    if p is not None:
        store = p.payee.store
        unsettled = store.unsettled()
        out += [
            metric("cocoon_channels", "gauge", "Payment channels not yet closed", len(unsettled), role="worker"),
            metric("cocoon_channels", "gauge", "Payment channels not yet closed", len(p.payer.open), role="client"),
            metric(
                "cocoon_channel_earned_unsettled_nanoton",
                "gauge",
                "Worker: held in vouchers, not yet paid out on chain",
                sum(store.earned(cid) for cid in unsettled),
            ),
            metric(
                "cocoon_channel_deposit_left_nanoton",
                "gauge",
                "Client: what its open channels can still pay",
                sum(ch.issuer.deposit_a - ch.issuer.sent for ch in p.payer.open.values()),
            ),
            metric("cocoon_onchain_operations_total", "counter", "Messages sent to channel contracts", p.onchain_ops),
        ]
    return out
