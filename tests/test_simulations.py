"""The simulator: determinism, conservation, a 1,000-peer model run, the CLI and its files,
a sweep, and a small emulation with real processes."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from cocoon_p2p.simulations import cli
from cocoon_p2p.simulations.emulation import run_emulation
from cocoon_p2p.simulations.model import EPOCH_MS, ModelSim
from cocoon_p2p.simulations.scenario import ScenarioError, from_dict, load
from cocoon_p2p.simulations.spotchecks import Check, Flow, Run, Verdict, decide
from cocoon_p2p.simulations.tee import ASK_BYTES, NO_ATTESTED_WORKERS

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


def test_a_joining_client_hears_the_workers_without_waiting_for_a_new_mesh_epoch() -> None:
    gossip = {"epoch_s": 1000.0}  # no recomputed delays within the run: only the join itself can connect
    sim = ModelSim(from_dict(small(churn={"fraction": 0.0}, duration_s=25, warmup_s=5, gossip=gossip)))
    sim.run()
    world = sim.world
    assert world.mesh.version == 0
    for c in world.clients:
        sim.announcing.deliver(c)
        for w in world.workers:
            held = c.directory.announcement_of(w.ident.peer_id)
            assert held is not None  # every worker's periodic announcement reached it
            assert held.issued_at_ms >= EPOCH_MS + c.joined_at * 1000  # and nothing sent before it joined


# ---- TEE attestation (issue 17) ------------------------------------------------------------------


def tee_run(tee: dict[str, Any], **over: Any) -> ModelSim:
    """A small network without churn or loss (only the TEE differs between runs), run to its end."""
    sc = small(network={"relays": 10}, churn={"fraction": 0.0}, duration_s=90,
               clients=[{"count": 12, "rate_per_s": 1.0}], tee=tee)  # fmt: skip
    sc.update(over)
    sim = ModelSim(from_dict(sc))
    sim.run()
    return sim


def test_the_failure_code_is_the_nodes() -> None:
    assert NO_ATTESTED_WORKERS == "no-attested-workers"


@pytest.mark.parametrize("rule", ["cocoon", "random", "oracle"])
def test_without_attested_workers_every_requiring_job_fails_with_its_own_code(rule: str) -> None:
    sim = tee_run({"attested_share": 0.0, "require_share": 1.0}, routing={"rule": rule}, duration_s=60)
    s = sim.results.summary()
    assert s["counted_jobs"] > 300 and s["jobs_ok"] == 0
    assert set(s["failures_by_code"]) == {NO_ATTESTED_WORKERS}
    assert s["tee"]["no_attested_workers_failures"] == s["counted_jobs"] == s["tee"]["requiring"]["jobs"]
    assert s["tee"]["requiring"]["success"] == 0 and s["tee"]["other"]["jobs"] == 0
    assert s["tee"]["attestation_asks"] == 0 and not sim.attestation.asks


def test_all_attested_succeeds_as_the_baseline_and_asks_once_a_pair() -> None:
    base = tee_run({}).results.summary()
    sim = tee_run({"attested_share": 1.0, "require_share": 1.0})
    s = sim.results.summary()
    assert "tee" not in base and s["success"] == base["success"] == 1.0
    assert s["latency_s_p50"] < 1.25 * base["latency_s_p50"]  # asks only on first contacts
    asks = sim.attestation.asks
    assert all(len(times) == 1 for times in asks.values())  # the default TTL (1 h) outlasts the run
    served = {(j.client, j.worker) for j in sim.results.jobs if j.ok}
    assert served <= set(asks) and s["tee"]["attestation_asks"] == len(asks) >= 12 * 4


def test_an_ask_costs_a_round_trip_the_evidence_and_the_check() -> None:
    tee = {"attested_share": 1.0, "require_share": 0.5, "verify_ms": 5.0, "evidence_kb": 10, "verdict_ttl_s": 100}
    sim = ModelSim(from_dict(small(network={"relays": 0, "bandwidth_mbps": 8.0}, tee=tee)))
    world, gate = sim.world, sim.attestation
    c = next(c for c in world.clients if c.requires_tee)
    other = next(c for c in world.clients if not c.requires_tee)
    w = world.workers[0]
    ask = world.latency.pair_rtt(c.idx, w.idx) + (ASK_BYTES + 10_000) * 8 / 8e6 + 0.005
    rows = [  # (now, worker online, when the job may go, asks so far)
        (0.0, False, ask, 1),  # a departed worker: the job goes (and finds it gone), nothing is cached
        (1.0, True, 1.0 + ask, 2),  # first contact: ask, wait for the evidence, check it
        (1.0 + ask / 2, True, 1.0 + ask, 2),  # the ask in flight serves this job too
        (50.0, True, 50.0, 2),  # a fresh verdict: no wait
        (1.0 + ask + 100, True, 1.0 + ask + 100 + ask, 3),  # expired: ask again
    ]
    for now, online, ready, asks in rows:
        world.events.now, world.online[w.idx] = now, online
        assert gate.ready_at(c, w) == pytest.approx(ready)
        assert len(gate.asks[(c.idx, w.idx)]) == asks
        assert gate.ready_at(other, w) == now  # no requirement, no ask
    assert gate.ask_count == 3


@pytest.mark.parametrize(("ttl_s", "asks_per_pair"), [(3600.0, 1), (15.0, 2)])
def test_a_verdict_stands_for_its_ttl(ttl_s: float, asks_per_pair: int) -> None:
    sim = tee_run({"attested_share": 0.5, "require_share": 1.0, "verdict_ttl_s": ttl_s})
    asks = sim.attestation.asks
    attested = {w.idx for w in sim.world.workers if w.attested}
    assert len(attested) == 4 and {wi for _, wi in asks} == attested
    for times in asks.values():
        assert all(b - a >= ttl_s for a, b in itertools.pairwise(times))  # never again within the TTL
    assert max(len(t) for t in asks.values()) >= asks_per_pair
    if ttl_s > 90:
        assert all(len(t) == 1 for t in asks.values())


def test_tee_runs_are_deterministic_and_split_requiring_from_other_clients() -> None:
    tee = {"attested_share": 0.25, "require_share": 0.5}
    a, b = tee_run(tee), tee_run(tee)
    assert _figures(a.results) == _figures(b.results)
    assert a.attestation.asks == b.attestation.asks
    s = _figures(a.results)["tee"]
    assert s["requiring"]["jobs"] + s["other"]["jobs"] == a.results.summary()["counted_jobs"]
    assert sum(c.requires_tee for c in a.world.clients) == 6 and sum(w.attested for w in a.world.workers) == 2
    assert s["other"]["success"] == 1.0 and s["requiring"]["success"] > 0.9


def test_tee_settings_are_checked() -> None:
    for bad in ({"attested_share": 1.5}, {"require_share": -0.1}, {"verdict_ttl_s": 0}, {"verify_ms": "fast"}):
        with pytest.raises(ScenarioError, match="tee"):
            from_dict(small(tee=bad))
    with pytest.raises(ScenarioError, match="unknown keys"):
        from_dict(small(tee={"attested": 0.5}))
    sc = load(SCENARIOS / "tee.toml", ["tee.attested_share=0.1"])
    assert (sc.tee.attested_share, sc.tee.require_share, sc.tee.verify_ms, sc.tee.evidence_kb) == (0.1, 0.5, 1.0, 10)


# ---- wrong results: cheaters, spot checks, bans and fraud proofs (issue 18) ---------------------------


def cheat_run(cheat: dict[str, Any], **over: Any) -> ModelSim:
    """8 workers, 12 clients, no churn or loss, deterministic service: only [cheat] differs between runs."""
    sc = small(network={"relays": 10}, churn={"fraction": 0.0}, duration_s=40, warmup_s=5,
               workers=[{"count": 8, "job_s": 0.05, "capacity": 8}], clients=[{"count": 12, "rate_per_s": 2.0}],
               cheat=cheat)  # fmt: skip
    sc.update(over)
    sim = ModelSim(from_dict(sc))
    sim.run()
    return sim


def _run_of(worker: str, answer: int) -> Run:
    return Run(worker=worker, answer=answer, cost=1, lie=answer != 0)  # type: ignore[arg-type]


RIGHT, WRONG_A, WRONG_B = 0, 1, 2
ASK = "ask"
# (flow, the first run's answer, earlier check runs' answers, this run's answer or None (no worker / failed),
#  what follows: ASK, or (verdict, the worker found wrong, the worker whose result the caller gets, the paid runs))
DECISIONS = [
    (Flow.RERUN, RIGHT, [], RIGHT, (Verdict.PASSED, None, "first", ["r1"])),
    (Flow.RERUN, WRONG_A, [], None, (Verdict.SKIPPED, None, "first", [])),
    (Flow.RERUN, WRONG_A, [], RIGHT, ASK),
    (Flow.RERUN, WRONG_A, [RIGHT], RIGHT, (Verdict.WRONG, "first", "r2", ["r1", "r2"])),
    (Flow.RERUN, WRONG_A, [RIGHT], None, (Verdict.SKIPPED, None, "first", ["r1"])),  # word against word
    (Flow.RERUN, RIGHT, [WRONG_B], None, (Verdict.SKIPPED, None, "first", ["r1"])),  # ... a lying reference's too
    (Flow.RERUN, RIGHT, [WRONG_B], RIGHT, (Verdict.PASSED, "r1", "first", ["r2"])),  # a lying reference
    (Flow.RERUN, WRONG_A, [WRONG_B], RIGHT, (Verdict.SKIPPED, None, "first", ["r1", "r2"])),  # three answers
    (Flow.VERIFY, RIGHT, [], RIGHT, (Verdict.PASSED, None, "first", ["r1"])),
    (Flow.VERIFY, RIGHT, [], WRONG_B, (Verdict.PASSED, None, "first", ["r1"])),  # a lying verifier echoes
    (Flow.VERIFY, WRONG_A, [], WRONG_B, (Verdict.PASSED, None, "first", ["r1"])),  # ... so a lie passes
    (Flow.VERIFY, WRONG_A, [], RIGHT, ASK),
    (Flow.VERIFY, WRONG_A, [], None, (Verdict.SKIPPED, None, "first", [])),
    (Flow.VERIFY, WRONG_A, [RIGHT], RIGHT, (Verdict.WRONG, "first", "first", ["r2", "r1"])),  # kept, unpaid
    (Flow.VERIFY, WRONG_A, [RIGHT], None, (Verdict.WRONG, "first", "first", ["r1"])),
    (Flow.VERIFY, WRONG_A, [RIGHT], WRONG_B, ASK),  # the verifiers disagree: a third decides
    (Flow.VERIFY, WRONG_A, [RIGHT, WRONG_B], None, (Verdict.SKIPPED, None, "first", ["r1", "r2"])),  # word vs word
    (Flow.VERIFY, WRONG_A, [RIGHT, WRONG_B], RIGHT, (Verdict.WRONG, "first", "first", ["r1", "r2", "r3"])),
    (Flow.VERIFY, WRONG_A, [RIGHT, WRONG_B], WRONG_B, (Verdict.PASSED, "r1", "first", ["r2", "r3"])),  # 2 liars win
]


@pytest.mark.parametrize(("flow", "first", "before", "now", "then"), DECISIONS)
def test_a_check_decides_as_the_clients_result_checks(flow: Flow, first: int, before: list[int], now: int | None,
                                                      then: Any) -> None:  # fmt: skip
    runs = {"first": _run_of("first", first)}
    check = Check(job=None, first=runs["first"], exclude=set())  # type: ignore[arg-type]
    for i, answer in enumerate(before, 1):
        check.runs.append(runs.setdefault(f"r{i}", _run_of(f"r{i}", answer)))
    run = None if now is None else runs.setdefault(f"r{len(before) + 1}", _run_of(f"r{len(before) + 1}", now))
    decided = decide(flow, check, run)
    if then == ASK:
        assert decided is None
        return
    verdict, wrong, keep, paid = then
    assert decided is not None and decided.verdict is verdict
    assert (decided.wrong.worker if decided.wrong else None) == wrong
    assert (decided.keep or check.first).worker == keep
    assert [r.worker for r in decided.pay] == paid
    assert decided.wrong not in decided.pay  # the run found wrong is never paid


@pytest.mark.parametrize(("verify_cost", "flow"), [(1.0, "re-run"), (0.08, "verify")])
def test_checks_of_an_honest_network_cost_their_rate_and_find_nothing(verify_cost: float, flow: str) -> None:
    sim = cheat_run({"check_rate": 0.2, "verify_cost": verify_cost})
    s = sim.results.summary()["cheat"]
    assert s["flow"] == flow and s["cheaters"] == 0 and s["jobs_by_cheaters"] == s["wrong_results"] == 0
    assert s["paid_to_cheaters_nanoton"] == s["paid_for_wrong_nanoton"] == 0 and s["wrong_paid_share"] == 0
    assert s["jobs_to_detection_p50"] is None and s["network_ban_s_max"] is None
    assert s["false_alarms"] == s["checks_found_wrong"] == s["proofs"] == 0
    assert not any(c.banned for c in sim.world.clients)
    jobs = [j for j in sim.results.jobs if j.ok]
    checked = [j for j in jobs if j.verdict is not Verdict.UNCHECKED]
    assert len(checked) <= s["checks"] <= len(checked) + 3  # (a few checks may still be running at the end)
    # One run a check (none when the client knew no other worker): no tie-breakers, no second verifiers.
    assert s["checks"] - s["checks_skipped"] <= s["check_runs"] <= s["checks"]
    assert {j.verdict for j in checked} <= {Verdict.PASSED, Verdict.SKIPPED}
    assert 0.15 < s["checks"] / len(jobs) < 0.25
    assert s["added_compute_share"] == pytest.approx(s["checks"] / len(jobs) * verify_cost, rel=0.05)
    passed = sum(j.verdict is Verdict.PASSED for j in checked)
    assert s["paid_for_checks_nanoton"] == 1000 * passed  # each passed check's run, paid like any job


def test_no_cheaters_and_no_checks_runs_exactly_as_before() -> None:
    base = cheat_run({})
    same = cheat_run({"share": 0.0, "check_rate": 0.0, "verify_cost": 1.0})
    assert "cheat" not in base.results.summary() and _figures(base.results) == _figures(same.results)


def test_without_checks_nothing_is_caught_and_every_wrong_result_is_paid() -> None:
    sim = cheat_run({"share": 0.25, "rate": 0.5, "check_rate": 0.0})
    s = sim.results.summary()["cheat"]
    assert s["cheaters"] == 2 and s["cheaters_never_detected"] == 2 and s["jobs_to_detection"] == [None, None]
    assert s["checks"] == s["wrong_caught"] == s["proofs"] == 0 and not any(c.banned for c in sim.world.clients)
    assert 0.4 < s["wrong_results"] / s["jobs_by_cheaters"] < 0.6
    assert s["wrong_delivered"] == s["wrong_results"] == sum(j.wrong for j in sim.results.jobs) > 100
    assert s["paid_for_wrong_nanoton"] == 1000 * s["wrong_results"]  # price x units (1), each one
    assert s["paid_to_cheaters_nanoton"] == 1000 * s["jobs_by_cheaters"]
    assert s["wrong_paid_share"] == pytest.approx(s["paid_for_wrong_nanoton"] / s["paid_total_nanoton"])


@pytest.mark.parametrize("verify_cost", [1.0, 0.08])
def test_checking_every_result_catches_every_wrong_one_and_bans_at_the_first(verify_cost: float) -> None:
    sim = cheat_run({"share": 0.125, "rate": 0.5, "check_rate": 1.0, "verify_cost": verify_cost})
    s, jobs = sim.results.summary()["cheat"], sim.results.jobs
    (cheater,) = [w for w in sim.world.workers if w.cheats]  # one: no lying checker to cover for it
    assert s["wrong_results"] > 0 and s["wrong_caught"] == s["wrong_results"] and s["wrong_delivered"] == 0
    assert s["paid_for_wrong_nanoton"] == 0 and not any(j.wrong for j in jobs)
    assert s["cheaters_detected"] == 1 and s["false_alarms"] == s["honest_condemned_by_lies"] == 0
    bans = sim.cheating.bans[cheater.idx]
    caught_at = sim.cheating.detected[cheater.idx][1]
    assert set(bans) == {c.idx for c in sim.world.clients}  # every client: itself, or by the proof
    assert min(bans.values()) == caught_at and 0 < s["network_ban_s_max"] < 1.0  # gossip: well under a second
    assert s["network_bans_incomplete"] == 0
    for j in jobs:  # no client sent it a job after banning it
        assert j.worker != cheater.idx or j.issued < bans[j.client]
    # Caught at its first wrong result (or, re-running, earlier as a lying reference), or at one it returned
    # while that one's check ran (at most a queue's worth: capacity 8).
    assert 1 <= s["jobs_to_detection"][0] <= sim.cheating.first_lie[cheater.idx] + 8


@pytest.mark.parametrize(("false_alarm", "expect_alarms"), [(0.0, False), (0.1, True)])
def test_honest_results_never_fail_a_check_unless_noise_says_so(false_alarm: float, expect_alarms: bool) -> None:
    sim = cheat_run({"check_rate": 0.5, "verify_cost": 1.0, "honest_false_alarm": false_alarm})
    s = sim.results.summary()["cheat"]
    assert (s["false_alarms"] > 0) is expect_alarms
    assert any(c.banned for c in sim.world.clients) is expect_alarms
    assert s["honest_condemned_by_lies"] == 0 and s["wrong_caught"] == 0


def test_cheating_runs_are_deterministic() -> None:
    cheat = {"share": 0.25, "rate": 0.2, "check_rate": 0.1}
    a, b = cheat_run(cheat), cheat_run(cheat)
    assert _figures(a.results) == _figures(b.results) and a.cheating.bans == b.cheating.bans
    assert [(j.issued, j.worker, j.verdict, j.wrong) for j in a.results.jobs] == [
        (j.issued, j.worker, j.verdict, j.wrong) for j in b.results.jobs
    ]


def test_cheat_settings_are_checked() -> None:
    for bad in ({"share": 1.5}, {"rate": -0.1}, {"check_rate": 2}, {"verify_cost": 0}, {"verify_cost": 1.5},
                {"proof_trust_share": "all"}, {"honest_false_alarm": True}):  # fmt: skip
        with pytest.raises(ScenarioError, match="cheat"):
            from_dict(small(cheat=bad))
    with pytest.raises(ScenarioError, match="unknown keys"):
        from_dict(small(cheat={"check": 0.5}))
    sc = load(SCENARIOS / "cheat.toml", ["cheat.check_rate=0.25"])
    assert (sc.cheat.check_rate, sc.cheat.verify_cost, sc.cheat.proof_trust_share) == (0.25, 0.08, 1.0)
    with pytest.raises(ScenarioError, match="model fidelity only"):
        run_emulation(sc)  # refused before any process starts
