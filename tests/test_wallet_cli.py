"""``cocoon-node wallet``: the address to fund, the balance, and deploying once funded, on
the local chain through the real CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cocoon_p2p.payments.chain import Wallet
from cocoon_p2p.testing.localchain import open_local_chain

CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli", "wallet"]
TON = 1_000_000_000


def _wallet(*args: str) -> tuple[int, dict[str, Any]]:
    out = subprocess.run([*CLI, *args, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 2), out.stderr[-2000:]
    return out.returncode, json.loads(out.stdout)


def test_without_a_chain_it_shows_the_address_to_fund(tmp_path: Path) -> None:
    rc, shown = _wallet("--data-dir", str(tmp_path))
    assert rc == 0 and shown["address_to_fund"].startswith("UQ")  # mainnet, non-bounceable
    assert shown["address_raw"] == Wallet.load_or_create(tmp_path / "wallet.json").address
    assert "balance_nanoton" not in shown and shown["network"] is None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js")
def test_deploy_waits_for_funds_then_deploys(tmp_path: Path) -> None:
    with open_local_chain() as chain:
        flags = ["--data-dir", str(tmp_path), "--chain", chain.endpoint, "--local-chain"]
        rc, shown = _wallet("show", *flags)
        assert rc == 0 and shown["balance_nanoton"] == 0 and shown["deployed"] is False
        rc, refused = _wallet("deploy", *flags)
        assert rc == 2 and refused["error"].startswith(f"fund {shown['address_to_fund']} with at least")
        chain.top_up(Wallet.load_or_create(tmp_path / "wallet.json"), TON)
        rc, deployed = _wallet("deploy", *flags)
        assert rc == 0 and deployed["deployed"] is True and 0 < deployed["balance_nanoton"] < TON  # less the fee
        rc, again = _wallet("show", *flags)
        assert again["deployed"] is True and again["address_raw"] == shown["address_raw"]
