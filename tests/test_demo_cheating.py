"""A worker that lies, as an operator meets it: the flags (``--cheat-rate``,
``--spot-check-rate``), the status view of spot checks, and ``cocoon-node demo
--cheating-worker`` (real processes, the local chain), where the client catches the
cheater, bans it, does not pay it for what it was caught on and still answers every job.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cocoon_p2p.nodes import config as config_mod
from cocoon_p2p.nodes import status as status_mod
from cocoon_p2p.nodes.cli import _node_config, build_parser, cheating_metrics, main

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.core.metrics import parse, render
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.jobs.spotcheck import DEFAULT_COSINE_MIN, SpotCheckPolicy
from cocoon_p2p.testing.cheating import CheatingBackend

from .helpers import x_rows

CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]


def _config(argv: list[str], toml: str | None = None, tmp: Path | None = None) -> config_mod.RoleConfig:
    """What a role's flags (and TOML file) configure, as the CLI loads it."""
    if toml is not None and tmp is not None:
        (tmp / "role.toml").write_text(toml)
        argv = [*argv, "--config", str(tmp / "role.toml")]
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in config_mod.RoleConfig.__dataclass_fields__}
    return config_mod.load(args.config, overrides)


@pytest.mark.parametrize(
    ("argv", "toml", "spot_checks", "cheat_rate"),
    [
        (["client", "embed", "x"], None, None, 0.0),
        (["client", "embed", "x", "--spot-check-rate", "0.25"], None, SpotCheckPolicy(0.25), 0.0),
        (
            ["gateway", "--spot-check-rate", "1", "--spot-check-cosine-min", "0.99"],
            None,
            SpotCheckPolicy(1.0, 0.99),
            0.0,
        ),
        (["gateway"], "spot_check_rate = 0.5\nspot_check_cosine_min = 0.9\n", SpotCheckPolicy(0.5, 0.9), 0.0),
        (["gateway", "--spot-check-rate", "0.1"], "spot_check_rate = 0.5\n", SpotCheckPolicy(0.1), 0.0),  # flag wins
        (["worker", "--cheat-rate", "0.3"], None, None, 0.3),
        (["worker"], "cheat_rate = 1\n", None, 1.0),
    ],
)
def test_flags_and_toml_keys_reach_the_node(
    tmp_path: Path, argv: list[str], toml: str | None, spot_checks: SpotCheckPolicy | None, cheat_rate: float
) -> None:
    cfg = _config(argv, toml, tmp_path)
    assert _node_config(cfg).spot_checks == spot_checks
    assert cfg.cheat_rate == cheat_rate
    assert cfg.spot_check_cosine_min == (spot_checks.cosine_min if spot_checks else DEFAULT_COSINE_MIN)


@pytest.mark.parametrize(
    ("argv", "toml", "key"),
    [
        (["client", "embed", "x", "--spot-check-rate", "1.5"], None, "spot_check_rate"),
        (["gateway", "--spot-check-rate", "-0.1"], None, "spot_check_rate"),
        (["gateway", "--spot-check-cosine-min", "2"], None, "spot_check_cosine_min"),
        (["gateway"], 'spot_check_rate = "all"\n', "spot_check_rate"),
        (["worker", "--cheat-rate", "1.01"], None, "cheat_rate"),
        (["worker"], "cheat_rate = true\n", "cheat_rate"),
    ],
)
def test_shares_out_of_range_are_named_config_errors(
    tmp_path: Path, argv: list[str], toml: str | None, key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        _config(argv, toml, tmp_path)


def test_the_cheat_rate_flag_says_what_it_is_for(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["worker", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "--cheat-rate R adversarial testing only: return wrong results on this share of model runs" in shown


def test_a_cheating_backend_counts_what_it_lied_on_in_the_worker_metrics(tiny_model: ModelSpec) -> None:
    honest = OnnxRuntimeBackend(tiny_model.path, threads=1)
    liar = CheatingBackend(OnnxRuntimeBackend(tiny_model.path, threads=1), rate=1.0)
    x = {"x": x_rows(2)}
    assert not np.allclose(liar.run(x)["y"], honest.run(x)["y"])  # the same shape, wrong values
    series = parse(render(cheating_metrics([liar, CheatingBackend(honest, rate=0.0)])))
    assert series == {"cocoon_cheated_runs_total": 1, "cocoon_model_runs_total": 1}


@contextmanager
def _serving(text: str) -> Iterator[str]:
    """A real HTTP server answering ``/metrics`` with ``text``; its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("exposition", "checks"),
    [
        ("cocoon_workers_known 2\n", None),  # a worker, or a client without spot checks
        (
            "cocoon_checks_total 8\ncocoon_checks_failed_total 2\ncocoon_checks_skipped_total 1\n"
            "cocoon_checks_withheld_nanoton_total 10920000\n",
            {"checks": 8, "failed": 2, "skipped": 1, "withheld_nanoton": 10920000, "fraud_proofs_sent": 0},
        ),
        (
            "cocoon_checks_total 3\ncocoon_fraud_proofs_sent_total 1\n",
            {"checks": 3, "failed": 0, "skipped": 0, "withheld_nanoton": 0, "fraud_proofs_sent": 1},
        ),
    ],
)
def test_status_sums_up_a_running_clients_spot_checks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], exposition: str, checks: dict[str, int] | None
) -> None:
    with _serving(exposition) as url:
        assert build_parser().parse_args(["status", "--metrics", url]).metrics_url == url  # and --metrics-url
        info = status_mod.collect(tmp_path, url)
    assert info.get("checks") == checks
    assert info["metrics"] == parse(exposition)
    status_mod.print_status(info)
    shown = capsys.readouterr().out
    assert ("checks    " in shown) == (checks is not None)
    if checks:
        assert f"{checks['failed']} found wrong ({checks['withheld_nanoton']} nanoton not paid)" in shown


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--cheating-worker", "--workers", "2"], "needs --workers 3 or more"),
        (["--cheating-worker", "--cheat-rate", "2"], "shares within [0, 1]"),
        (["--spot-check-rate", "-1"], "shares within [0, 1]"),
    ],
)
def test_the_demo_refuses_what_cannot_show_a_cheater_caught(
    capsys: pytest.CaptureFixture[str], argv: list[str], why: str
) -> None:
    assert main(["demo", *argv]) == 2  # before any chain or process starts
    assert why in capsys.readouterr().err


@pytest.mark.slow
def test_demo_catches_bans_and_does_not_pay_a_cheating_worker() -> None:
    out = subprocess.run(
        [*CLI, "demo", "--json", "--cheating-worker", "--jobs", "8", "--max-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    r = json.loads(out.stdout)
    cheater = r["cheater"]
    assert r["ok"] and r["workers"] == 3 and cheater == r["worker_ids"][-1]
    assert r["banned"] == [cheater]  # the cheater, and no honest worker
    assert r["checks"] == 8 and r["checks_failed"] >= 1  # every job checked (rate 1.0); the cheater caught
    assert r["jobs_ok"] == 8 and r["jobs_failed"] == 0 and r["errors"] == []  # every job answered
    row = r["per_worker"][cheater]
    assert row["cheated_runs"] >= 1 and row["cheated_jobs"] == r["checks_failed"]
    # What it was caught on went unpaid: its bill less our vouchers is exactly those results.
    assert row["caught_nanoton"] == r["withheld_nanoton"] == row["billed_nanoton"] - row["paid_nanoton"] > 0
    assert r["paid_for_cheated_nanoton"] == row["paid_for_cheated_nanoton"] == 0
    for peer in set(r["worker_ids"]) - {cheater}:  # honest workers: paid every result they billed
        honest = r["per_worker"][peer]
        assert honest["cheated_runs"] == honest["cheated_jobs"] == 0
        assert honest["paid_nanoton"] == honest["billed_nanoton"]
    # Every channel settled on chain, the cheater's too: paid = settled + fees.
    assert r["unsettled_channels"] == [] and r["payments_acknowledged_late"] == 0
    assert sum(w["paid_nanoton"] for w in r["per_worker"].values()) == r["paid_nanoton"]
    assert 0 < r["settled_nanoton"] <= r["paid_nanoton"]
    # Fees: the payouts' forward fees (~4% here), plus the gas of the cheater's close when the
    # ban's hang-up broke the client's close and the worker sent it from its own wallet
    # (seen once under CI load: 13.8%); never more than a few operations' worth.
    assert r["fees_nanoton"] == r["paid_nanoton"] - r["settled_nanoton"] < r["paid_nanoton"] // 5
    assert r["sample_chat"]
    assert "caught " in out.stderr  # the catch is shown as it happens
