"""Settlement on the local chain with real peers: worker-initiated closes (cooperative and
not), a challenge of a cheating client, channel roll-over, and both parties restarting."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import from_numpy
from cocoon_p2p.node import Node
from cocoon_p2p.payments import messages as m
from cocoon_p2p.payments.chain import Wallet, read_channel
from cocoon_p2p.payments.channelops import send_control
from cocoon_p2p.payments.service import PaymentConfig, PaymentService
from cocoon_p2p.payments.settlement import SettlementPolicy
from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain

from .netutil import fast_config, wait_for

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js")
TON = 1_000_000_000
PRICE = 7_000_000  # nanoton per item: a job of 2 items costs 14M
X = (from_numpy("x", np.ones((2, 4), np.float32)),)
FEE_SLACK = TON // 1000  # the payout's forward fee


@pytest.fixture(scope="module")
def chain() -> object:
    """Testnet-like: each message lands blocks after it is sent (see :func:`landed`)."""
    with open_local_chain(realistic=True) as c:
        yield c


async def landed(chain: LocalChain) -> None:
    """Until every message sent so far has landed (the local chain's test-only wait)."""
    await trio.to_thread.run_sync(chain.settle)


def funded_wallet(chain: LocalChain, path: Path) -> Wallet:
    w = Wallet.load_or_create(path)
    chain.top_up(w, 10 * TON)
    return w


@asynccontextmanager
async def pair(
    chain: LocalChain,
    model: ModelSpec,
    root: Path,
    *,
    policy: SettlementPolicy | None = None,
    client_stack: AsyncExitStack | None = None,
) -> AsyncIterator[tuple[Node, PaymentService, Node, PaymentService]]:
    """A paid worker and a paying client, each with its key and data under ``root``.
    The client runs in ``client_stack`` when given: a test may stop it early."""
    policy = policy or SettlementPolicy()
    w_cfg = PaymentConfig(chain, funded_wallet(chain, root / "w-wallet.json"), root / "worker", policy=policy)
    c_cfg = PaymentConfig(chain, funded_wallet(chain, root / "c-wallet.json"), root / "client", policy=policy)
    w_cfg.watch_interval_s = c_cfg.watch_interval_s = 3600  # the tests drive watch_once themselves
    async with Node(fast_config(key_file=root / "worker.key", payments=w_cfg)) as worker, AsyncExitStack() as own:
        client = await (client_stack or own).enter_async_context(
            Node(fast_config(key_file=root / "client.key", bootstrap=[worker.addrs[0]], payments=c_cfg))
        )
        worker.serve_model(model, OnnxRuntimeBackend(model.path, threads=1), price_nanoton=PRICE)
        w_pay, c_pay = worker.payments, client.payments
        assert w_pay is not None and c_pay is not None
        await wait_for(lambda: client.directory.workers_for(model.model_id, now_ms=now_ms()) != [])
        yield worker, w_pay, client, c_pay


async def jobs(client: Node, model: ModelSpec, n: int) -> int:
    total = 0
    for _ in range(n):
        total += (await client.infer(model.model_id, inputs=X, max_price_nanoton=PRICE)).cost_nanoton
        await client.flush_payments()  # one voucher a job, as these tests count them
    return total


async def test_worker_closes_cooperatively_on_shutdown(
    chain: LocalChain, tiny_model: ModelSpec, tmp_path: Path
) -> None:
    async with pair(chain, tiny_model, tmp_path) as (worker, w_pay, client, c_pay):
        paid = await jobs(client, tiny_model, 4)
        (ch,) = c_pay.payer.open.values()
        before = chain.balance(w_pay.config.wallet.address)
        done = await w_pay.shutdown()
        assert list(done.values()) == ["cooperative"]
        await landed(chain)
        assert read_channel(chain, ch.address).state == 0  # closed on chain
        gained = chain.balance(w_pay.config.wallet.address) - before
        assert paid - 2 * CONTROL_SLACK < gained <= paid  # its earnings, less the close's gas
        assert c_pay.payer.open == {}  # the client signed and let the channel go
        assert await c_pay.watch_once() == {ch.address: "closed"}
        # The worker takes no more jobs on that channel, and a new channel serves the next one.
        assert await jobs(client, tiny_model, 1) == 2 * PRICE
        assert len(c_pay.payer.open) == 1 and next(iter(c_pay.payer.open.values())).address != ch.address


CONTROL_SLACK = 50_000_000  # the control message's attached gas, partly refunded


async def test_vanished_client_is_closed_uncooperatively(
    chain: LocalChain, tiny_model: ModelSpec, tmp_path: Path
) -> None:
    policy = SettlementPolicy(idle_close_s=0.5)
    async with (
        AsyncExitStack() as client_exit,
        pair(chain, tiny_model, tmp_path, policy=policy, client_stack=client_exit) as (worker, w_pay, client, c_pay),
    ):
        paid = await jobs(client, tiny_model, 3)
        (ch,) = c_pay.payer.open.values()
        c_before = chain.balance(c_pay.config.wallet.address)
        await client_exit.aclose()  # the client vanishes without settling
        await trio.sleep(0.6)
        w_before = chain.balance(w_pay.config.wallet.address)
        assert list((await w_pay.watch_once()).values()) == ["uncooperative"]
        await landed(chain)
        assert read_channel(chain, ch.address).state == 2  # quarantine
        assert await w_pay.watch_once() == {}  # nothing to do until quarantine ends
        chain.advance(3601)
        assert list((await w_pay.watch_once()).values()) == ["finished"]
        await landed(chain)
        assert read_channel(chain, ch.address).state == 0
        gained = chain.balance(w_pay.config.wallet.address) - w_before
        assert paid - 3 * CONTROL_SLACK < gained <= paid
        refund = chain.balance(c_pay.config.wallet.address) - c_before
        assert refund >= c_pay.config.policy.deposit_nanoton - paid  # the rest, and the unused gas
        assert await w_pay.watch_once() == {} and w_pay.payee.store.unsettled() == []  # seen closed: unwatched


async def test_cheating_client_is_challenged(chain: LocalChain, tiny_model: ModelSpec, tmp_path: Path) -> None:
    async with pair(chain, tiny_model, tmp_path) as (worker, w_pay, client, c_pay):
        paid = await jobs(client, tiny_model, 5)
        (ch,) = c_pay.payer.open.values()
        old = SemiChannel(ch.issuer.channel_id, SemiChannelBody(2, 4 * PRICE)).sign(c_pay.payer.key)  # its 2nd voucher
        assert ch.b_state is not None
        cheat = m.start_uncooperative_close(ch.issuer.channel_id, old, ch.b_state, key=c_pay.payer.key, is_a=True)
        await trio.to_thread.run_sync(send_control, c_pay.config, ch.address, cheat)
        await landed(chain)
        q = read_channel(chain, ch.address).quarantine
        assert q is not None and q.sent_a == 4 * PRICE and q.committed_by_a  # two jobs' worth
        w_before = chain.balance(w_pay.config.wallet.address)
        assert list((await w_pay.watch_once()).values()) == ["challenged"]
        await landed(chain)
        q = read_channel(chain, ch.address).quarantine
        assert q is not None and q.sent_a == paid  # the newest voucher replaced the old one
        chain.advance(3601)
        assert list((await w_pay.watch_once()).values()) == ["finished"]
        await landed(chain)
        gained = chain.balance(w_pay.config.wallet.address) - w_before
        assert paid - 3 * CONTROL_SLACK < gained <= paid


async def test_channels_roll_over_at_three_operations_each(
    chain: LocalChain, tiny_model: ModelSpec, tmp_path: Path
) -> None:
    # 14M a job, 100M a channel, rolled over when less than 20M is left: 6 jobs a channel.
    policy = SettlementPolicy(deposit_nanoton=100_000_000, reserve_fraction=0.2)
    async with pair(chain, tiny_model, tmp_path, policy=policy) as (worker, w_pay, client, c_pay):
        w_before = chain.balance(w_pay.config.wallet.address)
        paid = await jobs(client, tiny_model, 15)
        assert paid == 15 * 2 * PRICE
        assert len(c_pay.payer.closing) == 2 and len(c_pay.payer.open) == 1  # 6 + 6 + 3 jobs
        assert c_pay.onchain_ops == 3 * 2 + 2  # two channels opened and closed, the third opened
        assert w_pay.onchain_ops == 0
        await c_pay.settle(worker.peer_id)
        await landed(chain)
        gained = chain.balance(w_pay.config.wallet.address) - w_before
        assert paid - 3 * FEE_SLACK < gained <= paid


async def test_both_parties_restart_mid_channel(chain: LocalChain, tiny_model: ModelSpec, tmp_path: Path) -> None:
    async with pair(chain, tiny_model, tmp_path) as (worker, w_pay, client, c_pay):
        first = await jobs(client, tiny_model, 3)
        (ch,) = c_pay.payer.open.values()
        worker_id = worker.peer_id
    # Both processes' state is on disk: keys, the client's channel and vouchers, the worker's.
    async with pair(chain, tiny_model, tmp_path) as (worker, w_pay, client, c_pay):
        assert worker.peer_id == worker_id
        (again,) = c_pay.payer.open.values()
        assert again.address == ch.address and again.issuer.sent == first and again.issuer.seqno == 3
        assert w_pay.payee.store.earned(again.issuer.channel_id) == first
        second = await jobs(client, tiny_model, 2)
        assert again.issuer.seqno == 5 and w_pay.payee.store.earned(again.issuer.channel_id) == first + second
        assert len(c_pay.payer.open) == 1  # the same channel: nothing new on chain
        before = chain.balance(w_pay.config.wallet.address)
        assert await c_pay.settle(worker.peer_id) == first + second
        await landed(chain)
        gained = chain.balance(w_pay.config.wallet.address) - before
        assert first + second - FEE_SLACK < gained <= first + second
