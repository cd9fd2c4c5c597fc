"""The node programs as an operator runs them: real processes on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from cocoon_p2p.core.metrics import parse, total
from cocoon_p2p.testing.localchain import open_local_chain

from .netutil import stop_processes

CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]


def test_demo_runs_real_jobs_over_discovered_workers() -> None:
    out = subprocess.run(
        [*CLI, "demo", "--json", "--workers", "2", "--jobs", "8", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["ok"] and r["workers"] == 2
    assert r["discovered_both_sources"] == {"embed": 2, "chat": 2}
    assert r["jobs_ok"] == 8 and r["jobs_failed"] == 0
    assert sum(w["jobs"] for w in r["per_worker"].values()) == 8
    assert sum(w["earned_nanoton"] for w in r["per_worker"].values()) == r["paid_nanoton"] > 0
    # Paid by voucher, settled on the local chain: what the workers' wallets received, net of fees.
    assert 0 < r["settled_nanoton"] <= r["paid_nanoton"]
    assert r["fees_nanoton"] == r["paid_nanoton"] - r["settled_nanoton"] < r["paid_nanoton"] // 10
    assert r["channels"] == sum(1 for w in r["per_worker"].values() if w["jobs"] > 0)  # one per worker paid
    assert 0 < r["latency_ms_p50"] <= r["latency_ms_p99"]
    assert "jobs done" in out.stderr  # progress is shown


def test_worker_and_client_commands(tmp_path: Path) -> None:
    worker = subprocess.Popen(
        [*CLI, "worker", "--data-dir", str(tmp_path / "w"), "--model", "minilm", "--log-level", "WARNING"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        addr = worker.stdout.readline().split()[1]
        assert addr.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in addr
        serving = worker.stdout.readline()
        assert serving.startswith("serving ") and "all-minilm-l6-v2" in serving
        out = subprocess.run(
            [*CLI, "client", "embed", "hello world", "--bootstrap", addr, "--data-dir", str(tmp_path / "c")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "(384 dims)" in out.stdout
        assert (
            f"served by {addr.rsplit('/', 1)[1]}" in out.stderr and "4 units x 1000 = 4000 nanoton" in out.stderr
        )  # [CLS] hello world [SEP]
    finally:
        worker.send_signal(signal.SIGTERM)
        rest, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0
    assert "stopping" in rest and "served 1 jobs, earned 4000 nanoton" in rest


def test_demo_survives_a_killed_worker_on_a_testnet_like_chain() -> None:
    """Blocks every 400 ms, sendBoc only "accepted", rate limits and 2% failing API calls."""
    out = subprocess.run(
        [
            *CLI,
            "demo",
            "--json",
            "--workers",
            "2",
            "--jobs",
            "9",
            "--max-tokens",
            "8",
            "--kill-worker",
            "--realistic-chain",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["killed_worker"] in r["worker_ids"] and "killing worker" in out.stderr
    assert r["jobs_ok"] == 9 and r["jobs_failed"] == 0 and r["errors"] == []  # every job completed
    assert sum(w["earned_nanoton"] for w in r["per_worker"].values()) == r["paid_nanoton"]  # each paid once
    assert 0 < r["settled_nanoton"] <= r["paid_nanoton"]  # the restarted worker settled too
    assert r["realistic_chain"] and r["ok"]  # a voucher on its way to the killed worker is acknowledged late
    assert 0 < r["open_wait_s_p50"] <= r["open_wait_s_p99"] and 0 < r["settle_wait_s_p50"]  # waited for blocks


def _expect(proc: subprocess.Popen[str], prefix: str) -> str:
    """The next stdout line of ``proc`` that starts with ``prefix`` (others are skipped)."""
    assert proc.stdout is not None
    while line := proc.stdout.readline():
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"{prefix!r} never printed (exit {proc.poll()})")


def _scrape(url: str) -> dict[str, float]:
    return parse(urllib.request.urlopen(url, timeout=10).read().decode())


@pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js")
def test_operator_flow_gateway_metrics_status_and_worker_restart(tmp_path: Path) -> None:
    """A paid worker with /metrics, the OpenAI gateway in front of the network, a crash and
    restart of the worker (same PeerId, channel and earnings), then settlement on SIGTERM."""
    with open_local_chain() as chain:
        pay = ["--chain", chain.endpoint, "--local-chain"]
        w_dir = tmp_path / "worker"
        w_cmd = [*CLI, "worker", "--data-dir", str(w_dir), "--model", "minilm", *pay, "--metrics", "127.0.0.1:0"]
        worker = subprocess.Popen([*w_cmd, "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
        procs = [worker]
        try:
            addr = _expect(worker, "listening ").split()[1]
            metrics_url = _expect(worker, "metrics ").split()[1]
            wallet = _expect(worker, "wallet ").split()[1]
            _expect(worker, "serving ")
            gw = subprocess.Popen(
                [*CLI, "gateway", "--data-dir", str(tmp_path / "gw"), "--bootstrap", addr, "--model", "minilm",
                 "--http", "127.0.0.1:0", "--max-price-nanoton", "1000", *pay, "--log-level", "WARNING"],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs.append(gw)
            base = _expect(gw, "gateway ").split()[1]
            api = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=60)
            deadline = time.monotonic() + 60
            while not any(m.id == "minilm" and m.workers for m in api.models.list().data):  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "the gateway never saw the worker"
                time.sleep(0.2)
            for text in ("hello", "world"):
                emb = api.embeddings.create(model="minilm", input=text)
                assert len(emb.data[0].embedding) == 384 and emb.usage.cost_nanoton == 3 * 1000  # type: ignore[attr-defined]
            m = _scrape(metrics_url)
            while m["cocoon_channel_earned_unsettled_nanoton"] < 6000:  # the vouchers follow the answers
                assert time.monotonic() < deadline + 30, "the second voucher never arrived"
                time.sleep(0.1)
                m = _scrape(metrics_url)
            assert total(m, "cocoon_worker_jobs_total", outcome="ok") == 2  # over the model label
            assert m["cocoon_channel_earned_unsettled_nanoton"] == 6000 and m['cocoon_channels{role="worker"}'] == 1
            assert total(m, "cocoon_worker_job_seconds_count") == 2
            assert m['cocoon_streams_total{direction="inbound"}'] >= 2  # the job stream among them
            assert m['cocoon_stream_bytes_total{direction="received"}'] > 0
            assert m['cocoon_connections_dropped_total{reason="protocol-error"}'] == 0

            # Crash: the worker restarts from its data directory, on the same address.
            worker.kill()
            worker.wait(timeout=10)
            status = _status(w_dir)
            assert status["earned_unsettled_nanoton"] == 6000 and len(status["worker_channels"]) == 1
            assert status["wallet_to_fund"] == wallet  # the form the worker printed to fund
            worker = subprocess.Popen(
                [*w_cmd, "--listen", addr.split("/p2p/")[0], "--log-level", "WARNING"],
                stdout=subprocess.PIPE,
                text=True,
            )
            procs.append(worker)
            assert _expect(worker, "listening ").split()[1] == addr  # same PeerId
            _expect(worker, "serving ")
            deadline = time.monotonic() + 60
            while True:  # the gateway finds it again and pays on the same channel
                try:
                    emb = api.embeddings.create(model="minilm", input="again")
                    break
                except openai.APIStatusError:
                    assert time.monotonic() < deadline, "no job after the restart"
                    time.sleep(0.5)
            earned = 6000 + emb.usage.cost_nanoton  # type: ignore[attr-defined]
            status = _status(w_dir)
            while status["earned_unsettled_nanoton"] < earned:  # type: ignore[operator]  # the voucher follows
                assert time.monotonic() < deadline + 30, "the voucher never arrived"
                time.sleep(0.1)
                status = _status(w_dir)
            assert status["earned_unsettled_nanoton"] == earned and len(status["worker_channels"]) == 1

            # SIGTERM: the worker stops taking jobs and settles what it earned, cooperatively.
            before = chain.balance(wallet)
            worker.send_signal(signal.SIGTERM)
            assert "cooperative" in _expect(worker, "channel ")
            assert worker.wait(timeout=30) == 0
            status = _status(w_dir)
            assert [c["settled"] for c in status["worker_channels"]] == [True]
            assert status["earned_unsettled_nanoton"] == 0
            gained = chain.balance(wallet) - before
            assert earned - 60_000_000 < gained  # what it earned arrived, less the close's gas
        finally:
            stop_processes(procs)


def _status(data_dir: Path) -> dict[str, object]:
    out = subprocess.run([*CLI, "status", "--data-dir", str(data_dir), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(json.loads(out.stdout))
