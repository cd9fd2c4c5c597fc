"""A worker in front of an OpenAI-compatible engine: ``cocoon-node worker --engine URL --model NAME=WEIGHTS``.

The engine (vLLM, SGLang, TensorRT-LLM's ``trtllm-serve``, llama.cpp) runs the model;
the worker serves it over ``/cocoon/job/1`` under the id of the weights the operator
names (:mod:`cocoon_p2p.execution.weights`), advertises it with its engine and
variant, and stops advertising it while the engine is down. The same settings are
TOML keys: ``engine``, ``engine_models`` (or ``models`` beside ``engine``),
``engine_capacity``, ``engine_kind``, ``engine_api_key``, ``engine_context``,
``engine_gpu``, ``engine_health_interval_s``, ``engine_health_failures``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.pricing import Price
from cocoon_p2p.execution.engine import EngineError, EngineKind, offer_backend
from cocoon_p2p.execution.engine_http import HttpEngine
from cocoon_p2p.execution.engine_runner import EngineRunner, ListedModel, list_models
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.weights import Weights, identify_weights
from cocoon_p2p.jobs.worker import EngineWatch
from cocoon_p2p.node import ModelCapability, Node, advertised, default_catalog

from . import config as config_mod
from . import logs

DEFAULT_CONTEXT = 2048  # tokens, when the engine does not say (llama.cpp's default n_ctx)
WEIGHTS_CACHE = "weights-ids.json"  # under the data dir: digests by (path, size, mtime, inode, ctime)


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """The worker's engine flags (each also a TOML key)."""
    p.add_argument(
        "--engine",
        metavar="URL",
        help="front an OpenAI-compatible engine at URL (e.g. http://127.0.0.1:8000/v1); each --model is then "
        "NAME=WEIGHTS: the engine's model name and its GGUF file or safetensors folder (the id is their digest)",
    )
    p.add_argument("--engine-capacity", type=int, help="engine jobs at once; more are refused as busy (default 4)")
    p.add_argument(
        "--engine-kind",
        choices=["auto", *(k.value for k in EngineKind)],
        help="which engine it is (default auto: from its /v1/models)",
    )


@dataclass(frozen=True)
class EngineModel:
    """One ``NAME=WEIGHTS`` the operator named."""

    name: str
    weights: Path

    @classmethod
    def parse(cls, text: str) -> EngineModel:
        name, eq, path = text.partition("=")
        if not eq or not name.strip() or not path.strip():
            raise ConfigError(f"an engine model is NAME=WEIGHTS (a GGUF file or safetensors folder), not {text!r}")
        return cls(name.strip(), Path(path.strip()).expanduser())


@dataclass(frozen=True)
class EngineOffer:
    """An engine model as served: what runs it and what is advertised."""

    runner: EngineRunner
    weights: Weights
    capability: ModelCapability


def transport(cfg: config_mod.RoleConfig) -> HttpEngine:
    return HttpEngine(cfg.engine, api_key=cfg.engine_api_key)


def prepare(cfg: config_mod.RoleConfig, *, capacity: int) -> list[EngineOffer]:
    """Check the engine lists every model named, hash their weights (cached) and build
    their offers. ConfigError (a clear message) when the engine cannot be reached or
    does not list a model. BLOCKING (hashing)."""
    engine = transport(cfg)
    try:
        listed = {m.id: m for m in list_models(engine, timeout_s=10.0)}
    except EngineError as exc:
        raise ConfigError(f"the engine at {cfg.engine} cannot be asked for its models: {exc}") from exc
    offers = []
    for text in cfg.engine_models:
        model = EngineModel.parse(text)
        if model.name not in listed:
            raise ConfigError(
                f"the engine at {cfg.engine} does not serve {model.name!r} (it lists: {', '.join(sorted(listed))})"
            )
        weights = identify_weights(model.weights, cache_file=cfg.data_dir / WEIGHTS_CACHE)
        offers.append(_offer(cfg, engine, model, listed[model.name], weights, capacity))
    return offers


def _offer(
    cfg: config_mod.RoleConfig,
    engine: HttpEngine,
    model: EngineModel,
    listed: ListedModel,
    weights: Weights,
    capacity: int,
) -> EngineOffer:
    try:
        kind = EngineKind.from_owner(listed.owned_by) if cfg.engine_kind == "auto" else EngineKind(cfg.engine_kind)
    except ValueError as exc:
        kinds = ", ".join(k.value for k in EngineKind)
        raise ConfigError(f"engine_kind is auto or one of {kinds}, not {cfg.engine_kind!r}") from exc
    spec = ModelSpec(
        name=model.name,
        path=weights.path,
        model_id=weights.model_id,
        kind="generation",
        max_batch=capacity,
        max_context=cfg.engine_context or listed.max_model_len or DEFAULT_CONTEXT,
    )
    spec = replace(spec, public_name=model.name, variant=weights.variant)
    runner = EngineRunner(spec, engine, name=model.name, kind=kind)
    capability = ModelCapability(
        model_id=weights.model_id,
        backend=offer_backend(kind, weights.variant),
        gpu=cfg.engine_gpu or "unknown",
        max_batch=capacity,
        price_nanoton=cfg.price_nanoton,
        completion_price_nanoton=cfg.completion_price_nanoton,
        unit=spec.unit,
        capacity=capacity,
        limits=advertised(runner.limits),
        catalog=default_catalog(spec),
    )
    return EngineOffer(runner, weights, capability)


def serve(node: Node, offer: EngineOffer, cfg: config_mod.RoleConfig) -> None:
    """Serve one engine model on ``node`` and advertise it; withdrawn while its engine is down."""
    watch = EngineWatch(cfg.engine_health_interval_s, cfg.engine_health_failures)
    node.serve_engine(offer.runner, offer.capability, watch=watch)


async def serve_engines(node: Node, cfg: config_mod.RoleConfig) -> None:
    """Serve every engine model of ``cfg`` on ``node`` (nothing without ``engine``),
    printing a ``serving`` line for each, as other workers do."""
    if not cfg.engine:
        return
    capacity = min(cfg.engine_capacity, node.config.job_capacity)
    offers = await trio.to_thread.run_sync(lambda: prepare(cfg, capacity=capacity))
    for offer in offers:
        serve(node, offer, cfg)
        cap, spec = offer.capability, offer.runner.spec
        logs.say(
            f"serving {spec.id_hex} {spec.name} {cap.backend} "
            f"price={Price.of(cap.price_nanoton, cap.completion_price_nanoton).label(spec.unit)} "
            f"capacity={cap.capacity}",
            fields(peer=node.peer_id_str, model=spec.name),
        )
