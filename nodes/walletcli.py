"""``cocoon-node wallet``: the node's TON wallet, for its operator.

``show`` (the default) prints the address to fund (user-friendly, non-bounceable, with the
testnet flag on testnet: the form wallets and faucets expect for an account not deployed
yet) and the raw form; with a chain configured, also its balance and whether its contract
is deployed. ``deploy`` deploys the wallet contract once it holds enough for the fee (a
node does it by itself on its first payment; this is for operators who want it done
first). The wallet is created in ``<data-dir>/wallet.json`` (mode 0600) on first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cocoon_p2p.payments.addresses import friendly
from cocoon_p2p.payments.chain import Wallet
from cocoon_p2p.payments.toncenter import TonCenter
from cocoon_p2p.payments.wallet import WalletVersion
from cocoon_p2p.testing.localchain import LocalChain

from . import config as config_mod
from . import funding

DEPLOY_FEE_NANOTON = 50_000_000  # what a v4 wallet's deployment may cost, with margin


def add_parser(sub: Any, common: Any) -> None:
    """The ``wallet`` subcommand (``common`` adds the payment flags: chain, testnet, keys)."""
    p = sub.add_parser("wallet", help="show the node's TON wallet (address to fund, balance) or deploy it")
    p.add_argument("action", nargs="?", choices=("show", "deploy"), default="show")
    p.add_argument("--config", type=Path, help="TOML file (flags override it)")
    p.add_argument("--data-dir", type=Path, help="where wallet.json is (default $COCOON_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="print JSON")
    common(p)


def run(cfg: config_mod.RoleConfig, action: str, as_json: bool) -> int:
    """Show or deploy the wallet; 0, or 2 when ``deploy`` finds it unfunded."""
    wallet = Wallet.load_or_create(
        cfg.data_dir / "wallet.json", version=WalletVersion(cfg.wallet_version), testnet=cfg.testnet
    )
    out: dict[str, Any] = {
        "address_to_fund": friendly(wallet.address, testnet=cfg.testnet),
        "address_raw": wallet.address,
        "network": "testnet" if cfg.testnet else "local" if cfg.local_chain else "mainnet" if cfg.chain else None,
    }
    chain = _chain(cfg)
    if chain is not None:
        out["balance_nanoton"] = chain.balance(wallet.address)
        out["deployed"] = chain.state(wallet.address) == "active"
        if action == "deploy" and not out["deployed"]:
            if out["balance_nanoton"] < DEPLOY_FEE_NANOTON:
                out["error"] = funding.fund_line(out["address_to_fund"], DEPLOY_FEE_NANOTON, out["balance_nanoton"])
            else:
                wallet.deploy(chain)
                out["deployed"] = True
                out["balance_nanoton"] = chain.balance(wallet.address)
    elif action == "deploy":
        out["error"] = "deploy needs a chain: --chain URL, --testnet, or --local-chain"
    if as_json:
        print(json.dumps(out, indent=2))
    else:
        _print(out)
    return 2 if "error" in out else 0


def _chain(cfg: config_mod.RoleConfig) -> TonCenter | None:
    if not cfg.chain:
        return None
    key = cfg.chain_api_key or None
    return LocalChain(cfg.chain, api_key=key) if cfg.local_chain else TonCenter(cfg.chain, api_key=key)


def _print(out: dict[str, Any]) -> None:
    print(f"address   {out['address_to_fund']}  (fund this one; raw {out['address_raw']})")
    if "balance_nanoton" in out:
        state = "deployed" if out["deployed"] else "not deployed yet (it deploys on its first payment)"
        print(f"balance   {funding.format_ton(out['balance_nanoton'])} TON on {out['network']}, {state}")
    else:
        print("balance   (no chain given: --chain URL, --testnet or --local-chain)")
    if "error" in out:
        print(f"error     {out['error']}")
