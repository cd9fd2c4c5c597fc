"""The simulator: determinism, conservation, a 1,000-peer model run, the CLI and its files,
a sweep, and a small emulation with real processes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from cocoon_p2p.simulations import cli
from cocoon_p2p.simulations.model import ModelSim
from cocoon_p2p.simulations.scenario import ScenarioError, from_dict, load

SCENARIOS = Path(__file__).resolve().parent.parent / "simulations" / "scenarios"


def small(**over: Any) -> dict[str, Any]:
    sc: dict[str, Any] = {
        "name": "t",
        "seed": 5,
        "duration_s": 120,
        "warmup_s": 10,
        "network": {"relays": 20, "loss": 0.01},
        "workers": [{"count": 8, "job_s": 0.05, "service_cv": 0.5, "capacity": 4}],
        "clients": [{"count": 20, "rate_per_s": 1.0, "units": 2}],
        "churn": {"fraction": 0.3, "session_mean_s": 40, "offline_mean_s": 10},
    }
    sc.update(over)
    return sc


def _figures(r: Any) -> dict[str, Any]:
    s = r.summary()
    s.pop("wall_s")
    return s


def test_same_seed_same_run_other_seed_other_run() -> None:
    a, b = ModelSim(from_dict(small())).run(), ModelSim(from_dict(small())).run()
    assert _figures(a) == _figures(b)
    assert [(j.issued, j.ok, j.worker, j.latency_s) for j in a.jobs] == [
        (j.issued, j.ok, j.worker, j.latency_s) for j in b.jobs
    ]
    c = ModelSim(from_dict(small(seed=6))).run()
    assert _figures(c) != _figures(a)


def test_jobs_and_money_are_conserved_with_adversaries_and_churn() -> None:
    sc = from_dict(
        small(
            adversaries={"drop_fraction": 0.125, "overcharge_fraction": 0.125},
            settlement={"deposit_nanoton": 3_000, "settle_above_nanoton": 2_000, "watch_s": 5},
            workers=[{"count": 8, "job_s": 0.05, "capacity": 4, "price_nanoton": 100}],
        )
    )
    sim = ModelSim(sc)
    r = sim.run()
    s = r.summary()
    assert s["jobs_issued"] == s["jobs_ok"] + s["jobs_failed"] + s["jobs_abandoned"] + s["jobs_unfinished"] > 1000
    money = s["money"]
    assert money["vouchers_paid_nanoton"] == money["earned_settled_nanoton"] + money["held_in_open_channels_nanoton"]
    assert money["vouchers_paid_nanoton"] == sum(w["earned_nanoton"] for w in r.workers)
    assert money["vouchers_paid_nanoton"] == sum(j.cost for j in r.jobs if j.ok) > 0
    cheats = {w["idx"]: w for w in r.workers if w["behaviour"] != "honest"}
    assert len(cheats) == 2 and all(w["earned_nanoton"] == 0 for w in cheats.values())  # never paid
    assert all(j.worker not in cheats for j in r.jobs if j.ok)
    assert s["channels_closed"] > 0 and s["onchain_ops"] <= 3 * s["channels_opened"]  # at most 3 a channel
    assert s["failures_by_code"].get("deadline", 0) > 0  # the droppers' jobs time out: no retry within a job


def test_a_thousand_peer_network_in_the_model() -> None:
    sc = load(SCENARIOS / "dht.toml", ["duration_s=240"])
    assert sc.peers == 1000
    r = ModelSim(sc).run()
    s = r.summary()
    assert s["success"] > 0.99 and s["counted_jobs"] > 500
    assert s["lookups"] > 200 and 1 <= s["lookup_hops_mean"] <= math.log2(1000)
    assert s["announcement_coverage"]["2.0s"] > 0.9  # gossip reaches (nearly) every online peer in 2 s
    assert s["announce_visible_s_p50"] < 3.0


def test_scenario_files_and_overrides_are_checked(tmp_path: Path) -> None:
    for path in SCENARIOS.glob("*.toml"):
        load(path)  # every committed scenario parses
    with pytest.raises(ScenarioError, match="unknown keys"):
        from_dict(small(network={"relay": 3}))
    with pytest.raises(ScenarioError, match="routing.rule"):
        load(SCENARIOS / "small.toml", ["routing.rule=fastest"])
    sc = load(SCENARIOS / "routing.toml", ["workers.speed=3", "workers.0.count=1", "load.target=0.5"])
    assert [w.speed for w in sc.workers] == [3, 3, 3] and sc.workers[0].count == 1 and sc.load.target == 0.5


def test_cli_run_and_sweep_write_figures_and_tables(tmp_path: Path) -> None:
    assert cli.main(["run", str(SCENARIOS / "small.toml"), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "run"
    for name in ("summary.json", "jobs.csv", "timeseries.csv", "lookups.csv", "workers.csv", "latency_cdf.png",
                 "worker_load.png", "earnings.png", "coverage.png", "success_over_time.png"):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "summary.json").read_text())["jobs_issued"] > 100
    grid = ["--param", "routing.rule=cocoon,random", "--set", "duration_s=20", "--processes", "2"]
    assert cli.main(["sweep", str(SCENARIOS / "small.toml"), *grid, "--out", str(tmp_path / "sweep")]) == 0
    rows = (tmp_path / "sweep" / "sweep.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("duration_s,routing.rule,")


@pytest.mark.skipif(shutil.which("node") is None, reason="the emulation's local chain needs Node.js")
def test_small_emulation_with_real_nodes(tmp_path: Path) -> None:
    out = tmp_path / "emu"
    assert cli.main(["run", str(SCENARIOS / "small.toml"), "--fidelity", "emulation", "--out", str(out),
                     "--param", "duration_s=15", "--param", "warmup_s=2"]) == 0  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert s["fidelity"] == "emulation" and s["worker_processes"] == 3
    assert s["jobs_ok"] > 50 and s["success"] >= 0.99
    assert s["paid_nanoton"] == 1000 * s["jobs_ok"]  # every job paid by voucher, on channels opened on chain
    assert s["onchain_ops"] >= 2 and s["lookups"] == 2
    assert not list(Path("/tmp").glob("cocoon-emulation-*/w0"))  # its folders are gone
