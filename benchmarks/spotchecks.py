"""Spot checks between real peers: false alarms over honest jobs, and how long a cheater lasts.
``python -m benchmarks.spotchecks [--quick] [--out FILE]``.

Three workers, each a :class:`~cocoon_p2p.node.Node` in a process of its own
(:mod:`benchmarks.spotcheck_net`; onnxruntime at one thread), and clients with spot checks,
Nodes in this process; all on 127.0.0.1 over Noise, without payments (a check's verdict
does not depend on them).

* False alarms: a client checks every job (rate 1.0). Embeddings (MiniLM, 1..8 texts per
  job, lanes in parallel so workers batch jobs together) are re-run on another worker; we
  read both runs' outputs and keep the lowest cosine. Generations (SmolLM2, greedy) are
  checked by a verify job on another worker. Goal: no check fails.
* Time to catch: the third worker is replaced by one that lies on 10% of its model runs
  (:class:`~cocoon_p2p.testing.cheating.CheatingBackend`; one short text per job, so a run
  is a job, or a batch of jobs of clients running at once: each job still wrong with odds
  0.1). For each check rate r, replicates, each with a fresh client (a new PeerId: a ban
  does not carry over), send jobs one at a time until the cheater is banned. We count
  the cheater's runs for that client: routed to it, and as the reference of a check of an
  honest worker's job, which catches it as well. The analytic median ln2 / (0.1 r) counts
  routed jobs checked at rate r and nothing else.

Each phase stops early at its time budget (a busy machine) and says how far it got.
Prints a table, writes benchmarks/results/spotchecks.json and a plot beside it (.png).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import trio

from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2
from cocoon_p2p.execution.generation import chatml_prompt
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import to_numpy
from cocoon_p2p.execution.verification import cosine_agreement
from cocoon_p2p.jobs.spotcheck import SpotCheckPolicy
from cocoon_p2p.transport.host import quiet_libp2p_logs

from .runmeta import run_meta
from .spotcheck_net import PRICE, LoopLag, Network, check_counters, open_client, open_network, warm_verifiers
from .verification import OBJECTS, PROMPTS, SUBJECTS, TAILS, VERBS, _sentences

OUT = Path(__file__).parent / "results" / "spotchecks.json"
VERIFICATION = Path(__file__).parent / "results" / "verification.json"
RATES = (0.02, 0.05, 0.07, 0.1, 0.25)
CHEAT_RATE = 0.10
WORKERS = 3
GEN_TOKENS = 32
TARGET_JOBS = 100  # the goal: a cheater caught within this many of its jobs (median)


@dataclass(frozen=True)
class Settings:
    """How much of each phase to run; a phase starts no new job past its budget."""

    emb_jobs: int = 10_000
    emb_budget_s: float = 330.0  # 10,000 jobs take ~35 min on 2 loaded cores: see --budget-s
    emb_lanes: int = 4
    gen_min: int = 200
    gen_budget_s: float = 180.0  # as many as fit, but at least gen_min ...
    gen_max_s: float = 420.0  # ... unless that takes longer than this
    gen_lanes: int = 3
    replicates: int = 20
    catch_budget_s: float = 330.0  # no replicate starts after this ...
    catch_grace_s: float = 45.0  # ... and those still running then stop this much later, censored
    catch_lanes: int = 4
    max_client_jobs: int = 6000  # a replicate that has not caught the cheater by then is censored


# The smallest end-to-end run (the test's): budgets cut the phases short on a busy machine.
QUICK = Settings(
    emb_jobs=300,
    emb_budget_s=10,
    gen_min=20,
    gen_budget_s=0,
    gen_max_s=10,
    gen_lanes=2,
    replicates=1,
    catch_budget_s=3,
    catch_grace_s=7,
    catch_lanes=5,
    max_client_jobs=150,
)
STARTED = time.perf_counter()


def _say(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {msg}", file=sys.stderr, flush=True)


def _short_text(rng: random.Random) -> str:
    """One clause (~10 tokens): the cheapest honest job, for the many jobs of the catch runs."""
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}".strip() + "."


async def bench_honest_embeddings(net: Network, spec: ModelSpec, s: Settings) -> dict[str, Any]:
    """Honest jobs of 1..8 texts, every one re-run on another worker; the lowest cosine."""
    async with open_client(net, spec.model_id, rate=1.0, seed=18) as (client, log):
        cosines: list[float] = []
        texts_total = started = 0
        t0 = time.perf_counter()

        async def lane(i: int) -> None:
            nonlocal texts_total, started
            rng = random.Random(1000 + i)
            while started < s.emb_jobs and time.perf_counter() - t0 < s.emb_budget_s:
                started += 1
                texts = tuple(_sentences(rng.randint(1, 8), rng))
                await client.infer(spec.model_id, texts=texts, max_price_nanoton=PRICE, timeout_s=300)
                runs = [to_numpy(r.outputs[0]) for r, _ in log.by_request.pop(id(texts))]
                cosines.extend(float(cosine_agreement(runs[0], other).min()) for other in runs[1:])
                texts_total += len(texts)
                if len(cosines) % 500 == 0:
                    _say(f"  embeddings: {len(cosines)} checked in {time.perf_counter() - t0:.0f} s")

        async with trio.open_nursery() as nursery:
            for i in range(s.emb_lanes):
                nursery.start_soon(lane, i)
        wall = time.perf_counter() - t0
        return {
            "jobs": started,
            "texts": texts_total,
            **check_counters(client, net.serving(spec.model_id)),
            "compared": len(cosines),
            "failed_runs": log.failed_runs(net),
            "min_cosine": min(cosines),
            "cosine_min_policy": SpotCheckPolicy().cosine_min,
            "false_alarm_rate_95_upper": round(3 / len(cosines), 6),  # the rule of three, for 0 failures
            "wall_s": round(wall, 1),
            "jobs_per_s": round(started / wall, 2),
            "lanes": s.emb_lanes,
        }


async def bench_honest_generation(net: Network, spec: ModelSpec, s: Settings) -> dict[str, Any]:
    """Greedy generations, each checked by a verify job on another worker."""
    async with open_client(net, spec.model_id, rate=1.0, seed=19) as (client, log):
        assert client.job_client is not None
        infer = client.job_client.infer
        verdicts: Counter[str] = Counter()
        ratios: list[float] = []
        t0 = time.perf_counter()
        started = 0

        def more() -> bool:
            elapsed = time.perf_counter() - t0
            return (started < s.gen_min or elapsed < s.gen_budget_s) and elapsed < s.gen_max_s

        async def lane(i: int) -> None:
            nonlocal started
            rng = random.Random(2000 + i)
            while more():
                started += 1
                p, text = rng.choice(PROMPTS), _sentences(1, rng)[0]
                ask = rng.choice([p, f"{p} Keep it short.", f"Rewrite this sentence more formally: {text}"])
                texts = (chatml_prompt([{"role": "user", "content": ask}]),)
                r = await infer(spec.model_id, texts=texts, max_tokens=GEN_TOKENS, max_price=PRICE, timeout_s=600)
                verdicts[{True: "agreed", False: "wrong", None: "not checked"}[r.verified]] += 1
                runs = log.by_request.pop(id(texts))
                gen = [res.compute_us for res, verify in runs if not verify]
                ver = [res.compute_us for res, verify in runs if verify]
                if gen and ver and len(r.token_ids) == GEN_TOKENS:
                    ratios.append(ver[0] / gen[0])
                if sum(verdicts.values()) % 20 == 0:
                    _say(f"  generation: {sum(verdicts.values())} checked in {time.perf_counter() - t0:.0f} s")

        async with trio.open_nursery() as nursery:
            for i in range(s.gen_lanes):
                nursery.start_soon(lane, i)
        wall = time.perf_counter() - t0
        return {
            "generations": started,
            "max_tokens": GEN_TOKENS,
            **check_counters(client, net.serving(spec.model_id)),
            "verdicts": dict(verdicts),
            "failed_runs": log.failed_runs(net),
            # worker wall time of the verify job over the generation's, under concurrency
            "verify_vs_generate_median": round(statistics.median(ratios), 4) if ratios else None,
            "wall_s": round(wall, 1),
            "generations_per_s": round(started / wall, 3),
            "lanes": s.gen_lanes,
        }


async def catch_once(
    net: Network, spec: ModelSpec, rate: float, seed: int, max_jobs: int, stop_at: float
) -> dict[str, Any]:
    """One replicate: a fresh client sends one-text jobs, one at a time, until a spot check
    finds the cheater wrong, which bans it (censored: ``max_jobs`` or trio time ``stop_at``
    came first)."""
    cheater = net.cheater
    assert cheater is not None
    async with open_client(net, spec.model_id, rate=rate, seed=seed) as (client, log):
        rng = random.Random(seed)
        jobs = 0
        with trio.move_on_at(stop_at):
            while cheater not in log.condemned and jobs < max_jobs:
                texts = (_short_text(rng),)
                await client.infer(spec.model_id, texts=texts, max_price_nanoton=PRICE, timeout_s=120)
                log.by_request.pop(id(texts), None)
                jobs += 1
        assert client.job_client is not None
        routed = client.job_client.router.estimates.get(cheater)
        return {
            "rate": rate,
            "seed": seed,
            "caught": cheater in log.condemned,  # by a spot check: banned, unpaid, reported
            "banned": client.guard.is_banned(cheater),
            "honest_condemned": sum(p != cheater for p in log.condemned),
            "client_jobs": jobs,
            "cheater_jobs": log.per_worker[cheater],
            "cheater_routed_jobs": routed.jobs_ok if routed else 0,
            "failed_runs": log.failed_runs(net),
            **check_counters(client, [p for p in net.serving(spec.model_id) if p != cheater]),
        }


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside nested exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def analytic_with_references(rate: float, routed_share: float) -> float:
    """Median cheater jobs until caught when a check of an honest worker's job picks the
    cheater as its reference half the time (two others) and so catches it too: per client
    job it is caught with q = 0.1 r (f + (1 - f) / 2) and serves f + (1 - f) r / 2 jobs."""
    f = routed_share
    return math.log(2) / (CHEAT_RATE * rate * (f + (1 - f) / 2)) * (f + (1 - f) * rate / 2)


async def bench_catch(net: Network, spec: ModelSpec, s: Settings, gen_ratio: float | None) -> dict[str, Any]:
    """Replicates round-robin over the rates (slowest first), ``s.catch_lanes`` at a time."""
    queue = [(rate, 1000 * k + rep) for rep in range(s.replicates) for k, rate in enumerate(RATES)]
    reps: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    stop_at = trio.current_time() + s.catch_budget_s + s.catch_grace_s

    async def lane() -> None:
        while queue and time.perf_counter() - t0 < s.catch_budget_s:
            rate, seed = queue.pop(0)
            try:
                r = await catch_once(net, spec, rate, seed, s.max_client_jobs, stop_at)
            except Exception as exc:  # a client node that broke ends its replicate, not the run
                reps.append({"rate": rate, "seed": seed, "error": repr(_leaf(exc))[:300]})
                _say(f"  r={rate}: replicate {seed} failed: {reps[-1]['error']}")
                continue
            reps.append(r)
            _say(f"  r={rate}: the cheater served {r['cheater_jobs']} of {r['client_jobs']} jobs [{len(reps)} done]")

    async with trio.open_nursery() as nursery:
        for _ in range(s.catch_lanes):
            nursery.start_soon(lane)
    rows = []
    for rate in RATES:
        mine = [r for r in reps if r["rate"] == rate and "error" not in r]
        if not mine:
            continue
        served, routed = [r["cheater_jobs"] for r in mine], [r["cheater_routed_jobs"] for r in mine]
        share = sum(routed) / max(1, sum(r["client_jobs"] for r in mine))
        median, p90 = statistics.median(served), percentile(served, 90)
        # A censored replicate's count is a lower bound: so is a figure it does not exceed.
        bound = [
            min((r["cheater_jobs"] for r in mine if not r["caught"]), default=math.inf) <= x for x in (median, p90)
        ]
        rows.append(
            {
                "rate": rate,
                "replicates": len(mine),
                "censored": sum(not r["caught"] for r in mine),
                "median": median,
                "p90": p90,
                "median_is_lower_bound": bound[0],
                "p90_is_lower_bound": bound[1],
                "median_routed": statistics.median(routed),
                "analytic_median": round(math.log(2) / (rate * CHEAT_RATE), 1),
                "analytic_median_with_references": round(analytic_with_references(rate, share), 1),
                "routed_share": round(share, 3),
                "client_jobs_median": statistics.median(r["client_jobs"] for r in mine),
                "added_compute_embeddings": rate,
                "added_compute_generation": round(rate * gen_ratio, 5) if gen_ratio is not None else None,
                "honest_banned": sum(r["honest_banned"] for r in mine),
                "honest_condemned": sum(r["honest_condemned"] for r in mine),
                "errors": sum(r["rate"] == rate and "error" in r for r in reps),
            }
        )
    keys = ("rate", "median", "analytic_median", "added_compute_embeddings", "added_compute_generation")
    within = [row for row in rows if row["median"] <= TARGET_JOBS and not row["median_is_lower_bound"]]
    measured = next(({k: row[k] for k in keys} for row in within), None)
    analytic = next(({k: row[k] for k in keys} for row in rows if row["analytic_median"] <= TARGET_JOBS), None)
    return {
        "cheat_rate": CHEAT_RATE,
        "wall_s": round(time.perf_counter() - t0, 1),
        "by_rate": rows,
        "smallest_rate_median_within_100": measured,
        "smallest_rate_analytic_within_100": analytic,
        "replicate_runs": sorted(reps, key=lambda r: (r["rate"], r["seed"])),
    }


def _verify_ratio(measured: float | None) -> dict[str, Any]:
    """The verify/generate cost ratio: the verification benchmark's (128 tokens, one thread,
    alone) when there is one, else the one measured here."""
    try:
        gen = json.loads(VERIFICATION.read_text())["results"]["generation"]
        return {"value": float(gen["threads_1"]["cost_ratio_median"]), "source": VERIFICATION.name}
    except (OSError, KeyError, TypeError, ValueError):
        return {"value": measured, "source": "measured here (32 tokens, under concurrency)"}


async def run(s: Settings) -> dict[str, Any]:
    minilm, smollm = ensure_minilm(), ensure_smollm2()  # exported before any worker loads them
    lag = LoopLag()
    out: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.watch)
        async with open_network() as net:
            async with trio.open_nursery() as starting:  # the others join through the first
                for _ in range(WORKERS):
                    starting.start_soon(partial(net.start, [minilm, smollm]))
            _say(f"honest embeddings: {s.emb_jobs} jobs, all checked ...")
            async with trio.open_nursery() as both:  # the first verify job builds a worker's verifier
                both.start_soon(warm_verifiers, net, smollm)
                out["honest_embeddings"] = await bench_honest_embeddings(net, minilm, s)
            _say("honest generations, all checked by verify jobs (the cheater starts meanwhile) ...")
            async with trio.open_nursery() as both:  # it serves MiniLM only: no generation job reaches it
                both.start_soon(partial(net.start, [minilm], cheat_rate=CHEAT_RATE))
                out["honest_generation"] = await bench_honest_generation(net, smollm, s)
            out["verify_cost_ratio"] = ratio = _verify_ratio(out["honest_generation"]["verify_vs_generate_median"])
            # the cheater replaces an honest worker other than the bootstrap peer
            await net.stop(next(w.peer for w in net.workers if w.addr != net.bootstrap and w.peer != net.cheater))
            _say(f"time to catch: up to {s.replicates} replicates x rates {RATES} ...")
            out["catch"] = await bench_catch(net, minilm, s, ratio["value"])
        out["workers_said"] = net.final  # the cheater's own count of its lies among them
        nursery.cancel_scope.cancel()
    out["client_loop_lag"] = asdict(lag)
    return out


def _table(res: dict[str, Any]) -> None:
    emb, gen, catch, ratio = res["honest_embeddings"], res["honest_generation"], res["catch"], res["verify_cost_ratio"]
    print(f"\n{'false alarms':34} {'value':>12}  note")
    for name, value, note in [
        ("embedding jobs, all checked", emb["checks"], f"{emb['texts']} texts, {emb['lanes']} lanes"),
        ("  failed / skipped", f"{emb['failed']} / {emb['skipped']}", "goal 0"),
        ("  1 - min cosine, two workers", 1.0 - emb["min_cosine"], f"policy: 1 - {emb['cosine_min_policy']}"),
        ("  wall s / jobs per s", f"{emb['wall_s']} / {emb['jobs_per_s']}", ""),
        ("generations, all verified", gen["checks"], f"{gen['max_tokens']} tokens, {gen['lanes']} lanes"),
        ("  failed / skipped", f"{gen['failed']} / {gen['skipped']}", "goal 0"),
        ("  verify / generate", gen["verify_vs_generate_median"], "worker wall time, in network"),
        ("  wall s", gen["wall_s"], ""),
        ("honest workers banned", emb["honest_banned"] + gen["honest_banned"], "goal 0"),
    ]:
        shown = f"{value:12.4g}" if isinstance(value, float) else f"{value!s:>12}"
        print(f"{name:34} {shown}  {note}")
    print(f"\ncheater's jobs until banned (it lies on {catch['cheat_rate']:.0%}; verify cost {ratio['value']})")
    heads = ("r", 5), ("reps", 4), ("median", 7), ("p90", 5), ("routed", 6), ("ln2/0.1r", 8), ("w/ refs", 7)
    print(" ".join(f"{h:>{w}}" for h, w in heads), f"{'+emb':>5} {'+gen':>6}")
    for row in catch["by_rate"]:
        g = row["added_compute_generation"]
        print(
            f"{row['rate']:5} {row['replicates']:4} {_shown(row, 'median'):>7} {_shown(row, 'p90'):>5} "
            f"{row['median_routed']:6} "
            f"{row['analytic_median']:8} {row['analytic_median_with_references']:7} "
            f"{row['added_compute_embeddings']:5.0%} {'' if g is None else f'{g:6.2%}'}"
        )
    print(f"smallest r with median <= {TARGET_JOBS}: measured {catch['smallest_rate_median_within_100']}")
    print(f"{'':29}analytic {catch['smallest_rate_analytic_within_100']}")


def _shown(row: dict[str, Any], key: str) -> str:
    return f"{'>=' if row[f'{key}_is_lower_bound'] else ''}{row[key]:g}"


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["catch"]["by_rate"]
    rates = np.array([row["rate"] for row in rows])
    med, p90 = (np.array([row[k] for row in rows], dtype=float) for k in ("median", "p90"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar(rates, med, yerr=[np.zeros_like(med), p90 - med], fmt="o", capsize=4, label="measured median (to p90)")
    bound = [row["median_is_lower_bound"] for row in rows]
    if any(bound):  # censored replicates: the median is at least this
        ax.plot(rates[bound], med[bound], "^", ms=11, mfc="none", color="C0", label="a lower bound (censored)")
    ax.plot(rates, [row["median_routed"] for row in rows], "s", mfc="none", label="measured, routed jobs only")
    grid = np.linspace(0.015, 0.3, 200)
    ax.plot(grid, np.log(2) / (grid * CHEAT_RATE), label="analytic ln2 / (0.1 r)")
    share = statistics.mean(row["routed_share"] for row in rows) if rows else 1 / WORKERS
    ax.plot(grid, [analytic_with_references(r, share) for r in grid], "--", label="analytic, checks land on it too")
    ax.axhline(TARGET_JOBS, color="grey", ls=":", label=f"{TARGET_JOBS} jobs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(RATES), [f"{r:g}" for r in RATES])
    ax.minorticks_off()
    ax.set_xlabel("check rate r")
    ax.set_ylabel("cheater's jobs until banned")
    ax.set_title(f"A worker wrong on {CHEAT_RATE:.0%} of its jobs, among {WORKERS}; a fresh client per replicate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.spotchecks")
    ap.add_argument("--quick", action="store_true", help="300 embeddings, 20 generations, 1 replicate per rate")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--budget-s", type=float, help="the embedding and catch phases' budgets (default 330 s each)")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.budget_s is not None:  # e.g. 3600 on a quiet machine: the full 10,000 jobs and 20 replicates
        s = replace(s, emb_budget_s=args.budget_s, catch_budget_s=args.budget_s)
    quiet_libp2p_logs()
    started = time.perf_counter()
    results = trio.run(run, s)
    meta = {
        **run_meta(),
        "quick": args.quick,
        "settings": asdict(s),
        "seconds": round(time.perf_counter() - started, 1),
    }
    _table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    _plot(results, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    honest = results["honest_embeddings"], results["honest_generation"]
    return 0 if all(p["failed"] == 0 and p["honest_banned"] == 0 for p in honest) else 1


if __name__ == "__main__":
    sys.exit(main())
