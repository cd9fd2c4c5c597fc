"""Role configuration: a TOML file, overridden by command-line flags."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.jobs.spotcheck import DEFAULT_COSINE_MIN

# Workers and bootstrap peers wait to be dialed: a fixed port on every interface (kubo's
# 4001), so a router can forward it and a NAT keeps it; other roles dial out: any port.
PUBLIC_PORT = 4001
LISTEN_ENV = "COCOON_LISTEN"  # listen addresses (space-separated) when neither flag nor file names one
RESERVE_MODES = ("auto", "always", "never")
WALLET_VERSIONS = ("v4r2", "v5r1")
DEFAULT_DATA_DIR = "cocoon-data"
CONFIG_FILE = "config.toml"  # read from the data directory when no other file is named
DATA_DIR_ENV, CONFIG_ENV = "COCOON_DATA_DIR", "COCOON_CONFIG"
CHAIN_KEY_ENV, ENGINE_KEY_ENV = "COCOON_CHAIN_API_KEY", "COCOON_ENGINE_API_KEY"
# toncenter's public testnet endpoint, whose v2 API is under /api/v2 (TonCenter adds that part).
TESTNET_CHAIN = "https://testnet.toncenter.com"


@dataclass
class RoleConfig:
    """Settings common to every role, plus the worker's offer."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    listen: list[str] = field(default_factory=list)  # empty: the role's default (role_defaults)
    announce: list[str] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)
    log_json: bool = False
    log_level: str = "INFO"
    metrics: str = ""  # HOST:PORT for a Prometheus /metrics endpoint (empty: none)
    # NAT traversal. relay_service: relay for others (None: bootstrap peers do); reserve_relay:
    # hold relay slots and announce relayed addresses ("auto": a worker does when AutoNAT does
    # not find it reachable; empty: the role's default); relays: whom to ask (empty: the
    # bootstrap peers); hole_punch: upgrade relayed connections with DCUtR. A relay's limits:
    # slots it keeps, and how long and how much one circuit may carry.
    relay_service: bool | None = None
    mdns: bool | None = None  # find peers on the LAN (None: yes, unless every listen address is loopback)
    reserve_relay: str = ""
    relays: list[str] = field(default_factory=list)
    hole_punch: bool = True
    relay_max_reservations: int = 128
    relay_circuit_s: int = 3600
    relay_circuit_bytes: int = 256 << 20
    http: str = "127.0.0.1:8080"  # gateway: where the OpenAI-compatible API listens
    max_price_nanoton: int = 10_000  # client, gateway: the most paid per unit of work
    announce_interval_s: float = 10.0
    models: list[str] = field(default_factory=list)  # ONNX paths or built-in names
    price_nanoton: int = 1000  # worker: per unit (a row, an embedded token, a prompt token)
    completion_price_nanoton: int | None = None  # worker: per generated token (None: price_nanoton)
    capacity: int = 8
    jobs_per_client: int = 0  # worker: jobs one client may run at once (0: up to capacity)
    # What one peer or address may hold open (cocoon_p2p.transport.limits.ResourceLimits).
    max_pending_handshakes: int = 128
    max_connections_per_ip: int = 64
    max_connections_per_peer: int = 3
    max_inbound_streams_per_peer: int = 256
    backend: str = "auto"
    # Payments: a toncenter v2 endpoint (empty: no payments, unless testnet). local_chain: it
    # is the local test chain, whose faucet funds this node's wallet (unless local_chain_faucet
    # is false: then the node waits to be funded, as on TON).
    chain: str = ""
    chain_api_key: str = ""
    chain_api_key_file: str = ""  # the key in a file (first line), not on a command line where ps shows it
    local_chain: bool = False
    local_chain_faucet: bool = True
    testnet: bool = False  # TON testnet: its toncenter unless chain is set; testnet-flagged addresses
    wallet_version: str = "v4r2"  # a new wallet's contract ("v4r2" or "v5r1"); an existing one keeps its own
    funding_timeout_s: float = 0.0  # how long to wait for the wallet to be funded (0: no limit)
    deposit_nanoton: int = 500_000_000  # client: each channel's deposit
    credit_nanoton: int = 100_000_000  # worker: what a client may owe before its jobs are refused
    settle_above_nanoton: int = 0  # worker: close a channel holding this much unsettled (0: no limit)
    idle_close_s: float = 86400.0  # worker: close a channel whose payer is silent this long
    quarantine_s: int = 3600  # client: the channels' uncooperative-close quarantine
    pay_linger_s: float = 0.2  # client: finished jobs gather this long before one voucher pays them (0: one each)
    watch_interval_s: float = 10.0  # how often channels are checked on chain
    # Worker, on SIGINT/SIGTERM: how long running jobs may take to finish, whether channels
    # holding earnings are then closed on chain (false: a plain restart pays no fees; the
    # earnings stay safe in the data directory), and how long closing them may take.
    drain_s: float = 10.0
    settle_on_exit: bool = True
    settle_timeout_s: float = 30.0
    # Attestation (Intel TDX). Worker: where its quotes come from ("configfs-tsm", "dstack",
    # "file:<path>"; empty: it claims no TEE), how long one stands, and Intel's collateral to
    # send along (one file, or a PCCS). Client, gateway: require_tee, the policy to judge
    # workers by (empty: TDX, UpToDate, no debug, any image), and collateral to judge with
    # (files: an offline bundle; pccs_url: fetched; also the worker's own copy).
    tee: str = ""
    tee_lifetime_s: float = 3600.0
    tee_collateral: list[str] = field(default_factory=list)
    pccs_url: str = ""
    require_tee: bool = False
    tee_policy: str = ""
    # Client, gateway: re-run this share of results on another worker and compare (0: none);
    # float outputs agree when every row's cosine reaches spot_check_cosine_min.
    spot_check_rate: float = 0.0
    spot_check_cosine_min: float = DEFAULT_COSINE_MIN
    # Worker, adversarial testing only: return wrong results on this share of model runs.
    cheat_rate: float = 0.0
    # Gateway: its API keys, one per line (also COCOON_API_KEYS); without keys it listens
    # only on loopback, unless told insecure_no_auth.
    api_key_file: str = ""
    insecure_no_auth: bool = False
    # Worker in front of an OpenAI-compatible engine (nodes/enginecli.py): its /v1 URL (empty:
    # none), its models as NAME=WEIGHTS (with an engine, ``models`` are taken as these), its
    # jobs at once, its kind ("auto": from /v1/models), API key, context (0: what it says, else
    # 2048), GPU (for the offer), and its health checks (down after that many failures in a row).
    engine: str = ""
    engine_models: list[str] = field(default_factory=list)
    engine_capacity: int = 4
    engine_kind: str = "auto"
    engine_api_key: str = ""
    engine_context: int = 0
    engine_gpu: str = ""
    engine_health_interval_s: float = 5.0
    engine_health_failures: int = 3


def default_data_dir(env: Mapping[str, str] = os.environ) -> Path:
    """``$COCOON_DATA_DIR``, else ``./cocoon-data``."""
    return Path(env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def load(path: Path | None, overrides: dict[str, Any], env: Mapping[str, str] = os.environ) -> RoleConfig:
    """Read the config file and apply the non-empty ``overrides`` (flags).

    The file: ``path`` (``--config``), else ``$COCOON_CONFIG``, else ``<data-dir>/config.toml``
    when there is one. The data directory: the flag, else ``$COCOON_DATA_DIR``, else the
    file's ``data_dir``, else ``./cocoon-data``. The chain's API key: the flag or file's
    ``chain_api_key``, else ``$COCOON_CHAIN_API_KEY``, else the file ``chain_api_key_file``
    names (a flag shows in ``ps``: prefer the other two); the engine's: ``engine_api_key``,
    else ``$COCOON_ENGINE_API_KEY``."""
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    if path is None:
        beside = Path(overrides.get("data_dir") or default_data_dir(env)) / CONFIG_FILE
        path = beside if beside.is_file() else None
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    known = set(RoleConfig.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config keys in {path}: {', '.join(sorted(unknown))}")
    if env.get(DATA_DIR_ENV):
        values["data_dir"] = env[DATA_DIR_ENV]
    for key, value in overrides.items():
        if value not in (None, [], ()):
            values[key] = value
    for key, value in values.items():
        values[key] = _typed(key, value, RoleConfig.__dataclass_fields__[key].type)
    cfg = RoleConfig(**values)
    cfg.data_dir = Path(cfg.data_dir)
    if cfg.testnet and not cfg.chain:
        cfg.chain = TESTNET_CHAIN
    cfg.models = [str(m) for m in cfg.models]
    if cfg.engine and not cfg.engine_models:  # beside an engine, --model NAME=WEIGHTS names its models
        cfg.engine_models, cfg.models = cfg.models, []
    cfg.engine_models = [str(m) for m in cfg.engine_models]
    for key in ("engine_capacity", "engine_health_failures"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, not {getattr(cfg, key)}")
    # One file reads naturally as a string in TOML; the client side takes several.
    collateral: Any = cfg.tee_collateral
    cfg.tee_collateral = [str(collateral)] if isinstance(collateral, str | Path) else [str(c) for c in collateral]
    if cfg.tee_policy:
        cfg.tee_policy = str(cfg.tee_policy)
    _check_range(cfg)
    cfg.chain_api_key = cfg.chain_api_key or env.get(CHAIN_KEY_ENV, "") or _secret(cfg.chain_api_key_file)
    cfg.engine_api_key = cfg.engine_api_key or env.get(ENGINE_KEY_ENV, "")
    return cfg


def role_defaults(cfg: RoleConfig, role: str, env: Mapping[str, str] = os.environ) -> RoleConfig:
    """Fill in what depends on the role (``worker``, ``bootstrap``, ``gateway``...): the
    listen addresses (``$COCOON_LISTEN`` when neither flag nor file names one), whether
    it relays for others (bootstrap peers do) and whether it reserves relay slots
    (workers do when not reachable directly)."""
    if not cfg.listen:
        waits = role in ("worker", "bootstrap")
        cfg.listen = (
            env[LISTEN_ENV].split() if env.get(LISTEN_ENV) else [f"/ip4/0.0.0.0/tcp/{PUBLIC_PORT if waits else 0}"]
        )
    if cfg.relay_service is None:
        cfg.relay_service = role == "bootstrap"
    if cfg.mdns is None:
        cfg.mdns = not all("/127.0.0.1/" in a or "/::1/" in a for a in cfg.listen)
    if not cfg.reserve_relay:
        cfg.reserve_relay = "auto" if role == "worker" else "never"
    if cfg.wallet_version not in WALLET_VERSIONS:
        raise ConfigError(f"wallet_version must be one of {', '.join(WALLET_VERSIONS)}, not {cfg.wallet_version!r}")
    if cfg.reserve_relay not in RESERVE_MODES:
        raise ConfigError(f"reserve_relay must be one of {', '.join(RESERVE_MODES)}, not {cfg.reserve_relay!r}")
    return cfg


def _secret(path: str) -> str:
    """The first line of the file ``path`` (empty: no file); ConfigError if it cannot be read."""
    if not path:
        return ""
    try:
        return Path(path).read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise ConfigError(f"cannot read a key from {path}: {exc or 'it is empty'}") from exc


def _is_strings(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list | tuple) and all(isinstance(x, str | Path) for x in v))


# An annotation of RoleConfig -> (what a value must be, said in words; whether it is).
_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool)),
    "str": ("a string", lambda v: isinstance(v, str)),
    "Path": ("a path (a string)", lambda v: isinstance(v, str | Path)),
    "list[str]": ("a string or a list of strings", _is_strings),
}


def _typed(key: str, value: Any, annotation: object) -> Any:
    """``value`` as the field ``key`` (annotated ``annotation``) takes it, or ConfigError
    naming the key, the type expected and the value found: a wrong type caught at load,
    not as a traceback later (``capacity = "8"``)."""
    optional = str(annotation).endswith(" | None")
    if value is None and optional:
        return None
    kind = str(annotation).removesuffix(" | None")
    words, fits = _TYPES[kind]
    if not fits(value):
        raise ConfigError(f"{key} must be {words}, not {value!r} ({type(value).__name__})")
    if kind == "float":
        return float(value)
    if kind == "list[str]":
        return [str(value)] if isinstance(value, str) else [str(x) for x in value]
    return value


def _check_range(cfg: RoleConfig) -> None:
    """Shares and the payment linger (s) within [0, 1], a cosine within [-1, 1]: ConfigError
    naming the key if not."""
    keys = (("spot_check_rate", 0.0), ("spot_check_cosine_min", -1.0), ("cheat_rate", 0.0), ("pay_linger_s", 0.0))
    for key, low in keys:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= 1.0:
            raise ConfigError(f"{key} must be a number within [{low:g}, 1], not {value!r}")
        setattr(cfg, key, float(value))
