"""``cocoon-node demo``: a local network on this machine, start to finish.

Today it shows the overlay core: a bootstrap peer and N worker processes on
127.0.0.1, and a client that discovers every worker of two models through
gossip and through the DHT, then checks both agree. Jobs and payments join
the demo as those parts land.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from cocoon_p2p.identity import peer_id_to_str
from cocoon_p2p.node import Node, NodeConfig

DEMO_MODELS = ("embed", "chat")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a local network and show it working")
    p.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument("--data-dir", type=Path, help="where the peers keep their keys (default: a temp dir)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="give up after this long")
    p.add_argument("--json", action="store_true", help="print one JSON object as the summary")


def _progress(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


async def _start(cmd: list[str], nursery: trio.Nursery) -> tuple[trio.Process, list[str]]:
    """Start a node process; return it and its listen addresses once it prints them."""
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    buf, addrs = b"", []
    while True:
        chunk = await proc.stdout.receive_some(4096)
        if not chunk:
            raise RuntimeError(f"{cmd[3]} exited before it listened")
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            text = line.decode()
            if text.startswith("listening "):
                addrs.append(text.split()[1])
            elif text.startswith("serving ") or (addrs and cmd[3] == "bootstrap"):
                nursery.start_soon(_drain, proc.stdout)
                return proc, addrs
        if addrs and cmd[3] == "bootstrap":
            nursery.start_soon(_drain, proc.stdout)
            return proc, addrs


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(4096):
        pass


async def _run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cli = [sys.executable, "-m", "nodes.cli"]
    models = {}
    for name in DEMO_MODELS:
        path = root / f"{name}.model"
        path.write_bytes(f"cocoon demo model {name}\n".encode() * 64)
        models[name] = path
    procs: list[trio.Process] = []
    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        try:
            started = time.perf_counter()
            boot, boot_addrs = await _start(
                [*cli, "bootstrap", "--data-dir", str(root / "boot"), "--log-level", "WARNING"], nursery
            )
            procs.append(boot)
            _progress(f"bootstrap peer up: {boot_addrs[0]}")
            worker_ids = []
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
                    str(1000 + 100 * i),
                    "--log-level",
                    "WARNING",
                ]
                for path in models.values():
                    cmd += ["--model", str(path)]
                proc, addrs = await _start(cmd, nursery)
                procs.append(proc)
                worker_ids.append(addrs[0].rsplit("/p2p/", 1)[1])
                _progress(f"worker {i + 1}/{args.workers} up: {addrs[0]}")
            from .cli import model_id_of

            async with Node(NodeConfig(bootstrap=boot_addrs)) as client:
                _progress("client joined; discovering workers over gossip and the DHT")
                seen_at: dict[str, dict[str, float]] = {}
                t0 = time.perf_counter()
                with trio.move_on_after(args.timeout_s):
                    while True:
                        for name, path in models.items():
                            for w in await client.find_workers(model_id_of(path), use_dht=False):
                                seen_at.setdefault(name, {}).setdefault(
                                    peer_id_to_str(w.peer_id), time.perf_counter() - t0
                                )
                        if all(len(seen_at.get(n, {})) >= args.workers for n in models):
                            break
                        await trio.sleep(0.05)
                # Workers publish their DHT records as they start: retry the lookup
                # until every worker shows up there too, or time runs out.
                via: dict[str, list[dict[str, Any]]] = {}
                with trio.move_on_after(args.timeout_s):
                    for name, path in models.items():
                        tries = 0
                        while True:
                            tries += 1
                            t = time.perf_counter()
                            workers = await client.find_workers(model_id_of(path))
                            lookup_ms = (time.perf_counter() - t) * 1000
                            via[name] = [
                                {
                                    "peer_id": peer_id_to_str(w.peer_id),
                                    "price_nanoton": w.price_nanoton,
                                    "sources": sorted(w.sources),
                                    "lookup_ms": round(lookup_ms, 1),
                                }
                                for w in workers
                            ]
                            if sum("dht" in w.sources for w in workers) >= args.workers:
                                break
                            await trio.sleep(0.2)
                        _progress(f"{name}: {len(workers)} worker(s), DHT lookup {lookup_ms:.0f} ms (try {tries})")
            both = {n: sum(1 for w in via.get(n, []) if w["sources"] == ["dht", "gossip"]) for n in models}
            result = {
                "workers": args.workers,
                "worker_ids": worker_ids,
                "discovered_gossip": {n: len(seen_at.get(n, {})) for n in models},
                "discovered_both_sources": both,
                "gossip_discovery_s_max": round(max((t for d in seen_at.values() for t in d.values()), default=-1), 3),
                "models": via,
                "ok": all(v == args.workers for v in both.values()),
                "wall_s": round(time.perf_counter() - started, 2),
            }
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.terminate()
            with trio.move_on_after(10):
                for proc in procs:
                    await proc.wait()
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
            nursery.cancel_scope.cancel()
    return result


def run(args: argparse.Namespace) -> int:
    if args.data_dir is not None:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        result = trio.run(_run, args, args.data_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="cocoon-demo-") as tmp:
            result = trio.run(_run, args, Path(tmp))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n{result['workers']} workers, discovered in {result['gossip_discovery_s_max']} s over gossip")
        for name, rows in result["models"].items():
            print(f"  model {name}:")
            for r in rows:
                print(f"    {r['peer_id']}  {r['price_nanoton']} nanoton/item  via {'+'.join(r['sources'])}")
        print("OK" if result["ok"] else "FAILED: not every worker was found through both gossip and the DHT")
    return 0 if result.get("ok") else 1
