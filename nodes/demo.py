"""``cocoon-node demo``: a local network on this machine, start to finish.

A bootstrap peer and N worker processes on 127.0.0.1 serving two real models
(MiniLM embeddings, SmolLM2 chat); a client that discovers every worker through
gossip and through the DHT, then runs M jobs of both models spread over the
workers (chat answers streamed token by token), paying every job by voucher over a
TON payment channel per worker opened on the local chain (@ton/sandbox), then
closes the channels cooperatively on chain and reports what was paid, what the
workers' wallets received, and the fees.

With ``--cheating-worker`` one worker returns wrong results on a share of its model
runs (``cocoon-node worker --cheat-rate``) and the client spot-checks results on
other workers: the demo shows the cheater caught, banned and not paid for what it
was caught on, while every job still gets a right answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.identity import peer_id_from_str, peer_id_to_str
from cocoon_p2p.core.metrics import parse, percentile
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2
from cocoon_p2p.execution.generation import chatml_prompt
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.jobs import InferenceResult, JobFailed
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.jobs.checks import CaughtCheating, CheatReport
from cocoon_p2p.jobs.spotcheck import SpotCheckPolicy
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.payments.chain import read_channel
from cocoon_p2p.payments.channelstate import ChannelState
from cocoon_p2p.payments.payer import Payer
from cocoon_p2p.payments.payerchannel import PayerChannel
from cocoon_p2p.payments.service import PaymentConfig, PaymentService
from cocoon_p2p.payments.settlement import UNINITED, SettlementPolicy
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain
from cocoon_p2p.testing.processes import NODE_CLI, ProcessFailed, start_node, start_process

PRICE_NANOTON = 100_000  # per item / token; worker i asks 10,000 more
MAX_PRICE = 200_000
CLIENT_FUNDS = 10_000_000_000
DEPOSIT = 500_000_000  # per channel
EMBED_TEXTS = [
    ("GPU owners earn Toncoin by running inference.", "Workers are paid per job."),
    ("The overlay finds workers through gossip and the DHT.",),
    ("Every job travels encrypted end to end.", "No central server sees it.", "Noise secures the streams."),
]
CHAT_PROMPTS = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 2 + 2?"]
MIN_WORKERS_WITH_CHEATER = 3  # two results that disagree need a third to tell which one lied
STUCK_CLOSE_TRIES = 3  # asks to close a channel whose close broke off


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a local network and show it working")
    p.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument("--data-dir", type=Path, help="where the peers keep their keys (default: a temp dir)")
    p.add_argument("--jobs", type=int, default=30, help="jobs to run, half embeddings, half chat (default 30)")
    p.add_argument("--concurrency", type=int, default=3, help="jobs in flight at once (default 3)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per chat answer (default 16)")
    p.add_argument(
        "--kill-worker",
        action="store_true",
        help="SIGKILL a worker a third of the way through, restart it at the end, settle with it",
    )
    p.add_argument("--timeout-s", type=float, default=60.0, help="give up discovery after this long")
    p.add_argument("--json", action="store_true", help="print one JSON object as the summary")
    p.add_argument(
        "--realistic-chain",
        action="store_true",
        help="a testnet-like local chain: blocks every 400 ms, rate limits, 2%% of API calls failing",
    )
    p.add_argument(
        "--cheating-worker",
        action="store_true",
        help="the last worker returns wrong results on a share of its model runs; the client spot-checks "
        f"results on other workers, bans it and does not pay it for what it is caught on (needs "
        f">= {MIN_WORKERS_WITH_CHEATER} workers)",
    )
    p.add_argument(
        "--cheat-rate", type=float, default=0.3, help="--cheating-worker: share of its model runs it lies on (0.3)"
    )
    p.add_argument(
        "--spot-check-rate",
        type=float,
        help="share of results the client re-checks on another worker (default 1.0 with --cheating-worker, else 0)",
    )


def _progress(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace, root: Path, chain: LocalChain) -> dict[str, Any]:
    cli = list(NODE_CLI)
    _progress("preparing the models (exported from the installed wheels on first use)")
    models = {"embed": ensure_minilm(progress=_progress), "chat": ensure_smollm2(progress=_progress)}
    builtin = {"embed": "minilm", "chat": "smollm2"}
    cheater = args.workers - 1 if args.cheating_worker else None
    check_rate = args.spot_check_rate if args.spot_check_rate is not None else (1.0 if args.cheating_worker else 0.0)
    procs: list[trio.Process] = []
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        try:
            started = time.perf_counter()
            boot, boot_addrs = await start_process(
                [*cli, "bootstrap", "--data-dir", str(root / "boot"), "--log-level", "WARNING"], nursery
            )
            procs.append(boot)
            _progress(f"bootstrap peer up: {boot_addrs[0]}")
            worker_ids: list[str] = []
            worker_wallets: list[str] = []
            worker_cmds: list[list[str]] = []
            metrics_urls: list[str] = []
            for i in range(args.workers):
                cmd = [
                    *cli,
                    "worker",
                    "--data-dir",
                    str(root / f"worker{i}"),
                    "--bootstrap",
                    boot_addrs[0],
                    "--announce-interval-s",
                    "2",
                    "--price-nanoton",
                    str(PRICE_NANOTON + 10_000 * i),
                    "--capacity",
                    "4",
                    "--chain",
                    chain.endpoint,
                    "--chain-api-key",
                    f"demo-worker-{i}",  # each operator has its own toncenter key, and rate limit
                    "--local-chain",
                    "--metrics",
                    "127.0.0.1:0",
                    "--log-level",
                    "WARNING",
                ]
                for name in models:
                    cmd += ["--model", builtin[name]]
                if i == cheater:
                    cmd += ["--cheat-rate", str(args.cheat_rate)]
                worker = await start_node(cmd, nursery, worker_wallets)
                if i == cheater and "cheating" not in worker.said:
                    raise ProcessFailed(f"worker {i + 1} was told to cheat and did not say it does")
                procs.append(worker.proc)
                worker_cmds.append(cmd)
                metrics_urls.append(worker.said["metrics"].split()[1])
                worker_ids.append(worker.addrs[0].rsplit("/p2p/", 1)[1])
                lies = f" (returns wrong results on {args.cheat_rate:.0%} of its model runs)" if i == cheater else ""
                _progress(f"worker {i + 1}/{args.workers} up: {worker.addrs[0]}{lies}")
            wallet = await trio.to_thread.run_sync(chain.new_wallet, CLIENT_FUNDS)
            payments = PaymentConfig(
                chain, wallet, root / "client-payments", policy=SettlementPolicy(deposit_nanoton=DEPOSIT)
            )
            checks = SpotCheckPolicy(rate=check_rate) if check_rate > 0 else None
            async with Node(NodeConfig(bootstrap=boot_addrs, payments=payments, spot_checks=checks)) as client:
                pay = client.payments
                assert pay is not None and client.job_client is not None
                catches = _Catches.install(client)
                _progress("client joined; discovering workers over gossip and the DHT")
                discovery = await _discover(client, models, args)
                _progress(f"running {args.jobs} jobs (embeddings and chat) spread over the workers, paid by voucher")
                if checks is not None:
                    _progress(f"  {check_rate:.0%} of them spot-checked on another worker before they are paid")
                victim = 1 % args.workers  # procs[0] is the bootstrap peer
                restarted: set[str] = set()

                def kill() -> None:
                    _progress(f"killing worker {victim + 1} (SIGKILL) with jobs in flight")
                    procs[1 + victim].kill()

                await trio.to_thread.run_sync(chain.settle)  # the faucet's top-ups have landed
                before = {w: await trio.to_thread.run_sync(chain.balance, w) for w in worker_wallets}
                seen: dict[str, PayerChannel] = {}  # every channel opened, also those closed early
                async with trio.open_nursery() as follow:
                    follow.start_soon(_follow_channels, pay.payer, seen)
                    jobs = await _jobs(client, models, args, kill if args.kill_worker else None)
                    follow.cancel_scope.cancel()
                if args.kill_worker:
                    _progress(f"restarting worker {victim + 1} from its data directory (same keys and channels)")
                    worker = await start_node(worker_cmds[victim], nursery)
                    procs.append(worker.proc)
                    metrics_urls[victim] = worker.said["metrics"].split()[1]
                    restarted.add(worker_ids[victim])
                    peer = peer_id_from_str(worker_ids[victim])
                    with trio.fail_after(60):  # its new address reaches the client by gossip
                        while worker.addrs[0] not in client.directory.addrs_of(peer):
                            await trio.sleep(0.1)
                await client.flush_payments()  # the vouchers of the last jobs, sent behind their results
                seen.update(pay.payer.channels)
                paid_to = dict.fromkeys(worker_ids, 0)  # by vouchers, over every channel to the worker
                for ch in seen.values():
                    if ch.worker is not None:
                        paid_to[peer_id_to_str(ch.worker)] += ch.issuer.sent
                paid = sum(ch.issuer.sent for ch in seen.values())
                worker_metrics = [await trio.to_thread.run_sync(_scrape, url) for url in metrics_urls]
                banned = [w for w in worker_ids if client.guard.is_banned(peer_id_from_str(w))]
                channels = len(seen)
                current = pay.payer.current  # an opening the kill interrupted is confirmed, then closed
                _progress(f"settling {len(current)} open channel(s) on the local chain (cooperative close)")
                settle_waits = []
                for worker_peer, ch in current.items():
                    t0 = time.perf_counter()
                    try:
                        await pay.settle(worker_peer)
                    except CocoonError as exc:  # reported below among the unsettled
                        _progress(f"channel {ch.address}: could not settle it: {exc}")
                        continue
                    if await _closed_on_chain(chain, ch.address):
                        settle_waits.append(time.perf_counter() - t0)
                unsettled = await _close_the_rest(pay, chain, seen)  # a banned cheater's, closed during the run
                await trio.to_thread.run_sync(chain.settle)  # the payouts have landed
                after = {w: await trio.to_thread.run_sync(chain.balance, w) for w in worker_wallets}
                client_stats = client.job_client.stats
                spot = client.job_client.checks
                fraud_proofs = _metric_value(client, "cocoon_fraud_proofs_sent_total")
            settled = sum(after[w] - before[w] for w in worker_wallets)
            ok_jobs = [j for j in jobs if j["ok"]]
            latencies = sorted(j["latency_ms"] for j in ok_jobs)
            per_worker: dict[str, dict[str, Any]] = {}
            for i, w in enumerate(worker_ids):
                per_worker[w] = _worker_row(
                    w, ok_jobs, paid_to[w], worker_metrics[i], catches, known=w not in restarted
                )
            cheater_id = worker_ids[cheater] if cheater is not None else None
            cheat_ok = cheater_id is None or (
                banned == [cheater_id]
                and spot is not None
                and spot.failed >= 1
                and per_worker[cheater_id]["paid_for_cheated_nanoton"] == 0
            )
            result = {
                "workers": args.workers,
                "worker_ids": worker_ids,
                **discovery,
                "jobs_ok": len(ok_jobs),
                "jobs_failed": len(jobs) - len(ok_jobs),
                "errors": [j["error"] for j in jobs if not j["ok"]][:10],
                "latency_ms_p50": round(percentile(latencies, 50), 1) if latencies else -1.0,
                "latency_ms_p99": round(percentile(latencies, 99), 1) if latencies else -1.0,
                "paid_nanoton": paid,
                "settled_nanoton": settled,
                "fees_nanoton": paid - settled,
                "channels": channels,
                "unsettled_channels": unsettled,
                "killed_worker": worker_ids[1 % args.workers] if args.kill_worker else None,
                # vouchers whose acknowledgement did not come at once (a killed worker's: resent
                # when it is back, or at settlement; the audit of per_worker holds them all)
                "payments_acknowledged_late": client.job_client.payments_late,
                "onchain_ops": pay.onchain_ops,  # deploy + init, then one close, per channel
                "realistic_chain": args.realistic_chain,
                "open_wait_s_p50": _p(pay.payer.open_waits_s, 50),
                "open_wait_s_p99": _p(pay.payer.open_waits_s, 99),
                "settle_wait_s_p50": _p(settle_waits, 50),
                "settle_wait_s_p99": _p(settle_waits, 99),
                "chain_retries": dict(chain.retried),
                "spot_check_rate": check_rate,
                "checks": spot.checks if spot else 0,
                "checks_failed": spot.failed if spot else 0,
                "checks_skipped": spot.skipped if spot else 0,
                "withheld_nanoton": spot.withheld_nanoton if spot else 0,
                "fraud_proofs": fraud_proofs,
                "banned": banned,
                "cheater": cheater_id,
                "cheat_rate": args.cheat_rate if cheater_id else 0.0,
                "paid_for_cheated_nanoton": per_worker[cheater_id]["paid_for_cheated_nanoton"] if cheater_id else 0,
                "per_worker": per_worker,
                "sample_chat": next((j["text"] for j in ok_jobs if j["kind"] == "chat"), ""),
                "ok": discovery["discovery_ok"]
                and len(ok_jobs) == len(jobs)
                and paid == client_stats.paid_nanoton
                and (spot is not None or paid == sum(j["cost_nanoton"] for j in ok_jobs))
                and 0 < settled <= paid
                and not unsettled
                and cheat_ok,
                "wall_s": round(time.perf_counter() - started, 2),
            }
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.terminate()
            with trio.move_on_after(15):
                for proc in procs:
                    await proc.wait()
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
            nursery.cancel_scope.cancel()
    return result


def _worker_row(
    worker: str,
    ok_jobs: list[dict[str, Any]],
    paid: int,
    metrics: dict[str, float],
    catches: _Catches,
    *,
    known: bool,
) -> dict[str, Any]:
    """One worker's line of the summary. Its results the client's spot checks found wrong
    (``caught_*``) should have gone unpaid: what it billed and was not paid is the client's
    withholding, seen from the worker's side, so ``paid_for_cheated_nanoton`` is what was
    caught less what went unpaid (None for a worker that restarted: its bill restarted too)."""
    mine = [j for j in ok_jobs if j["worker"] == worker]
    caught = [c for c in catches.seen if peer_id_to_str(c.wrong.worker) == worker]
    caught_nanoton = sum(c.wrong.result.cost_nanoton for c in caught)
    billed = int(metrics.get("cocoon_worker_earned_nanoton_total", 0))
    return {
        "jobs": len(mine),  # the answers the caller kept
        "earned_nanoton": sum(j["cost_nanoton"] for j in mine),
        "paid_nanoton": paid,  # vouchers, spot-check runs included
        "billed_nanoton": billed if known else None,
        "cheated_runs": int(metrics.get("cocoon_cheated_runs_total", 0)),  # the worker's own count
        "model_runs": int(metrics.get("cocoon_model_runs_total", 0)) or None,
        "cheated_jobs": len(caught),  # the jobs its checks found wrong: all of them at check rate 1
        "caught_nanoton": caught_nanoton,
        "paid_for_cheated_nanoton": caught_nanoton - (billed - paid) if known else None,
    }


class _Catches:
    """Every wrong result the client's spot checks catch, then handed on to the report
    the node gave them (its fraud proofs), so the demo can show who was caught on what."""

    def __init__(self, inner: CheatReport | None) -> None:
        self.inner = inner
        self.seen: list[CaughtCheating] = []

    @classmethod
    def install(cls, client: Node) -> _Catches:
        catches = cls(None)
        checks = client.job_client.checks if client.job_client is not None else None
        if checks is not None:
            catches.inner, checks.report = checks.report, catches
        return catches

    async def caught(self, cheat: CaughtCheating) -> None:
        self.seen.append(cheat)
        _progress(f"  caught {peer_id_to_str(cheat.wrong.worker)}: {cheat.mismatch.reason} ({cheat.mismatch.detail})")
        if self.inner is not None:
            await self.inner.caught(cheat)


async def _follow_channels(payer: Payer, seen: dict[str, PayerChannel]) -> None:
    """Keep every channel the payer holds in ``seen``: one closed during the run (a banned
    worker's) leaves the payer's books once closed on chain, but its vouchers count."""
    while True:
        seen.update(payer.channels)
        await trio.sleep(0.1)


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return parse(resp.read().decode())


def _metric_value(node: Node, name: str) -> int:
    """The sum of ``name``'s samples in ``node.metrics()`` (0 when the node has no such series)."""
    return int(sum(v for m in node.metrics() if m.name == name for _, v in m.samples if isinstance(v, int | float)))


def _p(values: list[float], q: float) -> float:
    return round(percentile(sorted(values), q), 2) if values else -1.0


async def _closed_on_chain(chain: LocalChain, address: str, timeout_s: float = 120.0) -> bool:
    """Whether the chain shows the channel's contract closed within ``timeout_s`` (a block
    or two after the close is sent)."""
    with trio.move_on_after(timeout_s):
        while (await trio.to_thread.run_sync(read_channel, chain, address)).state != UNINITED:
            await trio.sleep(chain.confirm_poll_s)
        return True
    return False


async def _close_the_rest(pay: PaymentService, chain: LocalChain, seen: dict[str, PayerChannel]) -> list[str]:
    """Wait for every channel of the run to be closed on chain; the addresses of those
    still open after ``STUCK_CLOSE_TRIES`` tries.

    The client closes a channel as it bans its worker; when the ban's hang-up breaks that
    close, the payer takes it that the worker is closing the channel itself and waits for
    it, which a cheater need not do. Such a channel is asked to close cooperatively again,
    as the payer does for a close it finds unfinished after a restart; one the client had
    to close alone is finished once the local chain's clock passes its quarantine."""
    unsettled = []
    for ch in seen.values():
        for _ in range(STUCK_CLOSE_TRIES):
            if await _closed_on_chain(chain, ch.address, timeout_s=20.0):
                break
            if ch.state is ChannelState.CLOSING_COOPERATIVE:
                if ch.close_in_hand:
                    _progress(f"channel {ch.address}: its close broke off as its worker was banned; closing it again")
                    ch.close_in_hand = False
                await pay.watch_once()  # asks the worker to countersign again, and sends the close
            elif ch.state is ChannelState.CLOSING_UNCOOPERATIVE:
                # Closed alone (the banned worker did not countersign): the demo's own chain
                # skips the quarantine a real one would wait out, then the close is finished.
                _progress(f"channel {ch.address}: closed without its worker; the local chain skips the quarantine")
                await trio.to_thread.run_sync(chain.settle)
                await trio.to_thread.run_sync(chain.advance, pay.payer.config.quarantine_s + 1)
                await pay.watch_once()  # sees the quarantine over: finish_uncooperative_close
        else:
            unsettled.append(ch.address)
    return unsettled


async def _discover(client: Node, models: dict[str, ModelSpec], args: argparse.Namespace) -> dict[str, Any]:
    """Every worker of every model through gossip, then through the DHT too."""
    seen_at: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    with trio.move_on_after(args.timeout_s):
        while True:
            for name, spec in models.items():
                for w in await client.find_workers(spec.model_id, use_dht=False):
                    seen_at.setdefault(name, {}).setdefault(peer_id_to_str(w.peer_id), time.perf_counter() - t0)
            if all(len(seen_at.get(n, {})) >= args.workers for n in models):
                break
            await trio.sleep(0.05)
    # Workers publish their DHT records as they start: retry the lookup until
    # every worker shows up there too, or time runs out.
    both: dict[str, int] = {}
    with trio.move_on_after(args.timeout_s):
        for name, spec in models.items():
            tries = 0
            while True:
                tries += 1
                t = time.perf_counter()
                workers = await client.find_workers(spec.model_id)
                lookup_ms = (time.perf_counter() - t) * 1000
                both[name] = sum(1 for w in workers if w.sources == {"dht", "gossip"})
                if both[name] >= args.workers:
                    break
                await trio.sleep(0.2)
            _progress(f"{name}: {len(workers)} worker(s) via gossip + DHT, lookup {lookup_ms:.0f} ms (try {tries})")
    return {
        "discovered_gossip": {n: len(seen_at.get(n, {})) for n in models},
        "discovered_both_sources": both,
        "gossip_discovery_s_max": round(max((t for d in seen_at.values() for t in d.values()), default=-1), 3),
        "discovery_ok": all(both.get(n, 0) == args.workers for n in models),
    }


async def _jobs(
    client: Node,
    models: dict[str, ModelSpec],
    args: argparse.Namespace,
    kill: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """``args.jobs`` jobs, alternating embeddings and chat, ``args.concurrency`` at a time;
    ``kill`` runs once, a third of the way through, while jobs are in flight."""
    results: list[dict[str, Any]] = []
    todo = list(range(args.jobs))
    kill_at = args.jobs // 3 if kill is not None else -1

    async def lane() -> None:
        while todo:
            i = todo.pop(0)
            if i == kill_at and kill is not None:
                kill()
            kind = "embed" if i % 2 == 0 else "chat"
            row: dict[str, Any] = {"job": i, "kind": kind, "ok": False, "cost_nanoton": 0, "text": ""}
            t = time.perf_counter()
            try:
                if kind == "embed":
                    r = await client.infer(
                        models[kind].model_id, texts=EMBED_TEXTS[i % len(EMBED_TEXTS)], max_price_nanoton=MAX_PRICE
                    )
                else:
                    prompt = chatml_prompt([{"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)]}])
                    r = await _chat(client, models[kind].model_id, prompt, args.max_tokens)
                    row["text"] = r.text
                row |= {"ok": True, "worker": peer_id_to_str(r.worker), "cost_nanoton": r.cost_nanoton}
            except JobFailed as exc:
                row["error"] = str(exc)
            row["latency_ms"] = (time.perf_counter() - t) * 1000
            results.append(row)
            if len(results) % 5 == 0 or len(results) == args.jobs:
                failed = sum(not r["ok"] for r in results)
                _progress(f"  {len(results)}/{args.jobs} jobs done, {failed} failed")

    async with trio.open_nursery() as nursery:
        for _ in range(args.concurrency):
            nursery.start_soon(lane)
    return results


async def _chat(client: Node, model_id: bytes, prompt: str, max_tokens: int) -> InferenceResult:
    """A streamed chat answer. The library does not retry a generation that already
    streamed tokens (its caller saw them); this program starts the answer over instead.
    Only a finished answer is paid for."""
    for attempt in range(3):
        try:
            async for item in client.generate(model_id, prompt, max_tokens=max_tokens, max_price_nanoton=MAX_PRICE):
                if isinstance(item, InferenceResult):
                    return item
            raise JobFailed(jf.WORKER_LOST, "generation ended without a result")
        except JobFailed as exc:
            if not exc.retryable or attempt == 2:
                raise
    raise AssertionError("unreachable")


def run(args: argparse.Namespace) -> int:
    if args.cheating_worker and args.workers < MIN_WORKERS_WITH_CHEATER:
        print(
            f"cocoon-node demo: --cheating-worker needs --workers {MIN_WORKERS_WITH_CHEATER} or more: when a spot "
            "check finds two results that disagree, a third worker tells which one lied",
            file=sys.stderr,
        )
        return 2
    if not 0.0 <= args.cheat_rate <= 1.0 or not 0.0 <= (args.spot_check_rate or 0.0) <= 1.0:
        print("cocoon-node demo: --cheat-rate and --spot-check-rate are shares within [0, 1]", file=sys.stderr)
        return 2
    _progress("starting the local chain (@ton/sandbox behind the toncenter API)")
    with open_local_chain(realistic=args.realistic_chain) as chain:
        if args.data_dir is not None:
            args.data_dir.mkdir(parents=True, exist_ok=True)
            result = trio.run(_run, args, args.data_dir, chain)
        else:
            with tempfile.TemporaryDirectory(prefix="cocoon-demo-") as tmp:
                result = trio.run(_run, args, Path(tmp), chain)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n{result['workers']} workers, discovered in {result['gossip_discovery_s_max']} s over gossip")
        print(
            f"jobs: {result['jobs_ok']} ok, {result['jobs_failed']} failed; "
            f"latency p50 {result['latency_ms_p50']} ms, p99 {result['latency_ms_p99']} ms"
        )
        print(
            f"paid {result['paid_nanoton']} nanoton by voucher over {result['channels']} channel(s); "
            f"settled on chain {result['settled_nanoton']} (fees {result['fees_nanoton']})"
        )
        for peer, row in result["per_worker"].items():
            print(f"  {peer}: {row['jobs']} jobs, earned {row['earned_nanoton']} nanoton")
        if result["spot_check_rate"]:
            print(
                f"spot checks: {result['checks']} run, {result['checks_failed']} found a wrong result "
                f"({result['withheld_nanoton']} nanoton not paid), {result['checks_skipped']} skipped; "
                f"{result['fraud_proofs']} fraud proof(s) sent; banned: {', '.join(result['banned']) or 'nobody'}"
            )
        if result["cheater"]:
            row = result["per_worker"][result["cheater"]]
            print(
                f"the cheater {result['cheater']} lied on {row['cheated_runs']} of {row['model_runs']} model runs, "
                f"was caught on {row['cheated_jobs']} job(s) and paid {result['paid_for_cheated_nanoton']} nanoton "
                "for them"
            )
        print(f"a chat answer: {result['sample_chat']!r}")
        print("OK" if result["ok"] else "FAILED")
    return 0 if result.get("ok") else 1
