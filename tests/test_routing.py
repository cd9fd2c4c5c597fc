"""Router: price cap, least expected wait, power of two choices, cool-down after failure."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.jobs.routing import Router

from .helpers import worker_offer as offer


def test_price_cap_and_exclusion() -> None:
    r = Router(rng=random.Random(1))
    offers = [offer(1, price=10), offer(2, price=3)]
    assert r.choose(offers, max_price=5, now=0).peer_id == offer(2).peer_id  # type: ignore[union-attr]
    assert r.choose(offers, max_price=5, now=0, exclude=frozenset({offer(2).peer_id})) is None


def test_prefers_less_loaded_and_faster_workers() -> None:
    r = Router(rng=random.Random(1))
    slow, fast = offer(1), offer(2)
    for _ in range(20):
        r.started(slow.peer_id)
        r.finished(slow.peer_id, 0.5)
        r.started(fast.peer_id)
        r.finished(fast.peer_id, 0.01)
    assert r.choose([slow, fast], max_price=1, now=0) == fast
    busy = offer(3, running=10)
    idle = offer(4, running=0)
    assert r.choose([busy, idle], max_price=1, now=0) == idle


def test_two_choices_spread_load_over_equal_workers() -> None:
    r = Router(rng=random.Random(7))
    offers = [offer(i) for i in range(1, 9)]
    picks: Counter[bytes] = Counter()
    for _ in range(800):  # jobs pile up (never finish): load must spread evenly
        o = r.choose(offers, max_price=1, now=0)
        assert o is not None
        r.started(o.peer_id)
        picks[o.peer_id] += 1
    assert max(picks.values()) - min(picks.values()) <= 3


def test_failed_worker_cools_down() -> None:
    r = Router(rng=random.Random(1))
    a, b = offer(1), offer(2)
    r.started(a.peer_id)
    r.failed(a.peer_id, now=10.0)
    assert all(r.choose([a, b], max_price=1, now=11.0) == b for _ in range(10))
    assert r.choose([a], max_price=1, now=11.0) == a  # the only one: better than none
    assert {r.choose([a, b], max_price=1, now=20.0) for _ in range(30)} == {a, b}


def test_learns_compute_time_and_samples_slow_workers_less() -> None:
    r = Router(rng=random.Random(3))
    fast, slow = offer(1), offer(2)
    for _ in range(30):  # the fast worker is busy (long waits) but computes quickly
        r.started(fast.peer_id)
        r.finished(fast.peer_id, elapsed_s=2.0, service_s=0.02)
        r.started(slow.peer_id)
        r.finished(slow.peer_id, elapsed_s=0.6, service_s=0.5)
    assert (
        r.estimates[fast.peer_id].avg_job_s < 0.03 < 0.49 < r.estimates[slow.peer_id].avg_job_s
    )  # queueing not learnt
    others = [offer(n) for n in range(3, 8)]  # unknown workers: the default job time
    picks = Counter(o.peer_id for _ in range(3000) for o in r._sample([fast, slow, *others]))
    assert picks[fast.peer_id] > picks[others[0].peer_id] > picks[slow.peer_id]


@pytest.mark.parametrize("choices", [0, -2])
def test_a_router_samples_at_least_one_worker(choices: int) -> None:
    with pytest.raises(ConfigError):
        Router(rng=random.Random(1), choices=choices)


def test_a_large_pool_is_sampled_by_rejection_with_the_weighing_odds() -> None:
    """Above DRAW_ABOVE offers the router draws its sample by rejection instead of weighing
    every offer; the odds of each worker (choices=1: the sample is the choice) are those of
    the weighing, within 5 sigma over 6,000 choices; cooling down and priced-out workers never come."""
    from cocoon_p2p.jobs.routing import DRAW_ABOVE, WorkerEstimate

    n = DRAW_ABOVE + 50
    offers = [offer(i % 250 + 1, price=1 if i % 10 else 99) for i in range(n)]
    offers = [dataclasses.replace(o, peer_id=i.to_bytes(38, "big")) for i, o in enumerate(offers)]
    router = Router(rng=random.Random(7), choices=1)
    for i, o in enumerate(offers[: n // 2]):  # learned: 0.05 .. 1 s a job; the rest unknown
        router.estimates[o.peer_id] = WorkerEstimate(avg_job_s=0.05 + 0.95 * (i % 7) / 6)
    cooling = offers[3].peer_id
    router.estimates[cooling].avoid_until = 100.0
    eligible = [o for o in offers if o.price.highest <= 10 and o.peer_id != cooling]
    weight = {o.peer_id: 1 / router.estimates[o.peer_id].avg_job_s if o.peer_id in router.estimates else 20.0
              for o in eligible}  # fmt: skip
    total = sum(weight.values())
    draws = 6000
    seen = Counter(router.choose(offers, max_price=10, now=1.0).peer_id for _ in range(draws))  # type: ignore[union-attr]
    assert set(seen) <= set(weight)
    for peer, w in weight.items():
        p = w / total
        assert abs(seen[peer] - draws * p) <= 5 * math.sqrt(draws * p * (1 - p)) + 1


def test_a_large_pool_with_one_eligible_worker_still_finds_it() -> None:
    from cocoon_p2p.jobs.routing import DRAW_ABOVE

    offers = [dataclasses.replace(offer(1, price=99), peer_id=i.to_bytes(38, "big")) for i in range(DRAW_ABOVE * 3)]
    offers[-1] = dataclasses.replace(offers[-1], price_nanoton=1)
    router = Router(rng=random.Random(3))
    assert router.choose(offers, max_price=10, now=0.0) is offers[-1]
