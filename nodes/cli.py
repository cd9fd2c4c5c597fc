"""``cocoon-node``: run cocoon peers from the command line.

Subcommands: keygen, bootstrap, worker, find, demo. Each long-running role
prints its full multiaddrs (``listening /ip4/.../p2p/<PeerId>``) as soon as it
listens, and stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from cocoon_p2p.errors import CocoonError
from cocoon_p2p.identity import load_or_create_identity
from cocoon_p2p.node import ModelCapability, Node, NodeConfig

from . import config as config_mod
from . import demo, logs

KEY_FILE = "node.key"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file for this role (flags override it)")
    p.add_argument("--data-dir", type=Path, help="keys, channel states and caches (default ./cocoon-data)")
    p.add_argument("--listen", action="append", metavar="MULTIADDR", help="address to listen on (repeatable)")
    p.add_argument("--announce", action="append", metavar="MULTIADDR", help="address to advertise (repeatable)")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="peer to join through (repeatable)")
    p.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cocoon-node", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create (or show) this node's persistent identity")
    p.add_argument("--data-dir", type=Path, default=Path("cocoon-data"))

    p = sub.add_parser("bootstrap", help="run a bootstrap peer (DHT server, gossip relay)")
    _common(p)

    p = sub.add_parser("worker", help="run a worker that advertises models")
    _common(p)
    p.add_argument("--model", action="append", type=Path, dest="models", help="ONNX file to serve (repeatable)")
    p.add_argument("--price-nanoton", type=int, help="price per unit of work")
    p.add_argument("--unit", help="what a unit of work is (item, token)")
    p.add_argument("--capacity", type=int, help="jobs run at once")
    p.add_argument("--announce-interval-s", type=float, help="seconds between announcements")

    p = sub.add_parser("find", help="list the workers that serve a model")
    _common(p)
    p.add_argument("model", help="model id (64 hex digits) or path of the model file")
    p.add_argument("--wait-s", type=float, default=3.0, help="seconds to listen to gossip first")
    p.add_argument("--json", action="store_true", help="print JSON")

    demo.add_parser(sub)
    return parser


def _node_config(cfg: config_mod.RoleConfig) -> NodeConfig:
    return NodeConfig(
        key_file=cfg.data_dir / KEY_FILE,
        listen_addrs=cfg.listen,
        announce_addrs=cfg.announce,
        bootstrap=cfg.bootstrap,
        announce_interval_s=cfg.announce_interval_s,
        announce_ttl_s=max(3 * cfg.announce_interval_s, 5.0),
    )


def model_id_of(path: Path) -> bytes:
    """sha256 of a model file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


async def _until_signalled() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def run_peer(cfg: config_mod.RoleConfig, capabilities: list[ModelCapability]) -> None:
    async with Node(_node_config(cfg)) as node:
        for addr in node.addrs:
            print(f"listening {addr}", flush=True)
        if capabilities:
            node.set_capabilities(capabilities)
            for c in capabilities:
                print(f"serving {c.model_id.hex()} price={c.price_nanoton}/{c.unit}", flush=True)
        await _until_signalled()
        print("stopping", flush=True)


async def run_find(cfg: config_mod.RoleConfig, model: str, wait_s: float, as_json: bool) -> int:
    model_id = model_id_of(Path(model)) if Path(model).exists() else bytes.fromhex(model)
    async with Node(_node_config(cfg)) as node:
        await trio.sleep(wait_s)
        workers = await node.find_workers(model_id)
    if as_json:
        rows = [
            {
                "peer_id": _pid(w.peer_id),
                "addrs": list(w.addrs),
                "price_nanoton": w.price_nanoton,
                "unit": w.unit,
                "capacity": w.capacity,
                "free_capacity": w.free_capacity,
                "backend": w.backend,
                "gpu": w.gpu,
                "sources": sorted(w.sources),
                "issued_at_ms": w.issued_at_ms,
            }
            for w in workers
        ]
        print(json.dumps({"model_id": model_id.hex(), "workers": rows}))
    else:
        print(f"{len(workers)} worker(s) for {model_id.hex()}")
        for w in workers:
            via = "+".join(sorted(w.sources))
            print(f"  {_pid(w.peer_id)}  {w.price_nanoton}/{w.unit}  free={w.free_capacity}  via {via}")
    return 0 if workers else 1


def _pid(peer_id: bytes) -> str:
    from cocoon_p2p.identity import peer_id_to_str

    return peer_id_to_str(peer_id)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except CocoonError as exc:
        print(f"cocoon-node: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        ident = load_or_create_identity(args.data_dir / KEY_FILE)
        print(ident.peer_id_str)
        return 0
    if args.command == "demo":
        return demo.run(args)
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in config_mod.RoleConfig.__dataclass_fields__}
    cfg = config_mod.load(args.config, overrides)
    logs.setup(cfg.log_level, cfg.log_json)
    if args.command == "find":
        return trio.run(run_find, cfg, args.model, args.wait_s, args.json)
    capabilities = [
        ModelCapability(
            model_id=model_id_of(m),
            backend=cfg.backend,
            price_nanoton=cfg.price_nanoton,
            unit=cfg.unit,
            capacity=cfg.capacity,
        )
        for m in (cfg.models if args.command == "worker" else [])
    ]
    trio.run(run_peer, cfg, capabilities)
    return 0


if __name__ == "__main__":
    sys.exit(main())
