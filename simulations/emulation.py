"""The emulation fidelity: real ``cocoon-node`` processes on 127.0.0.1, the real wire,
Noise, ONNX models and the local chain, driven by the scenario.

One bootstrap process and one process per worker (a small real ONNX model each,
priced and sized as the scenario's worker groups; GPU kinds and speeds are not
emulated), clients as real :class:`~cocoon_p2p.node.Node` objects in this
process, paying by voucher over channels opened on the local chain. Jobs arrive
as the scenario's Poisson rates; churning workers are SIGKILLed and restarted
from their data directories. Bounded by ``emulation.duration_cap_s``; every
process is stopped and every folder removed at the end, whatever happens.
"""

from __future__ import annotations

import random
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.identity import peer_id_from_str
from cocoon_p2p.execution.models import load_model
from cocoon_p2p.execution.tensors import from_numpy
from cocoon_p2p.jobs import JobFailed
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.payments.service import PaymentConfig
from cocoon_p2p.payments.settlement import SettlementPolicy
from cocoon_p2p.testing.localchain import open_local_chain
from cocoon_p2p.testing.processes import NODE_CLI, start_process
from cocoon_p2p.testing.tinymodel import build_tiny_model

from .results import JobRecord, Results
from .scenario import Scenario, ScenarioError

CLI = list(NODE_CLI)
TON = 1_000_000_000


async def _emulate(sc: Scenario, root: Path, progress: Callable[[float], None] | None) -> Results:
    results = Results(sc, fidelity="emulation")
    rng = random.Random(sc.seed)
    duration = min(sc.duration_s, sc.emulation.duration_cap_s)
    model_path = build_tiny_model(root / "model.onnx", hidden=2048 if sc.emulation.job_model == "slow" else 16)
    spec = load_model(model_path, name="tiny")
    x = (from_numpy("x", np.ones((1, 4), np.float32)),)
    visible: list[float] = []
    procs: list[trio.Process] = []
    with open_local_chain() as chain:
        chain_args = ["--chain", chain.endpoint, "--local-chain"]
        async with trio.open_nursery() as nursery:
            try:
                boot, boot_addrs = await start_process(
                    [*CLI, "bootstrap", "--data-dir", str(root / "boot"), "--log-level", "WARNING"], nursery
                )
                procs.append(boot)
                worker_cmds: list[list[str]] = []
                for g in sc.workers:
                    for _ in range(g.count):
                        i = len(worker_cmds)
                        worker_cmds.append(
                            [*CLI, "worker", "--data-dir", str(root / f"w{i}"), "--model", str(model_path),
                             "--price-nanoton", str(g.price_nanoton), "--capacity", str(g.capacity),
                             "--bootstrap", boot_addrs[0], "--announce-interval-s", str(sc.gossip.announce_interval_s),
                             "--log-level", "WARNING", *chain_args]
                        )  # fmt: skip
                clients: list[Node] = []  # the clients first: each worker's arrival is seen as it happens
                for cg in sc.clients:
                    for _ in range(cg.count):
                        wallet = await trio.to_thread.run_sync(chain.new_wallet, 50 * TON)
                        policy = SettlementPolicy(deposit_nanoton=sc.settlement.deposit_nanoton)
                        pay = PaymentConfig(chain, wallet, root / f"c{len(clients)}", policy=policy)
                        clients.append(await nursery.start(_client_node, boot_addrs[0], pay))
                current: dict[int, trio.Process] = {}

                async def seen_by_half(peer: bytes, since: float) -> None:
                    """How long until half the clients hold this worker's announcement (as the model measures)."""
                    with trio.move_on_after(30):
                        while 2 * sum(c.directory.announcement_of(peer) is not None for c in clients) < len(clients):
                            await trio.sleep(0.01)
                        visible.append(trio.current_time() - since)

                async def start_worker(i: int) -> None:
                    proc, addrs = await start_process(worker_cmds[i], nursery)
                    procs.append(proc)
                    current[i] = proc
                    nursery.start_soon(
                        seen_by_half, peer_id_from_str(addrs[0].rsplit("/p2p/", 1)[1]), trio.current_time()
                    )

                async with trio.open_nursery() as starting:
                    for i in range(len(worker_cmds)):
                        starting.start_soon(start_worker, i)
                # Lookups (the real DHT), then the load once every client knows every worker.
                for c in clients:
                    t = time.perf_counter()
                    found = await c.find_workers(spec.model_id, use_dht=True)
                    results.lookups.append({"time_s": time.perf_counter() - t, "hops": 0, "messages": 0,
                                            "timeouts": 0, "found": len(found), "peers": sc.peers})  # fmt: skip
                with trio.move_on_after(30):
                    while any(len(c.directory.workers_for(spec.model_id, now_ms=now_ms())) < len(worker_cmds)
                              for c in clients):  # fmt: skip
                        await trio.sleep(0.05)
                t0 = trio.current_time()
                if progress is not None:
                    progress(0.0)

                async def client_loop(ci: int, c: Node, rate: float, max_price: int) -> None:
                    crng = random.Random(rng.getrandbits(64))
                    async with trio.open_nursery() as jobs:
                        while True:
                            await trio.sleep(crng.expovariate(rate))
                            jobs.start_soon(one_job, ci, c, max_price)

                async def one_job(ci: int, c: Node, max_price: int) -> None:
                    issued = trio.current_time() - t0
                    rec = JobRecord(issued=issued, client=ci, counted=issued >= sc.warmup_s)
                    try:
                        r = await c.infer(spec.model_id, inputs=x, max_price_nanoton=max_price,
                                          timeout_s=sc.routing.timeout_s)  # fmt: skip
                        rec.ok, rec.latency_s, rec.attempts, rec.cost = True, r.latency_s, r.attempts, r.cost_nanoton
                    except JobFailed as exc:
                        rec.code = exc.code
                    results.add_job(rec)

                async def churn(i: int) -> None:
                    while True:
                        await trio.sleep(rng.expovariate(1 / sc.churn.session_mean_s))
                        current[i].send_signal(signal.SIGKILL)
                        await trio.sleep(rng.expovariate(1 / sc.churn.offline_mean_s))
                        await start_worker(i)

                async with trio.open_nursery() as load:
                    ci = 0
                    for cg in sc.clients:
                        for _ in range(cg.count):
                            load.start_soon(client_loop, ci, clients[ci], cg.rate_per_s, cg.max_price_nanoton)
                            ci += 1
                    for i in range(len(worker_cmds)):
                        if rng.random() < sc.churn.fraction:
                            load.start_soon(churn, i)
                    step = max(1.0, duration / 50)
                    while (elapsed := trio.current_time() - t0) < duration:
                        await trio.sleep(min(step, duration - elapsed))
                        online = sum(1 for p in current.values() if p.returncode is None)
                        results.add_sample(trio.current_time() - t0, online, 0, None)
                        if progress is not None:
                            progress(trio.current_time() - t0)
                    load.cancel_scope.cancel()
                vis = sorted(visible)
                results.extra["announce_visible_s_p50"] = vis[len(vis) // 2] if vis else float("nan")
                client_stats = [c.job_client.stats for c in clients if c.job_client is not None]
                results.extra["paid_nanoton"] = sum(s.paid_nanoton for s in client_stats)
                results.extra["worker_processes"] = len(worker_cmds)
                results.onchain_ops = sum(c.payments.onchain_ops for c in clients if c.payments is not None)
                results.channels_opened = sum(
                    c.payments.payer.channels_opened for c in clients if c.payments is not None
                )
            finally:
                for p in procs:
                    if p.returncode is None:
                        p.send_signal(signal.SIGKILL)
                nursery.cancel_scope.cancel()
    return results


async def _client_node(boot: str, payments: PaymentConfig, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with Node(NodeConfig(bootstrap=[boot], payments=payments, quiet_logs=True)) as node:
        task_status.started(node)
        await trio.sleep_forever()


def run_emulation(sc: Scenario, *, progress: Callable[[float], None] | None = None) -> Results:
    """Run ``sc`` with real processes (see the module's docstring); ScenarioError for what only the model runs."""
    if sc.tee.in_use:  # no machine here makes TDX quotes, and no emulated worker could attest
        raise ScenarioError("tee.* runs in the model fidelity only (no emulated worker can produce a TDX quote)")
    if sc.cheat.in_use:  # the node's workers have no switch to lie, and its clients' checks are set elsewhere
        raise ScenarioError("cheat.* runs in the model fidelity only (an emulated worker never returns wrong results)")
    with tempfile.TemporaryDirectory(prefix="cocoon-emulation-") as d:
        return trio.run(_emulate, sc, Path(d), progress)
