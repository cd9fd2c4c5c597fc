"""Payment benchmarks: vouchers created, verified, and verified + durably persisted.

Durable persistence compares one fsync per voucher (the baseline) with group
commit (one fsync per batch of vouchers that arrived together), same run. Gas per
contract operation comes from the official code run in TON's emulator.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.payments.voucherlog import VoucherLog
from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody, SignedSemiChannel, VoucherBook

CLIENT = SigningKey(bytes([5]) * 32)
CHANNEL = 0xC0C0A


def _vouchers(n: int) -> list[SignedSemiChannel]:
    return [SemiChannel(CHANNEL, SemiChannelBody(i + 1, (i + 1) * 1000)).sign(CLIENT) for i in range(n)]


def _book() -> VoucherBook:
    return VoucherBook(channel_id=CHANNEL, payer_key=CLIENT.verify_key, deposit_a=10**15)


def _persisted(vouchers: list[SignedSemiChannel], batch: int) -> float:
    book = _book()
    with tempfile.TemporaryDirectory() as d:
        log = VoucherLog(Path(d) / "vouchers.log")
        t = time.perf_counter()
        for start in range(0, len(vouchers), batch):
            group = vouchers[start : start + batch]
            for v in group:  # each checked against the state after the one before it
                book.check(v)
                book.commit(v)
            log.append([v.to_record() for v in group])  # durable, then acknowledged
        elapsed = time.perf_counter() - t
        log.close()
    return len(vouchers) / elapsed


async def bench_vouchers(n: int) -> dict[str, float]:
    t = time.perf_counter()
    vouchers = _vouchers(n)
    created = n / (time.perf_counter() - t)
    book = _book()
    t = time.perf_counter()
    for v in vouchers:
        book.check(v)
        book.commit(v)
    verified = n / (time.perf_counter() - t)
    return {
        "vouchers_created_per_s": created,
        "vouchers_verified_per_s": verified,
        "vouchers_persisted_per_s_fsync_each": _persisted(vouchers[: n // 4], 1),
        "vouchers_persisted_per_s_group_64": _persisted(vouchers, 64),
    }


async def bench_gas(_quick: bool) -> dict[str, float]:
    """Gas of each contract operation, run by TON's emulator on the official code."""
    from pytoniq_core import Address

    from cocoon_p2p.payments import messages as m
    from cocoon_p2p.payments.contract import payment_channel_code
    from cocoon_p2p.testing.emulator import ContractEmulator

    a, b = CLIENT, SigningKey(bytes([6]) * 32)
    ton = 1_000_000_000
    data = m.initial_data(
        channel_id=CHANNEL,
        key_a=bytes(a.verify_key),
        key_b=bytes(b.verify_key),
        addr_a=Address("0:" + "aa" * 32),
        addr_b=Address("0:" + "bb" * 32),
        quarantine_s=60,
    )
    c = ContractEmulator(payment_channel_code(), data, address="0:" + "cc" * 32, now=1_790_000_000)
    gas: dict[str, float] = {}

    def run(name: str, body: Any, value: int = ton // 100) -> None:
        out = c.send(body, value)
        if out.exit_code != 0:
            raise RuntimeError(f"{name} failed with exit code {out.exit_code}")
        gas[f"gas_{name}"] = out.gas_used

    run("top_up", m.top_up(5 * ton, 0), 5 * ton + ton // 100)
    run("init_channel", m.init_channel(CHANNEL, 5 * ton, 0, key=a, is_a=True))
    commit = m.CommitTerms(CHANNEL, 10, 1)
    sigs = m.sign_body(commit.body(), a), m.sign_body(commit.body(), b)
    run("cooperative_commit", m.cooperative_commit(commit, *sigs))
    sa = SemiChannel(CHANNEL, SemiChannelBody(11, ton)).sign(a)
    sb = SemiChannel(CHANNEL, SemiChannelBody(2, 0), SemiChannelBody(11, ton)).sign(b)
    run("start_uncooperative_close", m.start_uncooperative_close(CHANNEL, sa, sb, key=a, is_a=True))
    sa2 = SemiChannel(CHANNEL, SemiChannelBody(12, 2 * ton)).sign(a)
    run("challenge_quarantined_state", m.challenge_quarantined_state(CHANNEL, sa2, sb, key=b, is_a=False))
    c.now += 61
    run("finish_uncooperative_close", m.finish_uncooperative_close())
    return gas


def _ops_by_policy(jobs: int, cost: int, deposit: int, reserve: float) -> tuple[int, int]:
    """(channels, on-chain operations) for ``jobs`` jobs of ``cost`` under the client's
    roll-over rule (the same :func:`client_action` the payer runs): 3 operations a channel."""
    from cocoon_p2p.payments.settlement import Action, SettlementPolicy, client_action

    policy = SettlementPolicy(deposit_nanoton=deposit, reserve_fraction=reserve)
    channels, sent = 1, 0
    for _ in range(jobs):
        if client_action(policy, deposit=deposit, sent=sent, next_cost=cost) is Action.ROLL_OVER:
            channels, sent = channels + 1, 0
        sent += cost
    return channels, 3 * channels


async def bench_onchain_ops(payments: int, *, realistic: bool = False) -> dict[str, float]:
    """Real payments (voucher, durable log on both sides, acknowledgement) between two
    peers on the local chain, with the default settlement policy: what touches the chain.
    ``realistic``: on the testnet-like local chain (blocks, rate limits, failing calls), where
    each roll-over waits for its close and the next channel's opening to land."""
    import shutil

    import trio

    from cocoon_p2p.node import Node, NodeConfig
    from cocoon_p2p.payments.service import PaymentConfig
    from cocoon_p2p.payments.settlement import SettlementPolicy
    from cocoon_p2p.testing.localchain import open_local_chain

    if shutil.which("node") is None:
        raise RuntimeError("the local chain needs Node.js")
    ton, cost = 1_000_000_000, 14_000_000  # a 2-item MiniLM job at 7M nanoton an item
    policy = SettlementPolicy(deposit_nanoton=ton)
    out: dict[str, float] = {}
    with open_local_chain(realistic=realistic) as chain, tempfile.TemporaryDirectory() as d:
        wallets = [chain.new_wallet(200 * ton) for _ in range(2)]
        w_cfg = PaymentConfig(chain, wallets[0], Path(d) / "w", policy=policy)
        c_cfg = PaymentConfig(chain, wallets[1], Path(d) / "c", policy=policy)
        async with (
            Node(NodeConfig(quiet_logs=True, payments=w_cfg)) as worker,
            Node(NodeConfig(quiet_logs=True, payments=c_cfg)) as client,
        ):
            w_pay, c_pay = worker.payments, client.payments
            if w_pay is None or c_pay is None:
                raise RuntimeError("the nodes were built without payments")
            await client.connect(worker.addrs[0])
            t = time.perf_counter()
            for _ in range(payments):
                await c_pay.pay(worker.peer_id, cost)
            elapsed = time.perf_counter() - t
            await c_pay.settle(worker.peer_id)
            await trio.sleep(0)
            ops = c_pay.onchain_ops + w_pay.onchain_ops
            channels = c_pay.payer.channels_opened
            waits = sorted(c_pay.payer.open_waits_s)
            retries = sum(chain.retried.values())
    out["paid_jobs"] = payments
    out["paid_jobs_per_s"] = payments / elapsed
    out["onchain_ops"] = ops
    out["onchain_ops_per_channel"] = ops / channels
    out["onchain_ops_per_10k_jobs"] = ops * 10_000 / payments
    out["channel_open_wait_s_p50"] = percentile(waits, 50)
    out["channel_open_wait_s_max"] = waits[-1]
    out["chain_calls_retried"] = retries
    for deposit_ton in (1, 10, 100):
        _, model_ops = _ops_by_policy(10_000, cost, deposit_ton * ton, policy.reserve_fraction)
        out[f"policy_ops_per_10k_jobs_deposit_{deposit_ton}_ton"] = model_ops
    return out


BENCHES: list[tuple[str, Callable[[bool], Any]]] = [
    ("vouchers", lambda quick: bench_vouchers(4000 if quick else 20000)),
    ("contract_gas", bench_gas),
    ("onchain_ops", lambda quick: bench_onchain_ops(1000 if quick else 10_000)),
    ("onchain_ops_realistic", lambda quick: bench_onchain_ops(300 if quick else 3000, realistic=True)),
]
