"""``cocoon-node status``: what a node's data directory holds, and what it is doing now.

Read from disk (works whether the node runs or not, and writes nothing): its
PeerId, its wallet, the channels it holds as a worker (earned, settled or not)
and as a client (deposit left), and ``warnings`` for what is damaged but
survivable (a torn voucher log). A damaged or exposed file is a named error, as
when the node starts. With ``--metrics URL`` it also reads a running node's
``/metrics``, and sums up its spot checks (``checks``: results re-checked, found
wrong, skipped, not paid for, fraud proofs sent) when it runs them.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from cocoon_p2p.core.identity import load_or_create_identity
from cocoon_p2p.core.metrics import parse
from cocoon_p2p.payments.addresses import friendly
from cocoon_p2p.payments.chain import Wallet
from cocoon_p2p.payments.channelstate import CLOSING
from cocoon_p2p.payments.payerbook import CURRENT, ChannelRecord, load_book
from cocoon_p2p.payments.store import ChannelStore
from cocoon_p2p.payments.voucherlog import VoucherLog

KEY_FILE = "node.key"
# The ``checks`` summary: its keys, and the series each is read from (0 when absent).
CHECK_SERIES = {
    "checks": "cocoon_checks_total",
    "failed": "cocoon_checks_failed_total",
    "skipped": "cocoon_checks_skipped_total",
    "withheld_nanoton": "cocoon_checks_withheld_nanoton_total",
    "fraud_proofs_sent": "cocoon_fraud_proofs_sent_total",
}


def _client_side(folder: Path, warnings: list[str]) -> list[ChannelRecord]:
    issued = VoucherLog(folder / "issued.log", read_only=True)
    try:
        records, _ = load_book(folder / "payer.json", issued)
        if issued.torn is not None:
            warnings.append(issued.torn.describe(issued.path, len(issued.records)))
        return records
    finally:
        issued.close()


def collect(data_dir: Path, metrics_url: str | None = None, *, testnet: bool = False) -> dict[str, Any]:
    """The status as one JSON-ready dict. ``wallet`` is the raw address,
    ``wallet_to_fund`` the form to give a faucet or an exchange (user-friendly,
    non-bounceable, testnet-flagged when ``testnet``)."""
    out: dict[str, Any] = {"data_dir": str(data_dir)}
    key = data_dir / KEY_FILE
    out["peer_id"] = load_or_create_identity(key).peer_id_str if key.is_file() else None  # never creates one here
    wallet = data_dir / "wallet.json"
    out["wallet"] = Wallet.load_or_create(wallet).address if wallet.is_file() else None
    out["wallet_to_fund"] = friendly(out["wallet"], testnet=testnet) if out["wallet"] else None
    pay = data_dir / "payments"
    worker: list[dict[str, Any]] = []
    warnings: list[str] = []
    if (pay / "channels").is_dir():
        store = ChannelStore(pay / "channels", read_only=True)
        warnings += store.warnings
        try:
            for cid, ch in sorted(store.channels.items()):
                worker.append(
                    {
                        "channel_id": f"{cid:032x}",
                        "address": ch.terms.address,
                        "deposit_nanoton": ch.terms.deposit_a,
                        "earned_nanoton": store.earned(cid),
                        "settled": ch.closed,
                    }
                )
        finally:
            store.close()
    out["worker_channels"] = worker
    out["earned_unsettled_nanoton"] = sum(c["earned_nanoton"] for c in worker if not c["settled"])
    book = _client_side(pay, warnings)
    out["client_channels"] = [
        {"worker": r.worker.hex(), **r.to_json()} for r in book if r.worker is not None and r.life.state in CURRENT
    ]
    out["client_channels_closing"] = sum(1 for r in book if r.life.state in CLOSING)
    out["warnings"] = warnings
    if metrics_url:
        with urllib.request.urlopen(metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        out["metrics"] = {k: v for k, v in parse(text).items() if "_bucket" not in k}
        if CHECK_SERIES["checks"] in out["metrics"]:  # a client that runs spot checks
            out["checks"] = {key: int(out["metrics"].get(name, 0)) for key, name in CHECK_SERIES.items()}
    return out


def print_status(status: dict[str, Any]) -> None:
    print(f"peer id   {status['peer_id'] or '(no key yet: run keygen or start the node)'}")
    if status["wallet"]:
        print(f"wallet    {status['wallet_to_fund']} (raw {status['wallet']})")
    else:
        print("wallet    (none)")
    worker = status["worker_channels"]
    open_ = [c for c in worker if not c["settled"]]
    unsettled, settled = status["earned_unsettled_nanoton"], len(worker) - len(open_)
    print(f"worker    {len(open_)} channel(s) open, {unsettled} nanoton earned not yet settled; {settled} settled")
    for c in open_:
        print(f"          {c['address'] or c['channel_id']}: earned {c['earned_nanoton']} of {c['deposit_nanoton']}")
    client = status["client_channels"]
    print(f"client    {len(client)} channel(s) open, {status['client_channels_closing']} closing")
    for c in client:
        print(f"          to {c['worker'][:16]}...: {c['address']} (deposit {c['deposit']})")
    for warning in status["warnings"]:
        print(f"warning   {warning}")
    if checks := status.get("checks"):
        print(
            f"checks    {checks['checks']} result(s) re-checked: {checks['failed']} found wrong "
            f"({checks['withheld_nanoton']} nanoton not paid), {checks['skipped']} skipped; "
            f"{checks['fraud_proofs_sent']} fraud proof(s) sent"
        )
    for name, value in sorted(status.get("metrics", {}).items()):
        print(f"metric    {name} {value:g}")
