"""``/metrics`` through prometheus_client, and the operator files that read it (nodes/ops/).

The exposition is read back with prometheus_client's own parser; the Grafana dashboard's
and the alert rules' PromQL name only metrics that a real worker and a real gateway export
(on the local chain, after real jobs); the systemd unit stops slower than a worker drains
and settles.
"""

from __future__ import annotations

import configparser
import inspect
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import openai
import pytest
from cocoon_p2p.nodes import config as config_mod
from prometheus_client.parser import text_string_to_metric_families

from cocoon_p2p import __version__
from cocoon_p2p.api.gateway import Gateway
from cocoon_p2p.api.metrics import GatewayStats
from cocoon_p2p.api.prometheus import MetricError, exposition, families, node_registry, render
from cocoon_p2p.core.metrics import LATENCY_BUCKETS_S, Histogram, Metric, metric, parse, split_key, total
from cocoon_p2p.core.metrics import render as plain_render
from cocoon_p2p.jobs.worker_stats import WorkerStats, worker_metrics
from cocoon_p2p.testing.localchain import open_local_chain

from .netutil import stop_processes

ROOT = Path(__file__).resolve().parent.parent
OPS = ROOT / "nodes" / "ops"
CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]
SYNTHETIC = frozenset({"up"})  # series Prometheus makes itself, never in a scrape


def _types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def _worker_stats() -> WorkerStats:
    ws = WorkerStats()
    ws.job_done("minilm", 0.02)
    ws.job_done("minilm", 0.2)
    ws.job_done("smollm2", 1.5)
    ws.job_failed("smollm2")
    ws.job_refused("busy", "minilm")
    ws.job_refused("unknown-model", None)  # not a model it serves: no label
    ws.job_done(None, 0.01)  # its model not told
    ws.earned_nanoton = 15_000
    return ws


def test_a_nodes_exposition_parses_with_prometheus_clients_parser() -> None:
    ws = _worker_stats()
    text = exposition(node_registry(lambda: worker_metrics(ws, running=1, capacity=8))).decode()
    types = _types(text)
    # Counter names stay what the services call them (the parser names the family without _total).
    assert types["cocoon_worker_jobs"] == types["cocoon_worker_refused"] == "counter"
    assert types["cocoon_worker_job_seconds"] == "histogram" and types["cocoon_worker_capacity"] == "gauge"
    assert types["cocoon_build_info"] == types["process_resident_memory_bytes"] == types["python_info"] == "gauge"
    assert types["process_cpu_seconds"] == "counter"
    s = parse(text)
    (build,) = [k for k in s if k.startswith("cocoon_build_info{")]
    assert split_key(build)[1] == {"libp2p": "0.8.1", "python": sys.version.split()[0], "version": __version__}
    assert s["process_resident_memory_bytes"] > 0 and s[build] == 1
    # The model label: a series per model served, the rest without it.
    assert s['cocoon_worker_jobs_total{model="minilm",outcome="ok"}'] == 2
    assert s['cocoon_worker_jobs_total{model="smollm2",outcome="failed"}'] == 1
    assert s['cocoon_worker_jobs_total{model="",outcome="ok"}'] == 1  # Prometheus reads "": no label
    assert total(s, "cocoon_worker_jobs_total", outcome="ok") == ws.jobs_ok == 4
    assert (
        total(s, "cocoon_worker_job_seconds_count") == 4 and total(s, "cocoon_worker_job_seconds_count", model="") == 1
    )
    assert total(s, "cocoon_worker_job_seconds_bucket", model="minilm", le="0.025") == 1
    assert s['cocoon_worker_refused_total{code="busy",model="minilm"}'] == 1
    assert s['cocoon_worker_refused_total{code="unknown-model",model=""}'] == 1
    assert {split_key(k)[1].get("model") for k in s} == {None, "", "minilm", "smollm2"}  # bounded


def test_the_plain_renderer_and_prometheus_client_agree_on_every_sample() -> None:
    ws, g = _worker_stats(), GatewayStats()
    g.answered("/v1/chat/completions", 200)
    g.first_token("/v1/chat/completions", 0.02)
    g.choice_done("/v1/chat/completions", 10, 0.5)
    ms = worker_metrics(ws, running=0, capacity=2) + g.metrics()
    ours, theirs = (_canonical(parse(text)) for text in (plain_render(ms), render(ms).decode()))
    assert ours == theirs and len(ours) > 40


def _canonical(samples: dict[str, float]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples keyed the way Prometheus sees them: an empty label is none, bounds are numbers."""
    out = {}
    for key, value in samples.items():
        name, labels = split_key(key)
        out[name, tuple(sorted((k, str(float(v)) if k == "le" else v) for k, v in labels.items() if v))] = value
    return out


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        ([metric("a_total", "counter", "A", 3, x="1")], 'a_total{x="1"} 3.0'),
        ([metric("odd", "counter", "Odd", 4)], "odd 4.0"),  # no _total: exported untyped, its name kept
        ([metric("g", "gauge", "G", 2.5)], "g 2.5"),
        ([metric("m_total", "counter", "M", 1), metric("m_total", "counter", "M", 2, y="b")], 'm_total{y="b"} 2.0'),
        ([metric("m_total", "counter", "M", 1), metric("m_total", "counter", "M", 2, y="b")], 'm_total{y=""} 1.0'),
        ([metric("h", "histogram", "H", Histogram((1.0, 300.0)))], 'h_bucket{le="300.0"} 0.0'),
        ([Metric("declared_total", "counter", "Not yet seen", ())], "# TYPE declared_total counter"),
    ],
)
def test_families_keep_names_and_merge_label_sets(reported: list[Metric], expected: str) -> None:
    assert expected in render(reported).decode().splitlines()


@pytest.mark.parametrize(
    "reported",
    [
        [metric("x", "gauge", "X", 1), metric("x", "counter", "X", 1)],
        [metric("x", "gauge", "X", Histogram())],
        [metric("x", "histogram", "X", 1.0)],
        [metric("x", "summary", "X", 1.0)],
    ],
)
def test_a_family_that_cannot_be_exported_is_refused(reported: list[Metric]) -> None:
    with pytest.raises(MetricError):
        families(reported)


def test_latency_buckets_reach_past_the_gateway_timeout() -> None:
    timeout = inspect.signature(Gateway.__init__).parameters["timeout_s"].default
    assert LATENCY_BUCKETS_S[-1] > timeout and LATENCY_BUCKETS_S[-2] > timeout  # ran into it, or went beyond
    assert list(LATENCY_BUCKETS_S) == sorted(LATENCY_BUCKETS_S)


@pytest.mark.parametrize(
    ("key", "name", "labels"),
    [
        ("a", "a", {}),
        ('a{b="c"}', "a", {"b": "c"}),
        ('a{b="x,y",c="q\\"uote\\\\"}', "a", {"b": "x,y", "c": 'q"uote\\'}),
        ('a_bucket{le="+Inf"}', "a_bucket", {"le": "+Inf"}),
    ],
)
def test_split_key(key: str, name: str, labels: dict[str, str]) -> None:
    assert split_key(key) == (name, labels)


# ---- the operator files -------------------------------------------------------------------

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                       "offset", "inf", "nan"})  # fmt: skip


def promql_metrics(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions, keywords,
    label names (in ``{}``, ``by ()``, ``on ()``...), durations or Grafana variables."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\{?\w+\}?", " ", s)
    found = {m.group(1) for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)\b(?!\s*\()", s)}
    return found - _KEYWORDS


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (model, le) (rate(a_bucket{job=~"$job",le="1"}[$__rate_interval]))', {"a_bucket"}),
        ("histogram_quantile(0.99, sum by (le) (rate(b_bucket[5m]))) > 1e9", {"b_bucket"}),
        ("x / on (instance) group_left(model) y unless z offset 5m", {"x", "y", "z"}),
        ("cocoon_wroker_jobs_total == 0", {"cocoon_wroker_jobs_total"}),  # a typo is seen
        ('up{job="cocoon-worker"} == 0 and bool 1', {"up"}),
    ],
)
def test_promql_metrics(expr: str, names: set[str]) -> None:
    assert promql_metrics(expr) == names


def _dashboard_queries() -> dict[str, str]:
    board = json.loads((OPS / "grafana-dashboard.json").read_text())
    out = {}
    for panel in board["panels"]:
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        out |= {f"{panel['title']} {t['refId']}": t["expr"] for t in panel.get("targets", [])}
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            out[f"${var['name']}"] = re.sub(r"label_values\((.*),\s*\w+\)$", r"\1", var["query"])
    assert len(out) > 30
    return out


def _alert_queries() -> dict[str, str]:
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load((OPS / "prometheus-alerts.yml").read_text())
    out = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"} and rule["annotations"]["summary"]
            out[rule["alert"]] = rule["expr"]
    assert len(out) >= 8
    return out


def _exported(text: str) -> set[str]:
    """Every series name a scrape's families can have (declared families without samples too)."""
    names = set()
    for f in text_string_to_metric_families(text):
        if f.type == "counter":
            names.add(f.name + "_total")
        elif f.type == "histogram":
            names |= {f.name + "_bucket", f.name + "_count", f.name + "_sum"}
        else:
            names.add(f.name)
    return names


@pytest.fixture(scope="module")
def scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A paid worker (an embedding and a chat model) and a gateway in front of it on the local
    chain, an embedding and a chat completion through the gateway, then three scrapes: the
    worker's --metrics, the gateway's --metrics and its API's /metrics."""
    if shutil.which("node") is None:
        pytest.skip("the local chain needs Node.js")
    tmp = tmp_path_factory.mktemp("ops")
    with open_local_chain() as chain:
        pay = ["--chain", chain.endpoint, "--local-chain", "--log-level", "WARNING", "--metrics", "127.0.0.1:0"]
        worker = subprocess.Popen([*CLI, "worker", "--data-dir", str(tmp / "w"), "--model", "minilm", "--model",
                                   "smollm2", *pay], stdout=subprocess.PIPE, text=True)  # fmt: skip
        procs = [worker]
        try:
            addr = _expect(worker, "listening ").split()[1]
            worker_url = _expect(worker, "metrics ").split()[1]
            gw = subprocess.Popen([*CLI, "gateway", "--data-dir", str(tmp / "g"), "--bootstrap", addr, "--model",
                                   "minilm", "--model", "smollm2", "--http", "127.0.0.1:0", "--max-price-nanoton",
                                   "1000", *pay], stdout=subprocess.PIPE, text=True)  # fmt: skip
            procs.append(gw)
            gw_url = _expect(gw, "metrics ").split()[1]
            base = _expect(gw, "gateway ").split()[1]
            api = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=60)
            deadline = time.monotonic() + 90
            while not all(any(m.id == n and m.workers for m in api.models.list().data) for n in ("minilm", "smollm2")):  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "the gateway never saw the worker's models"
                time.sleep(0.2)
            api.embeddings.create(model="minilm", input="hello")
            api.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
            )
            yield {
                name: urllib.request.urlopen(url, timeout=10).read().decode()
                for name, url in (
                    ("worker", worker_url),
                    ("gateway", gw_url),
                    ("api", base.removesuffix("/v1") + "/metrics"),
                )
            }
        finally:
            stop_processes(procs)


def _expect(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"{prefix!r} never printed (exit {proc.poll()})")


@pytest.mark.slow
def test_dashboard_and_alerts_name_only_metrics_a_real_network_exports(scrapes: dict[str, str]) -> None:
    exported = set().union(*(_exported(text) for text in scrapes.values())) | SYNTHETIC
    missing = {
        where: sorted(promql_metrics(expr) - exported)
        for where, expr in (_dashboard_queries() | _alert_queries()).items()
        if promql_metrics(expr) - exported
    }
    assert missing == {}
    for name in ("worker", "gateway"):  # the nodes' own /metrics: process metrics and build info
        assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "cocoon_build_info"} <= _exported(
            scrapes[name]
        )
    worker = parse(scrapes["worker"])
    assert total(worker, "cocoon_worker_jobs_total", outcome="ok") == 2  # one embedding, one chat
    assert total(worker, "cocoon_worker_job_seconds_count") == 2
    assert total(parse(scrapes["api"]), "cocoon_gateway_ttft_seconds_count", route="/v1/chat/completions") == 1
    # Every counter a node exports keeps a name ending in _total (none is exported untyped).
    for text in scrapes.values():
        assert [f.name for f in text_string_to_metric_families(text) if f.type == "unknown"] == []


def test_the_systemd_unit_outlasts_a_workers_drain_and_settlement(tmp_path: Path) -> None:
    text = (OPS / "cocoon-worker.service").read_text()
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(text)
    service = unit["Service"]
    defaults = config_mod.RoleConfig()
    assert float(service["TimeoutStopSec"]) > defaults.drain_s + defaults.settle_timeout_s
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "on-failure"
    assert service["User"] == "cocoon" and service["EnvironmentFile"] == "/etc/cocoon/worker.env"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert int(service["LimitNOFILE"]) >= 4096
    exec_start = service["ExecStart"].split()
    assert exec_start[0].endswith("/cocoon-node") and exec_start[1] == "worker"
    assert "COCOON_DATA_DIR=/var/lib/cocoon/" in text and service["ReadWritePaths"] == "/var/lib/cocoon"
    assert "COCOON_CHAIN_API_KEY" not in service.get("ExecStart", "")  # never where ps shows it
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the unit parsed)")
    local = tmp_path / "cocoon-worker.service"  # verify wants the binary to exist: this venv's
    local.write_text(text.replace(exec_start[0], str(Path(sys.executable).with_name("cocoon-node"))))
    out = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "cocoon-worker.service" not in out.stderr, out.stderr


def test_the_ops_files_ship_in_the_wheel() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = data["cocoon_p2p.nodes"]
    shipped = sorted(p.relative_to(ROOT / "nodes").as_posix() for p in OPS.iterdir())
    assert shipped == ["ops/cocoon-worker.service", "ops/grafana-dashboard.json", "ops/prometheus-alerts.yml"]
    assert all(any(fnmatch(f, g) for g in globs) for f in shipped)
    assert "prometheus_client" in " ".join(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    )
