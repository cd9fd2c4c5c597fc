"""The ``cocoon-node`` command line: its parser (every subcommand's flags), and the
settings the parsed flags make: the :class:`~cocoon_p2p.node.NodeConfig` and the
:class:`~cocoon_p2p.payments.service.PaymentConfig` (with the node's wallet).

Flags and TOML keys share their names (:mod:`.config` merges them into a
:class:`~.config.RoleConfig`); an on/off flag takes ``--no-`` too and defaults to
None, so that only a flag given on the command line overrides the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cocoon_p2p import __version__
from cocoon_p2p.execution.backends import BACKENDS
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2, ensure_smollm2_q4
from cocoon_p2p.jobs.spotcheck import SpotCheckPolicy
from cocoon_p2p.node import NodeConfig
from cocoon_p2p.payments.chain import TonCenter, Wallet
from cocoon_p2p.payments.service import PaymentConfig
from cocoon_p2p.payments.settlement import SettlementPolicy
from cocoon_p2p.payments.wallet import WalletVersion
from cocoon_p2p.testing.localchain import LocalChain
from cocoon_p2p.transport.limits import ResourceLimits
from cocoon_p2p.transport.relay import RelaySettings, ReserveMode

from . import attest, demo, enginecli, funding, gatewaycli, walletcli
from . import config as config_mod

__all__ = [
    "BUILTIN_MODELS",
    "DESCRIPTION",
    "KEY_FILE",
    "build_parser",
    "node_config",
    "payment_config",
    "spot_check_policy",
]

DESCRIPTION = "``cocoon-node``: run cocoon peers from the command line."  # as nodes/cli.py's docstring begins
KEY_FILE = "node.key"
FAUCET_NANOTON = 2_000_000_000  # what the local chain's faucet gives a node's wallet
BUILTIN_MODELS = {"minilm": ensure_minilm, "smollm2": ensure_smollm2, "smollm2-q4": ensure_smollm2_q4}


def _switch(p: argparse.ArgumentParser, flag: str, text: str) -> None:
    """An on/off flag (``--x`` / ``--no-x``); unset, it is None and the config or the role decides."""
    p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)


def _payments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chain", help="toncenter v2 endpoint for payments (default: no payments, or testnet's)")
    p.add_argument("--chain-api-key", help="toncenter API key (visible in ps: prefer $COCOON_CHAIN_API_KEY)")
    p.add_argument("--chain-api-key-file", metavar="FILE", help="a file holding the toncenter API key")
    _switch(
        p,
        "--settle-on-exit",
        "worker: close channels holding earnings on chain when stopping (default: yes; "
        "--no-settle-on-exit for a plain restart, which then pays no fees)",
    )
    p.add_argument("--local-chain", action="store_true", default=None, help="the chain is the local test chain")
    p.add_argument(
        "--testnet",
        action="store_true",
        default=None,
        help=f"TON testnet: pay through {config_mod.TESTNET_CHAIN} unless --chain says otherwise",
    )
    p.add_argument(
        "--funding-timeout-s", type=float, help="give up if the wallet is not funded in time (default: wait)"
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file for this role (flags override it)")
    p.add_argument(
        "--data-dir", type=Path, help="keys, channel states and caches (default $COCOON_DATA_DIR, else ./cocoon-data)"
    )
    p.add_argument("--listen", action="append", metavar="MULTIADDR", help="address to listen on (repeatable)")
    p.add_argument("--announce", action="append", metavar="MULTIADDR", help="address to advertise (repeatable)")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="peer to join through (repeatable)")
    _nat(p)
    p.add_argument("--log-json", action="store_true", default=None, help="JSON log lines")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    p.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus /metrics there (e.g. 127.0.0.1:9100)")


def _spot_checks(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--spot-check-rate",
        type=float,
        metavar="R",
        help="re-run this share of results (0..1) on another worker and compare; a worker caught wrong "
        "is not paid for that job and is banned (default 0: none)",
    )
    p.add_argument(
        "--spot-check-cosine-min",
        type=float,
        metavar="C",
        help="two float results agree when every row's cosine similarity reaches C (default 0.999)",
    )


def _nat(p: argparse.ArgumentParser) -> None:
    """How a node finds peers and is reached behind a NAT (each also a TOML key)."""
    _switch(p, "--mdns", "find peers on the local network with mDNS (default on, unless listening on loopback only)")
    _switch(
        p,
        "--relay-service",
        "relay connections for peers behind NATs (Circuit Relay v2; default: bootstrap peers do)",
    )
    p.add_argument(
        "--reserve-relay",
        choices=config_mod.RESERVE_MODES,
        help="hold relay slots and announce relayed addresses (default auto for a worker: when "
        "AutoNAT finds it not reachable directly; never for other roles)",
    )
    p.add_argument(
        "--relay",
        action="append",
        dest="relays",
        metavar="MULTIADDR",
        help="a relay to reserve slots with (repeatable; default: the bootstrap peers)",
    )
    _switch(p, "--hole-punch", "upgrade relayed connections to direct ones (DCUtR; default on)")


def build_parser() -> argparse.ArgumentParser:
    """``cocoon-node``'s parser: every subcommand and its flags."""
    parser = argparse.ArgumentParser(prog="cocoon-node", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create (or show) this node's persistent identity")
    p.add_argument("--data-dir", type=Path, default=config_mod.default_data_dir())

    p = sub.add_parser("bootstrap", help="run a bootstrap peer (DHT server, gossip relay)")
    _common(p)

    p = sub.add_parser("worker", help="run a worker that advertises models")
    _common(p)
    p.add_argument(
        "--model",
        action="append",
        dest="models",
        help=f"ONNX file to serve, or a built-in model: {', '.join(BUILTIN_MODELS)} (repeatable)",
    )
    p.add_argument("--backend", choices=BACKENDS, help="execution backend (default auto: TensorRT if present)")
    p.add_argument("--price-nanoton", type=int, help="price per unit of work (a prompt token, for generation)")
    p.add_argument("--completion-price-nanoton", type=int, help="price per generated token (default: --price-nanoton)")
    p.add_argument("--capacity", type=int, help="jobs run at once; more are refused as busy")
    p.add_argument("--jobs-per-client", type=int, help="jobs one client may run at once (default: capacity)")
    _payments(p)
    p.add_argument("--announce-interval-s", type=float, help="seconds between announcements")
    p.add_argument(
        "--cheat-rate",
        type=float,
        metavar="R",
        help="adversarial testing only: return wrong results on this share of model runs",
    )
    attest.add_worker_flags(p)
    enginecli.add_worker_flags(p)

    p = sub.add_parser("client", help="run one job on the network and print what it cost")
    _common(p)
    p.add_argument("task", choices=["embed", "chat"], help="embed texts (MiniLM) or chat (SmolLM2)")
    p.add_argument("text", nargs="+", help="texts to embed, or the chat prompt")
    p.add_argument(
        "--model",
        dest="job_model",
        help="a model as workers announce it (name, name:variant, name@<id prefix>), its id (64 hex digits) "
        "or a built-in name (default: by task); resolved on the network, no local copy needed",
    )
    p.add_argument("--max-price-nanoton", type=int, help="most to pay per unit (default 10000)")
    p.add_argument("--max-tokens", type=int, default=128, help="chat: tokens to generate at most")
    p.add_argument("--wait-s", type=float, default=15.0, help="seconds to wait for a worker to appear")
    _payments(p)
    p.add_argument("--settle", action="store_true", help="close the payment channels after the job")
    _spot_checks(p)
    attest.add_client_flags(p)

    p = sub.add_parser("gateway", help="serve an OpenAI-compatible HTTP API that runs requests as paid jobs")
    _common(p)
    p.add_argument("--http", metavar="HOST:PORT", help="where the API listens (default 127.0.0.1:8080)")
    p.add_argument(
        "--model", action="append", dest="models", help="built-in model name to offer (default: minilm, smollm2)"
    )
    p.add_argument("--max-price-nanoton", type=int, help="most to pay per unit (default 10000)")
    gatewaycli.add_gateway_flags(p)
    _payments(p)
    _spot_checks(p)
    attest.add_client_flags(p)

    walletcli.add_parser(sub, _payments)

    p = sub.add_parser("status", help="show a node's identity, wallet, channels and earnings (and live metrics)")
    p.add_argument("--data-dir", type=Path, default=config_mod.default_data_dir())
    p.add_argument(
        "--metrics",
        "--metrics-url",
        dest="metrics_url",
        metavar="URL",
        help="a running node's /metrics URL, e.g. http://127.0.0.1:9100/metrics",
    )
    p.add_argument("--testnet", action="store_true", help="show the wallet address with the testnet flag")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("find", help="list the workers that serve a model")
    _common(p)
    p.add_argument(
        "model",
        help="a model as workers announce it (name, name:variant, name@<id prefix>), its id (64 hex digits), "
        "the path of its file, or a built-in name",
    )
    p.add_argument("--wait-s", type=float, default=3.0, help="seconds to listen to gossip first")
    p.add_argument("--json", action="store_true", help="print JSON")

    attest.add_parser(sub)
    demo.add_parser(sub)
    return parser


def payment_config(cfg: config_mod.RoleConfig, role: funding.Role) -> PaymentConfig | None:
    """The node's wallet (data-dir/wallet.json) on the configured chain; on the local
    chain the faucet funds it with what ``role`` needs (unless ``local_chain_faucet`` is
    off). Elsewhere it is funded by its operator: see :func:`.funding.fund_wallet`."""
    if not cfg.chain:
        return None
    key = cfg.chain_api_key or None
    chain: TonCenter = LocalChain(cfg.chain, api_key=key) if cfg.local_chain else TonCenter(cfg.chain, api_key=key)
    wallet = Wallet.load_or_create(
        cfg.data_dir / "wallet.json", version=WalletVersion(cfg.wallet_version), testnet=cfg.testnet
    )
    if isinstance(chain, LocalChain) and cfg.local_chain_faucet:
        # top_up refills below half of what it gives: give twice the need, so it is always met
        need = funding.required_nanoton(role, cfg.deposit_nanoton)
        chain.top_up(wallet, max(FAUCET_NANOTON, 2 * need))
    policy = SettlementPolicy(
        deposit_nanoton=cfg.deposit_nanoton,
        settle_above_nanoton=cfg.settle_above_nanoton or None,
        idle_close_s=cfg.idle_close_s,
        close_on_shutdown=cfg.settle_on_exit,
    )
    return PaymentConfig(
        chain,
        wallet,
        cfg.data_dir / "payments",
        policy=policy,
        credit_nanoton=cfg.credit_nanoton,
        quarantine_s=cfg.quarantine_s,
        watch_interval_s=cfg.watch_interval_s,
        pay_linger_s=cfg.pay_linger_s,
    )


def node_config(cfg: config_mod.RoleConfig, payments: PaymentConfig | None = None) -> NodeConfig:
    """The node ``cfg`` describes (``payments``: its wallet and chain, None: unpaid)."""
    return NodeConfig(
        payments=payments,
        key_file=cfg.data_dir / KEY_FILE,
        listen_addrs=cfg.listen,
        announce_addrs=cfg.announce,
        bootstrap=cfg.bootstrap,
        mdns=bool(cfg.mdns),
        relay=RelaySettings(
            serve=bool(cfg.relay_service),
            reserve=ReserveMode(cfg.reserve_relay or "never"),
            relays=tuple(cfg.relays),
            hole_punch=cfg.hole_punch,
            max_reservations=cfg.relay_max_reservations,
            circuit_s=cfg.relay_circuit_s,
            circuit_bytes=cfg.relay_circuit_bytes,
        ),
        announce_interval_s=cfg.announce_interval_s,
        announce_ttl_s=max(5 * cfg.announce_interval_s, 15.0),  # outlives a busy machine's delays
        job_capacity=cfg.capacity,
        jobs_per_client=cfg.jobs_per_client or None,
        limits=ResourceLimits(
            max_pending_handshakes=cfg.max_pending_handshakes,
            max_connections_per_ip=cfg.max_connections_per_ip,
            max_connections_per_peer=cfg.max_connections_per_peer,
            max_inbound_streams_per_peer=cfg.max_inbound_streams_per_peer,
        ),
        tee=attest.worker_attestation(cfg),
        attestation=attest.client_attestation(cfg),
        spot_checks=spot_check_policy(cfg),
    )


def spot_check_policy(cfg: config_mod.RoleConfig) -> SpotCheckPolicy | None:
    """The client's spot checks as configured (None when ``spot_check_rate`` is 0)."""
    if cfg.spot_check_rate <= 0:
        return None
    return SpotCheckPolicy(rate=cfg.spot_check_rate, cosine_min=cfg.spot_check_cosine_min)
