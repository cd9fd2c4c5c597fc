"""The simulator at scale (issue 22): the indexes change no decision (a digest recorded from
the code before them), the mesh's graph and sampled delays, and the sampled view's odds are
the router's."""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cocoon_p2p.simulations.gossip import Mesh
from cocoon_p2p.simulations.latency import Latency
from cocoon_p2p.simulations.model import ModelSim
from cocoon_p2p.simulations.results import JobRecord
from cocoon_p2p.simulations.scenario import Gossip, Network, ScenarioError, from_dict, load
from cocoon_p2p.simulations.world import SimJob
from scipy.sparse import csr_matrix

from cocoon_p2p.jobs.attempts import JobAttempts
from cocoon_p2p.jobs.routing import DEFAULT_JOB_S, WorkerEstimate

SCALE = Path(__file__).resolve().parent.parent / "simulations" / "scenarios" / "scale.toml"
THOUSAND = ["network.relays=770", "workers.count=30", "clients.count=200"]


def digest(r: Any) -> str:
    """Every job's outcome, every lookup and every sample: what a run decided."""
    h = hashlib.sha256()
    for j in r.jobs:
        row = (j.issued, j.client, j.counted, j.ok, j.latency_s, j.attempts, j.worker, j.cost, j.code)
        h.update(repr(row).encode())
    for lk in r.lookups:
        h.update(repr(sorted(lk.items())).encode())
    for s in r.samples:
        h.update(repr(sorted(s.items())).encode())
    return h.hexdigest()[:16]


# Recorded by the same digest from the simulator at commit 20ef381 (before the indexes of
# issue 22), run from a git worktree of it: scale.toml at 1,000 peers, 20 minutes virtual.
BEFORE_INDEXES = "cc8c7bf71e4f96f3"


def test_a_thousand_peers_decide_exactly_as_before_the_indexes() -> None:
    sc = load(SCALE, [*THOUSAND, "duration_s=1200"])
    assert sc.peers == 1000 and not sc.scale.sampled(30)  # 30 workers: the full view
    r = ModelSim(sc).run()
    assert r.extra["view"] == "full"
    assert digest(r) == BEFORE_INDEXES


def test_the_mesh_graph_is_the_links_and_follows_them() -> None:
    online = [True] * 300
    mesh = Mesh(300, Gossip(), random.Random(3), Latency(Network(), random.Random(4)), online)
    mesh.build()
    rows, cols, vals = zip(*((p, q, d) for p in range(300) for q, d in mesh.adj[p].items()), strict=True)
    reference = csr_matrix((vals, (rows, cols)), shape=(300, 300))  # how it was built before: from COO
    assert (mesh.graph() != reference).nnz == 0
    built = mesh.graph()
    assert mesh.graph() is built  # no link changed: not rebuilt
    mesh.leave(7)
    assert mesh.graph() is not built and mesh.graph()[7].nnz == 0


def test_sampled_delays_are_exact_rows_of_proxies_and_change_with_the_epoch() -> None:
    online = [True] * 400
    mesh = Mesh(400, Gossip(epoch_s=60), random.Random(5), Latency(Network(), random.Random(6)), online)
    mesh.build()
    d = [mesh.delay(w, c, 0.0, 4) for w, c in itertools.product(range(8), range(100, 140))]
    assert all(0 <= x < math.inf for x in d) and sum(x > 0 for x in d) >= len(d) - 8  # 0: the proxy itself
    proxies = list(mesh._proxies)
    exact = mesh.delays_from(proxies, 0.0)
    assert mesh.delay(5, 123, 0.0, 4) == exact[proxies[5 % 4]][123]
    assert mesh.delay(5, 123, 30.0, 4) == exact[proxies[5 % 4]][123]  # same epoch, no link changed
    online[proxies[0]] = False
    mesh.leave(proxies[0])
    mesh.delay(0, 1, 61.0, 4)  # links changed and the epoch is over: new proxies
    assert mesh.version == 1


def test_the_sampled_view_draws_with_the_routers_odds() -> None:
    """First candidates drawn by rejection against the weights the router samples with."""
    sc = load(SCALE, [*THOUSAND, "duration_s=40", "warmup_s=5", "churn.fraction=0", "scale.view=sampled"])
    sim = ModelSim(sc)
    sim.run()
    view, world = sim.jobs.view, sim.world
    assert view is not None and world.sampled
    c = world.clients[0]
    fast, slow, cool = (w.ident.peer_id for w in world.workers[:3])
    c.router.estimates = {fast: WorkerEstimate(avg_job_s=DEFAULT_JOB_S / 4), slow: WorkerEstimate(avg_job_s=0.5),
                          cool: WorkerEstimate(avoid_until=1e9)}  # fmt: skip
    view.learned(c, fast)
    job = SimJob(JobRecord(0.0, c.idx, False), c, 1e9, JobAttempts(c.router, max_price=10**9))
    firsts: Counter[bytes] = Counter()
    for _ in range(6000):
        picked = view.candidates(c, job, weighted=True)
        assert picked is not None and len(picked) == 2 and picked[0].peer_id != picked[1].peer_id
        assert cool not in {o.peer_id for o in picked}  # cooling down: not eligible
        firsts[picked[0].peer_id] += 1
    others = 30 - 3  # workers at the default weight 1 / DEFAULT_JOB_S
    total = others / DEFAULT_JOB_S + 4 / DEFAULT_JOB_S + 1 / 0.5
    for peer, weight in ((fast, 4 / DEFAULT_JOB_S), (slow, 1 / 0.5)):
        expect = 6000 * weight / total
        assert abs(firsts[peer] - expect) < 5 * math.sqrt(expect)  # within 5 sigma
    assert len(firsts) == 29  # every eligible worker turns up


def test_a_sampled_run_is_deterministic_and_agrees_with_the_full_view() -> None:
    over = [*THOUSAND, "duration_s=600"]
    full = ModelSim(load(SCALE, over)).run().summary()
    a = ModelSim(load(SCALE, [*over, "scale.view=sampled"])).run()
    b = ModelSim(load(SCALE, [*over, "scale.view=sampled"])).run()
    assert digest(a) == digest(b) and a.extra["view"] == "sampled"
    s = a.summary()
    assert s["success"] > 0.99 and full["success"] > 0.99
    assert s["latency_s_p50"] == pytest.approx(full["latency_s_p50"], rel=0.1)
    assert s["lookup_hops_mean"] == pytest.approx(full["lookup_hops_mean"], rel=0.15)


@pytest.mark.parametrize(
    ("scale", "problem"),
    [
        ({"view": "some"}, "scale.view"),
        ({"delay_sources": 0}, "delay_sources"),
        ({"lookup_records": 0}, "lookup"),
        ({"epoch_s": 0}, "epoch_s"),
    ],  # fmt: skip
)
def test_scale_settings_are_checked(scale: dict[str, Any], problem: str) -> None:
    with pytest.raises(ScenarioError, match=problem):
        from_dict({"scale": scale})


def test_the_k_closest_contacts_are_those_a_full_sort_of_the_table_gives() -> None:
    from cocoon_p2p.simulations.events import EventQueue
    from cocoon_p2p.simulations.kademlia import Kademlia
    from cocoon_p2p.simulations.scenario import Dht

    rng = random.Random(5)
    online = [rng.random() < 0.9 for _ in range(3000)]
    cfg = Dht(k=8)
    kad = Kademlia(len(online), cfg, random.Random(6), Latency(Network(), random.Random(7)), EventQueue(), online)
    for node in rng.sample(range(len(online)), 60):
        table = kad.table(node)
        assert node not in table and len(table) == len(set(table))
        assert all(len([p for p in table if (kad.ids[p] ^ kad.ids[node]).bit_length() == b + 1]) <= cfg.k
                   for b in range(cfg.id_bits))  # fmt: skip
        targets = [rng.getrandbits(cfg.id_bits), kad.ids[node], kad.ids[rng.choice(table)] ^ 1, kad.ids[node] ^ 3]
        for target, n in itertools.product(targets, (1, cfg.k, 3 * cfg.k)):
            want = sorted(table, key=lambda p: kad.ids[p] ^ target)[:n]
            assert kad.closest(node, target, n) == want


@pytest.mark.parametrize(("bad", "problem"), [({"capacity": 0}, "capacity"), ({"max_wait_s": -1}, "max_wait_s")])
def test_worker_admission_settings_are_checked(bad: dict[str, Any], problem: str) -> None:
    with pytest.raises(ScenarioError, match=problem):
        from_dict({"workers": [bad], "clients": [{}]})


def test_workers_that_refuse_a_long_wait_turn_the_herd_to_free_ones() -> None:
    """Experiment (g): with ``workers.max_wait_s`` a worker answers busy while one more job
    would wait past it; the client retries elsewhere, and the slow GPUs' queues stop setting
    the tail (a fixed seed: the same runs every time)."""
    routing = SCALE.parent / "routing.toml"
    over = ["duration_s=60", "warmup_s=10", "load.target=0.8"]
    plain = ModelSim(load(routing, over)).run().summary()
    bounded = ModelSim(load(routing, [*over, "workers.max_wait_s=0.5"])).run().summary()
    assert plain["attempts_mean"] == 1.0 and bounded["attempts_mean"] > 1.05  # refusals, retried
    assert bounded["success"] == plain["success"] == 1.0
    assert bounded["latency_s_p99"] < 0.75 * plain["latency_s_p99"]


def test_the_large_network_experiment_reports_each_size_and_draws_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cocoon_p2p.simulations import experiments_scale

    monkeypatch.setattr(experiments_scale, "LARGE_PEERS", (300, 600))
    rows = experiments_scale.large(tmp_path, 2)
    assert sorted(rows) == ["300 cocoon", "300 oracle-wait", "600 cocoon", "600 oracle-wait"]
    for row in rows.values():
        assert row["jobs"] > 100 and row["success"] > 0.95 and row["lookup_hops_mean"] >= 1
        assert row["latency_s_p99"] > row["latency_s_p50"] > 5  # 10 s jobs at 80% load
        cov = row["announcement_coverage"]
        assert 0 < cov["0.05s"] <= cov["2.0s"] <= 1
    assert (tmp_path / "large_network.png").stat().st_size > 10_000
