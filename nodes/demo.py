"""``cocoon-node demo``: a local network on this machine, start to finish.

A bootstrap peer and N worker processes on 127.0.0.1 serving two real models
(MiniLM embeddings, SmolLM2 chat); a client that discovers every worker through
gossip and through the DHT, then runs M jobs of both models spread over the
workers (chat answers streamed token by token), paying every job by voucher over a
TON payment channel per worker opened on the local chain (@ton/sandbox), then
closes the channels cooperatively on chain and reports what was paid, what the
workers' wallets received, and the fees.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from cocoon_p2p.core.identity import peer_id_from_str, peer_id_to_str
from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2
from cocoon_p2p.execution.generation import chatml_prompt
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.jobs import InferenceResult, JobFailed
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.payments.chain import read_channel
from cocoon_p2p.payments.service import PaymentConfig
from cocoon_p2p.payments.settlement import UNINITED, SettlementPolicy
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain
from cocoon_p2p.testing.processes import NODE_CLI, start_process

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


def _progress(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace, root: Path, chain: LocalChain) -> dict[str, Any]:
    cli = list(NODE_CLI)
    _progress("preparing the models (exported from the installed wheels on first use)")
    models = {"embed": ensure_minilm(progress=_progress), "chat": ensure_smollm2(progress=_progress)}
    builtin = {"embed": "minilm", "chat": "smollm2"}
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
                    "--log-level",
                    "WARNING",
                ]
                for name in models:
                    cmd += ["--model", builtin[name]]
                proc, addrs = await start_process(cmd, nursery, worker_wallets)
                procs.append(proc)
                worker_cmds.append(cmd)
                worker_ids.append(addrs[0].rsplit("/p2p/", 1)[1])
                _progress(f"worker {i + 1}/{args.workers} up: {addrs[0]}")
            wallet = await trio.to_thread.run_sync(chain.new_wallet, CLIENT_FUNDS)
            payments = PaymentConfig(
                chain, wallet, root / "client-payments", policy=SettlementPolicy(deposit_nanoton=DEPOSIT)
            )
            async with Node(NodeConfig(bootstrap=boot_addrs, payments=payments)) as client:
                pay = client.payments
                assert pay is not None
                _progress("client joined; discovering workers over gossip and the DHT")
                discovery = await _discover(client, models, args)
                _progress(f"running {args.jobs} jobs (embeddings and chat) spread over the workers, paid by voucher")
                victim = 1 % args.workers  # procs[0] is the bootstrap peer

                def kill() -> None:
                    _progress(f"killing worker {victim + 1} (SIGKILL) with jobs in flight")
                    procs[1 + victim].kill()

                jobs = await _jobs(client, models, args, kill if args.kill_worker else None)
                if args.kill_worker:
                    _progress(f"restarting worker {victim + 1} from its data directory (same keys and channels)")
                    proc, addrs = await start_process(worker_cmds[victim], nursery)
                    procs.append(proc)
                    peer = peer_id_from_str(worker_ids[victim])
                    with trio.fail_after(60):  # its new address reaches the client by gossip
                        while addrs[0] not in client.directory.addrs_of(peer):
                            await trio.sleep(0.1)
                paid = sum(ch.issuer.sent for ch in pay.payer.open.values())
                channels = len(pay.payer.open)
                _progress(f"settling {channels} channel(s) on the local chain (cooperative close)")
                await trio.to_thread.run_sync(chain.settle)  # what the workers sent has landed
                before = {w: await trio.to_thread.run_sync(chain.balance, w) for w in worker_wallets}
                settle_waits = []
                for worker_peer, ch in list(pay.payer.open.items()):
                    t0 = time.perf_counter()
                    await pay.settle(worker_peer)
                    await _closed_on_chain(chain, ch.address)
                    settle_waits.append(time.perf_counter() - t0)
                await trio.to_thread.run_sync(chain.settle)  # the payouts have landed
                after = {w: await trio.to_thread.run_sync(chain.balance, w) for w in worker_wallets}
                assert client.job_client is not None
                client_stats = client.job_client.stats
            settled = sum(after[w] - before[w] for w in worker_wallets)
            ok_jobs = [j for j in jobs if j["ok"]]
            latencies = sorted(j["latency_ms"] for j in ok_jobs)
            per_worker: dict[str, dict[str, int]] = {w: {"jobs": 0, "earned_nanoton": 0} for w in worker_ids}
            for j in ok_jobs:
                row = per_worker.setdefault(j["worker"], {"jobs": 0, "earned_nanoton": 0})
                row["jobs"] += 1
                row["earned_nanoton"] += j["cost_nanoton"]
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
                "killed_worker": worker_ids[1 % args.workers] if args.kill_worker else None,
                "payments_pending": client_stats.payments_pending,
                "onchain_ops": pay.onchain_ops,  # deploy + init, then one close, per channel
                "realistic_chain": args.realistic_chain,
                "open_wait_s_p50": _p(pay.payer.open_waits_s, 50),
                "open_wait_s_p99": _p(pay.payer.open_waits_s, 99),
                "settle_wait_s_p50": _p(settle_waits, 50),
                "settle_wait_s_p99": _p(settle_waits, 99),
                "chain_retries": dict(chain.retried),
                "per_worker": per_worker,
                "sample_chat": next((j["text"] for j in ok_jobs if j["kind"] == "chat"), ""),
                "ok": discovery["discovery_ok"]
                and len(ok_jobs) == len(jobs)
                and paid == sum(j["cost_nanoton"] for j in ok_jobs)
                and 0 < settled <= paid,
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


def _p(values: list[float], q: float) -> float:
    return round(percentile(sorted(values), q), 2) if values else -1.0


async def _closed_on_chain(chain: LocalChain, address: str) -> None:
    """Until the chain shows the channel's contract closed (a block or two after the close is sent)."""
    with trio.fail_after(120):
        while (await trio.to_thread.run_sync(read_channel, chain, address)).state != UNINITED:
            await trio.sleep(chain.confirm_poll_s)


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
        print(f"a chat answer: {result['sample_chat']!r}")
        print("OK" if result["ok"] else "FAILED")
    return 0 if result.get("ok") else 1
