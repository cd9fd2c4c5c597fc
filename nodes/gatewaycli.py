"""The gateway's own flags and how its options are built from flags, config and environment.

``--api-key-file PATH``: the API keys clients must present (one per line, ``#`` comments),
beside those of the environment variable ``COCOON_API_KEYS`` (comma separated).
``--insecure-no-auth``: serve a non-loopback address without keys (anyone who reaches the
gateway spends its node's money: said loudly at start). In a TOML config: ``api_key_file``
and ``insecure_no_auth``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cocoon_p2p.api.gateway import Gateway, GatewayModel
from cocoon_p2p.api.keys import ENV_VAR, ApiKeys, check_exposure, is_loopback
from cocoon_p2p.core.logfields import fields

from . import config as config_mod
from . import logs

if TYPE_CHECKING:
    from cocoon_p2p.node import Node


@dataclass(frozen=True)
class GatewayOptions:
    """What the gateway's flags decide: who may use it, and whether it may go without keys."""

    api_keys: ApiKeys
    insecure_no_auth: bool = False


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--api-key-file`` and ``--insecure-no-auth`` to the gateway's subcommand."""
    parser.add_argument(
        "--api-key-file",
        metavar="PATH",
        help=f"API keys clients must send as 'Authorization: Bearer KEY' (one per line; also ${ENV_VAR})",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="allow a non-loopback --http address without API keys (anyone reaching it spends your money)",
    )


def gateway_options(source: Any, environ: Mapping[str, str] | None = None) -> GatewayOptions:
    """The options of parsed flags or a role config (``api_key_file``, ``insecure_no_auth``;
    absent ones default), with the keys of ``environ`` (default: this process's)."""
    path = getattr(source, "api_key_file", None) or None
    keys = ApiKeys.load(Path(path) if path else None, environ)
    return GatewayOptions(keys, bool(getattr(source, "insecure_no_auth", False)))


def build_gateway(
    node: Node, models: Iterable[GatewayModel], cfg: config_mod.RoleConfig, aliases: Mapping[str, str] | None = None
) -> Gateway:
    """The gateway of a ``cocoon-node gateway`` role: ConfigError, before it listens, when
    ``cfg.http`` is not loopback and there are no keys (unless ``insecure_no_auth``)."""
    options = gateway_options(cfg)
    host = cfg.http.rpartition(":")[0]
    check_exposure(host, options.api_keys, insecure_no_auth=options.insecure_no_auth)
    if not options.api_keys and not is_loopback(host):
        logs.say_err(f"WARNING: --insecure-no-auth: the gateway on {host} takes requests from anyone who reaches "
                     "it, paid with this node's money", fields(addr=cfg.http), level=logging.WARNING)  # fmt: skip
    return Gateway(
        node,
        models,
        max_price_nanoton=cfg.max_price_nanoton,
        require_tee=cfg.require_tee,
        api_keys=options.api_keys,
        insecure_no_auth=options.insecure_no_auth,
        aliases=aliases,
    )
