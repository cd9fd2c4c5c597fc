"""``cocoon-node``: run cocoon peers from the command line.

Subcommands: keygen, bootstrap, worker, client, gateway, find, wallet, status, attest, demo. Each long-running role
prints its full multiaddrs (``listening /ip4/.../p2p/<PeerId>``) as soon as it
listens, and stops cleanly on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from cocoon_p2p.api.gateway import GatewayModel
from cocoon_p2p.api.http import Request, Response, error_response, serve_http
from cocoon_p2p.api.prometheus import CONTENT_TYPE, exposition, node_registry
from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.identity import load_or_create_identity
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.metrics import Metric, metric
from cocoon_p2p.core.pricing import Price
from cocoon_p2p.execution.backends import Backend, open_backend
from cocoon_p2p.execution.generation import chatml_prompt
from cocoon_p2p.execution.models import ModelSpec, load_model
from cocoon_p2p.execution.tensors import to_numpy
from cocoon_p2p.jobs import InferenceResult, JobFailed
from cocoon_p2p.node import Node
from cocoon_p2p.testing.cheating import CheatingBackend
from cocoon_p2p.transport.addresses import reachability_warning

from . import attest, datadir, demo, enginecli, funding, gatewaycli, logs, walletcli
from . import config as config_mod
from . import status as status_mod
from .cli_args import BUILTIN_MODELS, KEY_FILE, build_parser
from .cli_args import node_config as _node_config  # (the names tests import from here)
from .cli_args import payment_config as _payment_config

# What clients ask the network for when they name a built-in model: the name and variant
# its workers announce (a client needs no copy of the model, nor the tools to export it).
BUILTIN_REFS = {
    "minilm": "all-minilm-l6-v2",
    "smollm2": "smollm2-135m-instruct:fp32",
    "smollm2-q4": "smollm2-135m-instruct:q4",
}


def cheating_metrics(backends: list[CheatingBackend]) -> list[Metric]:
    """A cheating worker's own counters (summed over its models), for its ``/metrics``."""
    cheated, runs = sum(b.cheated_runs for b in backends), sum(b.runs for b in backends)
    return [
        metric("cocoon_cheated_runs_total", "counter", "Model runs whose outputs were replaced (adversarial)", cheated),
        metric("cocoon_model_runs_total", "counter", "Model runs, replaced or not (adversarial)", runs),
    ]


def resolve_model(name: str) -> ModelSpec:
    """A built-in model (exported on first use) or an ONNX file (kind ``tensor``), hash-checked."""
    builder = BUILTIN_MODELS.get(name)
    if builder is not None:
        return builder(progress=lambda m: logs.say(m, fields(model=name), to=logs.To.STDERR))
    return load_model(Path(name))


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


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise CocoonError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


async def _serve_metrics(metrics: Callable[[], list[Metric]], where: str, nursery: trio.Nursery) -> None:
    """Prometheus /metrics, what ``metrics()`` returns when scraped (with process metrics and
    build info, :func:`~cocoon_p2p.api.prometheus.node_registry`), on ``where`` (HOST:PORT;
    port 0 picks one)."""
    host, port = _host_port(where)
    registry = node_registry(metrics)

    async def handler(req: Request) -> Response:
        if req.method == "GET" and req.path == "/metrics":
            return Response(200, exposition(registry), CONTENT_TYPE)
        return error_response(404, "only /metrics is served here")

    bound = await nursery.start(serve_http, handler, host, port)
    url = f"http://{host}:{bound}/metrics"
    logs.say(f"metrics {url}", fields(addr=url))


async def run_gateway(cfg: config_mod.RoleConfig, models: list[GatewayModel], aliases: dict[str, str]) -> None:
    """A client node behind the OpenAI-compatible API, until SIGINT/SIGTERM."""
    payments = await trio.to_thread.run_sync(_payment_config, cfg, funding.Role.GATEWAY)
    host, port = _host_port(cfg.http)
    async with Node(_node_config(cfg, payments)) as node, trio.open_nursery() as nursery:
        me = node.peer_id_str
        logs.bind(fields(node=me))
        for addr in node.addrs:
            logs.say(f"listening {addr}", fields(peer=me, addr=addr))
        if payments is not None and not await funding.fund_wallet(cfg, payments, funding.Role.GATEWAY):
            logs.say("stopping", fields(peer=me))
            return
        if cfg.metrics:  # also under the API's own /metrics
            await _serve_metrics(node.metrics, cfg.metrics, nursery)
        gateway = gatewaycli.build_gateway(node, models, cfg, aliases)
        bound = await nursery.start(gateway.serve, host, port)
        tee = " (attested TEE workers only)" if cfg.require_tee else ""
        named = ", ".join([m.name for m in models] + list(aliases))
        url = f"http://{host}:{bound}/v1"
        logs.say(f"gateway {url} models: {named} (and any the network names){tee}", fields(peer=me, addr=url))
        await _until_signalled()
        logs.say("stopping", fields(peer=me))
        nursery.cancel_scope.cancel()


async def run_peer(cfg: config_mod.RoleConfig, models: list[ModelSpec]) -> None:
    """A bootstrap peer (no models) or a worker: serve until SIGINT/SIGTERM, then stop
    taking jobs, let the running ones finish (up to ``drain_s``) and close the channels
    holding earnings (``settle_on_exit``, up to ``settle_timeout_s``)."""
    engines = cfg.data_dir / "engines"
    backends: list[Backend] = [
        open_backend(cfg.backend, m.path, model_id=m.model_id, cache_dir=engines, max_batch=m.max_batch) for m in models
    ]
    # Adversarial testing: each model's backend lies on a share of its runs (seeded per model,
    # so a rerun lies on the same runs).
    cheats = [CheatingBackend(b, rate=cfg.cheat_rate, seed=i) for i, b in enumerate(backends)] if cfg.cheat_rate else []
    if cheats:
        backends = [*cheats]
    payments = (
        await trio.to_thread.run_sync(_payment_config, cfg, funding.Role.WORKER) if models or cfg.engine else None
    )
    async with Node(_node_config(cfg, payments)) as node, trio.open_nursery() as nursery:
        me = node.peer_id_str
        logs.bind(fields(node=me))
        for addr in node.addrs:
            logs.say(f"listening {addr}", fields(peer=me, addr=addr))
        if (warning := reachability_warning(node.addrs)) is not None:
            logs.say(f"warning: {warning}", fields(peer=me), to=logs.To.STDERR, level=logging.WARNING)
        if node.evidence is not None:
            attest.report_worker_tee(node.evidence, node.identity.peer_id, cfg.tee)
        if cfg.metrics:
            await _serve_metrics(
                lambda: node.metrics() + (cheating_metrics(cheats) if cheats else []), cfg.metrics, nursery
            )
        if payments is not None and not await funding.fund_wallet(cfg, payments, funding.Role.WORKER):
            logs.say("stopping", fields(peer=me))  # signalled before it was funded: nothing served, nothing to settle
            nursery.cancel_scope.cancel()
            return
        # Signals are caught from before the "serving" lines: a SIGTERM right after them
        # (a supervisor that saw the node up) drains and stops like any other.
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            if cheats:
                logs.say(f"cheating {cfg.cheat_rate:g}", fields(peer=me))
            for spec, backend in zip(models, backends, strict=True):
                completion = cfg.completion_price_nanoton if spec.kind == "generation" else None
                node.serve_model(spec, backend, price_nanoton=cfg.price_nanoton, completion_price_nanoton=completion)
                logs.say(
                    f"serving {spec.id_hex} {spec.name} {backend.name}/{backend.device} "
                    f"price={Price.of(cfg.price_nanoton, completion).label(spec.unit)}",
                    fields(peer=me, model=spec.name),
                )
            await enginecli.serve_engines(node, cfg)
            async for _ in signals:
                break
        logs.say("stopping", fields(peer=me))
        node.stop_accepting_jobs()
        if node.job_worker is not None:
            with trio.move_on_after(cfg.drain_s):
                while node.job_worker.running:
                    await trio.sleep(0.05)
            stats = node.job_worker.stats
            logs.say(
                f"served {stats.jobs_ok} jobs, earned {stats.earned_nanoton} nanoton",
                fields(peer=me, nanoton=stats.earned_nanoton),
            )
        if cheats:
            cheated, runs = sum(b.cheated_runs for b in cheats), sum(b.runs for b in cheats)
            logs.say(f"cheated {cheated} of {runs} model runs", fields(peer=me))
        if node.payments is not None:  # settle what we earned before going away
            with trio.move_on_after(cfg.settle_timeout_s):
                for channel, how in (await node.payments.shutdown()).items():
                    logs.say(f"channel {channel}: {how}", fields(channel=channel))
        nursery.cancel_scope.cancel()


async def run_client(cfg: config_mod.RoleConfig, args: argparse.Namespace) -> int:
    name = args.job_model or {"embed": "minilm", "chat": "smollm2"}[args.task]
    payments = await trio.to_thread.run_sync(_payment_config, cfg, funding.Role.CLIENT)
    async with Node(_node_config(cfg, payments)) as node:
        pay = node.payments
        # stdout carries the job's output: the wallet and fund lines go to stderr
        if payments is not None and not await funding.fund_wallet(cfg, payments, funding.Role.CLIENT, sys.stderr):
            return 130
        model_id = await node.resolve_model(BUILTIN_REFS.get(name, name), wait_s=args.wait_s)
        with trio.move_on_after(args.wait_s):
            while not await node.find_workers(model_id, use_dht=False):
                await trio.sleep(0.1)
        if args.task == "embed":
            r = await node.infer(
                model_id, texts=tuple(args.text), max_price_nanoton=cfg.max_price_nanoton, require_tee=cfg.require_tee
            )
            emb = to_numpy(r.output())
            for text, row in zip(args.text, emb, strict=True):
                print(f"{text[:40]!r}: [{', '.join(f'{v:.4f}' for v in row[:4])}, ...] ({len(row)} dims)")
        else:
            prompt = chatml_prompt([{"role": "user", "content": " ".join(args.text)}])
            result = None
            async for item in node.generate(
                model_id,
                prompt,
                max_tokens=args.max_tokens,
                max_price_nanoton=cfg.max_price_nanoton,
                require_tee=cfg.require_tee,
            ):
                if isinstance(item, InferenceResult):
                    result = item
                else:
                    print(item.text, end="", flush=True)
            print()
            assert result is not None
            r = result
        await node.flush_payments()  # its voucher is logged before the result is printed
        # the verdict that admitted the worker still stands: this asks nobody
        attested = attest.verdict_summary(await node.check_attestation(r.worker)) if cfg.require_tee else None
        if pay is not None and args.settle:
            settled = await pay.settle(r.worker)
            logs.say_err(
                f"channel closed on chain: {settled} nanoton to the worker", fields(peer=r.worker, nanoton=settled)
            )
            for channel, how in (await pay.watch_once()).items():  # closes a restart left unfinished
                logs.say_err(f"channel {channel}: {how}", fields(channel=channel))
    logs.say_err(
        f"served by {_pid(r.worker)}: {_bill(r)} = {r.cost_nanoton} nanoton, "
        f"{r.latency_s * 1000:.0f} ms, {r.attempts} attempt(s)",
        fields(peer=r.worker, nanoton=r.cost_nanoton),
    )
    if attested is not None:
        logs.say_err(f"attested {attested}", fields(peer=r.worker))
    return 0


async def run_find(cfg: config_mod.RoleConfig, model: str, wait_s: float, as_json: bool) -> int:
    async with Node(_node_config(cfg)) as node:
        await trio.sleep(wait_s)
        if Path(model).is_file():
            model_id = model_id_of(Path(model))
        else:  # a name as workers announce it (or a hex id): the DHT is asked by id
            try:
                model_id = await node.resolve_model(BUILTIN_REFS.get(model, model))
            except JobFailed:
                logs.say_err(f"no worker announces {model!r}", fields(model=model), level=logging.WARNING)
                return 1
        workers = await node.find_workers(model_id)
    if as_json:
        rows = [
            {
                "peer_id": _pid(w.peer_id),
                "addrs": list(w.addrs),
                "price_nanoton": w.price_nanoton,
                "completion_price_nanoton": w.price.completion,
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
            print(f"  {_pid(w.peer_id)}  {w.price.label(w.unit)}  free={w.free_capacity}  via {via}")
    return 0 if workers else 1


def _bill(r: InferenceResult) -> str:
    """What a result was billed: units x price, generated tokens at their own price."""
    prompt = f"{r.usage_units - r.completion_units} units x {r.price_nanoton}"
    return f"{prompt} + {r.completion_units} generated x {r.completion_price_nanoton}" if r.completion_units else prompt


def _pid(peer_id: bytes) -> str:
    from cocoon_p2p.core.identity import peer_id_to_str

    return peer_id_to_str(peer_id)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A CocoonError (a damaged or exposed file, a bad flag, a chain that
    cannot be reached) is printed as one line and exits 2, never as a traceback, also when
    trio delivers it inside exception groups."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except CocoonError as exc:
        logs.say_err(f"cocoon-node: {exc}", level=logging.ERROR)
        return 2
    except BaseExceptionGroup as group:
        errors = _cocoon_errors(group)
        if errors is None:
            raise
        for error in errors:
            logs.say_err(f"cocoon-node: {error}", level=logging.ERROR)
        return 2
    except KeyboardInterrupt:
        return 130


def _cocoon_errors(group: BaseExceptionGroup[BaseException]) -> list[CocoonError] | None:
    """The errors in ``group`` if every one of them is a CocoonError, else None."""
    matched, rest = group.split(CocoonError)
    if matched is None or rest is not None:
        return None
    out: list[CocoonError] = []
    stack: list[BaseException] = [matched]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        elif isinstance(exc, CocoonError):
            out.append(exc)
    return out


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        ident = load_or_create_identity(args.data_dir / KEY_FILE)
        print(ident.peer_id_str)
        return 0
    if args.command == "demo":
        return demo.run(args)
    if args.command == "attest":
        return attest.run(args)
    if args.command == "status":
        info = status_mod.collect(args.data_dir, args.metrics_url, testnet=args.testnet)
        print(json.dumps(info, indent=2)) if args.json else status_mod.print_status(info)
        return 0
    overrides: dict[str, Any] = {k: getattr(args, k, None) for k in config_mod.RoleConfig.__dataclass_fields__}
    cfg = config_mod.role_defaults(config_mod.load(args.config, overrides), args.command)
    logs.setup(cfg.log_level, cfg.log_json)
    if args.command == "wallet" and args.action == "show" and (cfg.data_dir / "wallet.json").is_file():
        return walletcli.run(cfg, args.action, args.json)  # only reads: works beside a running node
    with datadir.locked(cfg.data_dir):
        if args.command == "wallet":  # creates the wallet, or deploys it (its seqno is the node's too)
            return walletcli.run(cfg, args.action, args.json)
        return _run_role(args, cfg)


def _run_role(args: argparse.Namespace, cfg: config_mod.RoleConfig) -> int:
    if args.command == "find":
        return trio.run(run_find, cfg, args.model, args.wait_s, args.json)
    if args.command == "client":
        return trio.run(run_client, cfg, args)
    if args.command == "gateway":
        # Models by name are resolved on the network per request (no export, no torch); a
        # model file given by path is hashed here and offered under its own name.
        names = cfg.models or ["minilm", "smollm2"]
        files = [GatewayModel.of(load_model(Path(m))) for m in names if Path(m).is_file()]
        aliases = {m: BUILTIN_REFS.get(m, m) for m in names if not Path(m).is_file()}
        trio.run(run_gateway, cfg, files, aliases)
        return 0
    models = [resolve_model(m) for m in (cfg.models if args.command == "worker" else [])]
    trio.run(run_peer, cfg, models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
