"""Jobs paid by voucher over real peers, with channels opened on the local chain."""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import Tensor, from_numpy
from cocoon_p2p.jobs import JobFailed
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.node import Node
from cocoon_p2p.payments.chain import Wallet, read_channel
from cocoon_p2p.payments.service import PaymentConfig
from cocoon_p2p.testing.localchain import LocalChain, open_local_chain

from .netutil import fast_config, wait_for

pytestmark = pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js")
TON = 1_000_000_000
PRICE = 7_000_000  # nanoton per item


def funded_wallet(chain: LocalChain) -> Wallet:
    return chain.new_wallet(10 * TON)


@asynccontextmanager
async def paid_pair(
    chain: LocalChain, model: ModelSpec, root: Path, *, credit_nanoton: int = 100_000_000, linger_s: float = 0.2
) -> AsyncIterator[tuple[Node, Node]]:
    """A worker serving ``model`` at PRICE and a client that sees it, each with a funded wallet."""
    w_cfg = PaymentConfig(chain, funded_wallet(chain), root / "worker", credit_nanoton=credit_nanoton)
    c_cfg = PaymentConfig(chain, funded_wallet(chain), root / "client", pay_linger_s=linger_s)
    async with (
        Node(fast_config(payments=w_cfg)) as worker,
        Node(fast_config(bootstrap=[worker.addrs[0]], payments=c_cfg)) as client,
    ):
        worker.serve_model(model, OnnxRuntimeBackend(model.path, threads=1), price_nanoton=PRICE)
        await wait_for(lambda: client.directory.workers_for(model.model_id, now_ms=now_ms()) != [])
        yield worker, client


async def test_every_job_is_paid_by_a_durable_voucher(tiny_model: ModelSpec, tmp_path: Path) -> None:
    with open_local_chain(realistic=True) as chain:
        async with paid_pair(chain, tiny_model, tmp_path) as (worker, client):
            w_pay, c_pay = worker.payments, client.payments
            assert w_pay is not None and c_pay is not None
            x = (from_numpy("x", np.ones((2, 4), np.float32)),)
            costs = []
            for _ in range(5):
                r = await client.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)
                costs.append(r.cost_nanoton)
            assert costs == [2 * PRICE] * 5
            async with trio.open_nursery() as nursery:  # concurrent jobs: vouchers stay in order
                for _ in range(6):
                    nursery.start_soon(_infer, client, tiny_model, x)
            costs += [2 * PRICE] * 6
            await client.flush_payments()  # the jobs returned before their vouchers went
            (channel,) = c_pay.payer.open.values()
            on_chain = read_channel(chain, channel.address)  # opened on chain by the client's first job
            assert on_chain.state == 1 and on_chain.balance_a == c_pay.config.policy.deposit_nanoton
            cid = next(iter(w_pay.payee.store.channels))  # the first, settled channel
            assert w_pay.payee.store.earned(cid) == c_pay.paid_to(worker.peer_id) == sum(costs)  # durable, acknowledged
            assert w_pay.payee.owed(client.peer_id) == 0

            # Settle: a cooperative close on chain pays the worker's wallet what the vouchers say.
            before = chain.balance(w_pay.config.wallet.address)
            assert await c_pay.settle(worker.peer_id) == sum(costs)
            await trio.to_thread.run_sync(chain.settle)  # the close, then the payout, land blocks later
            assert read_channel(chain, channel.address).state == 0
            gained = chain.balance(w_pay.config.wallet.address) - before
            assert sum(costs) - TON // 1000 < gained <= sum(costs)  # less the payout's forward fee
            # Work goes on: the next job opens a new channel.
            r = await client.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)
            await client.flush_payments()
            (new_channel,) = c_pay.payer.open.values()
            assert new_channel.address != channel.address and c_pay.paid_to(worker.peer_id) == r.cost_nanoton

        # A client that will not pay gets typed refusals (and the worker stays up).
        w2_cfg = PaymentConfig(chain, funded_wallet(chain), tmp_path / "worker2")
        async with (
            Node(fast_config(payments=w2_cfg)) as worker2,
            Node(fast_config(bootstrap=[worker2.addrs[0]])) as freeloader,
        ):
            worker2.serve_model(tiny_model, OnnxRuntimeBackend(tiny_model.path, threads=1), price_nanoton=PRICE)
            await wait_for(lambda: freeloader.directory.workers_for(tiny_model.model_id, now_ms=now_ms()) != [])
            with pytest.raises(JobFailed) as err:
                await freeloader.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)
            assert err.value.code == jf.PAYMENT
            await trio.sleep(0)

    # The worker's earnings survive a restart (its channels are on disk).
    from cocoon_p2p.payments.store import ChannelStore

    assert ChannelStore(tmp_path / "worker" / "channels").earned(cid) == sum(costs)


async def _infer(client: Node, model: ModelSpec, x: tuple[object, ...]) -> None:
    try:
        await client.infer(model.model_id, inputs=x, max_price_nanoton=PRICE)  # type: ignore[arg-type]
    except JobFailed as exc:
        raise AssertionError(f"job failed: {exc!r}") from exc


async def test_an_opening_whose_init_was_lost_is_initialised_not_forgotten(
    tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deposit landed but the init message did not (or the client died between them):
    the channel stays OPENING, written down, and the next job initialises and confirms it."""
    from cocoon_p2p.payments import deposits
    from cocoon_p2p.payments.channelstate import ChannelState

    with open_local_chain(realistic=True) as chain:
        async with paid_pair(chain, tiny_model, tmp_path) as (worker, client):
            assert client.payments is not None
            payer = client.payments.payer
            monkeypatch.setattr(deposits, "OPEN_WAIT_S", 1.0)
            monkeypatch.setattr(payer.deposits, "initialise", lambda *args: None)  # the init message is lost
            with pytest.raises(JobFailed) as err:
                await client.infer(tiny_model.model_id, inputs=_x(), max_price_nanoton=PRICE)
            assert err.value.code == jf.PAYMENT_SETUP and "not open on chain" in str(err.value)
            (ch,) = payer.channels.values()
            assert ch.state is ChannelState.OPENING and ch.since > 0 and chain.balance(ch.address) > 0
            assert read_channel(chain, ch.address).state == 0  # deployed with the deposit, not initialised
            monkeypatch.undo()
            r = await client.infer(tiny_model.model_id, inputs=_x(), max_price_nanoton=PRICE)
            assert r.cost_nanoton == 2 * PRICE and payer.open[worker.peer_id] is ch  # the same channel
            assert read_channel(chain, ch.address).state == 1


async def test_settling_an_interrupted_opening_confirms_it_then_closes_it(
    tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker died while our deposit landed (here: it refused the channel once): a
    settle confirms the channel with the worker now back, then closes it cooperatively,
    instead of leaving the deposit in a contract nobody closes."""
    from cocoon_p2p.payments import frames as pf
    from cocoon_p2p.payments.channelstate import ChannelState

    with open_local_chain(realistic=True) as chain:
        async with paid_pair(chain, tiny_model, tmp_path) as (worker, client):
            assert client.payments is not None and worker.payments is not None
            payer = client.payments.payer

            async def gone(client_peer: bytes, address: str) -> pf.PayFrame:
                return pf.PayError(pf.PayErrorCode.CHANNEL, "restarting")

            monkeypatch.setattr(worker.payments.payee, "_accept_channel", gone)
            with pytest.raises(JobFailed):
                await client.infer(tiny_model.model_id, inputs=_x(), max_price_nanoton=PRICE)
            (ch,) = payer.channels.values()
            assert ch.state is ChannelState.OPENING and payer.open == {}
            assert payer.current == {worker.peer_id: ch}
            monkeypatch.undo()
            assert await client.payments.settle(worker.peer_id) == 0  # nothing was paid through it
            assert ch.state is ChannelState.CLOSING_COOPERATIVE and payer.current == {}
            await trio.to_thread.run_sync(chain.settle)
            assert read_channel(chain, ch.address).state == 0  # closed: the deposit is back


async def test_an_opening_is_abandoned_only_once_its_deposit_cannot_land(tmp_path: Path) -> None:
    from nacl.signing import SigningKey

    from cocoon_p2p.payments import deposits
    from cocoon_p2p.payments.channelops import PaymentFailed
    from cocoon_p2p.payments.channelstate import ChannelState, Lifecycle
    from cocoon_p2p.payments.payer import Payer
    from cocoon_p2p.payments.payerchannel import PayerChannel
    from cocoon_p2p.payments.vouchers import VoucherIssuer

    with open_local_chain(realistic=True) as chain:
        cfg = PaymentConfig(chain, funded_wallet(chain), tmp_path / "client")
        payer = Payer(SigningKey.generate(), None, cfg)
        for since, expect in [(0, ChannelState.CLOSED), (int(time.time()), ChannelState.OPENING),
                              (int(time.time() - deposits.OPEN_WAIT_S - 1), ChannelState.CLOSED)]:  # fmt: skip
            ch = PayerChannel("0:" + "ab" * 32, b"w", VoucherIssuer(1, payer.key, TON), None,
                              Lifecycle(ChannelState.OPENING), since=since)  # fmt: skip
            payer.channels[ch.address] = ch
            if expect is ChannelState.OPENING:  # handed to the chain moments ago: it may still land
                with pytest.raises(PaymentFailed, match="still opening"):
                    await payer._resume_opening(b"w", ch)
            else:
                await payer._resume_opening(b"w", ch)
            assert ch.state is expect
        payer.close()


def _x() -> tuple[Tensor, ...]:
    return (from_numpy("x", np.ones((2, 4), dtype=np.float32)),)


async def test_a_deposit_the_worker_never_confirms_is_refunded(
    tiny_model: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The contract is open with our deposit, but the worker refuses it (or vanished): the
    client holds the worker's opening state from before it paid, closes the channel alone
    and, after the quarantine, has its deposit back."""
    from cocoon_p2p.payments import deposits
    from cocoon_p2p.payments import frames as pf
    from cocoon_p2p.payments.channelstate import ChannelState

    with open_local_chain(realistic=True) as chain:
        async with paid_pair(chain, tiny_model, tmp_path) as (worker, client):
            assert client.payments is not None and worker.payments is not None
            payer = client.payments.payer

            async def refuse(client_peer: bytes, address: str) -> pf.PayFrame:
                return pf.PayError(pf.PayErrorCode.CHANNEL, "not today")

            monkeypatch.setattr(worker.payments.payee, "_accept_channel", refuse)
            wallet = client.payments.config.wallet.address
            before = chain.balance(wallet)
            with pytest.raises(JobFailed) as err:
                await client.infer(tiny_model.model_id, inputs=_x(), max_price_nanoton=PRICE)
            assert err.value.code == jf.PAYMENT_SETUP and "refused the channel" in str(err.value)
            (ch,) = payer.channels.values()
            assert ch.state is ChannelState.OPENING and ch.b_state is not None  # signed before we paid
            assert read_channel(chain, ch.address).state == 1  # our deposit is in an open contract
            monkeypatch.setattr(deposits, "OPEN_WAIT_S", 0.0)  # it has waited long enough
            await payer.watch_once()
            assert ch.state is ChannelState.CLOSING_UNCOOPERATIVE
            await trio.to_thread.run_sync(chain.settle)
            chain.advance(payer.config.quarantine_s + 1)
            assert await payer.watch_once() == {ch.address: "finished"}
            await trio.to_thread.run_sync(chain.settle)
            assert read_channel(chain, ch.address).state == 0
            assert await payer.watch_once() == {ch.address: "closed"} and payer.channels == {}
            assert before - chain.balance(wallet) < TON // 10  # the deposit came back, less fees


async def test_jobs_finished_within_the_linger_share_one_voucher_and_a_refusal_cuts_it_short(
    tiny_model: ModelSpec, tmp_path: Path
) -> None:
    """Finished jobs gather (here for up to a minute) before one voucher pays them all; a
    flush, or the worker refusing a job for the credit they take, sends them at once."""
    cost = 2 * PRICE
    with open_local_chain() as chain:
        async with paid_pair(chain, tiny_model, tmp_path, credit_nanoton=3 * cost, linger_s=60.0) as (worker, client):
            w_pay, c_pay = worker.payments, client.payments
            assert w_pay is not None and c_pay is not None
            x = (from_numpy("x", np.ones((2, 4), np.float32)),)
            await client.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)  # opens the channel
            await client.flush_payments()
            (channel,) = c_pay.payer.open.values()
            first = channel.issuer.seqno
            for _ in range(3):
                await client.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)
            assert channel.issuer.seqno == first  # lingering: no voucher yet
            assert w_pay.payee.owed(client.peer_id) == 3 * cost
            await client.flush_payments()
            assert channel.issuer.seqno == first + 1  # one voucher for the three
            assert w_pay.payee.owed(client.peer_id) == 0 and c_pay.paid_to(worker.peer_id) == 4 * cost

            for _ in range(4):  # owed 0..3 x cost: admitted
                await client.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)
            with trio.fail_after(30):  # well short of the linger: the refusal sent the batch at once
                await client.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)
            assert channel.issuer.seqno == first + 2 and w_pay.payee.owed(client.peer_id) == cost
            await client.flush_payments()
            assert c_pay.paid_to(worker.peer_id) == 9 * cost


async def test_a_client_that_stops_paying_is_cut_off_at_its_credit(tiny_model: ModelSpec, tmp_path: Path) -> None:
    """Results are handed on before their vouchers go: what a client then owes is the
    worker's only exposure, and the credit limit bounds it exactly. A client whose vouchers
    never arrive gets jobs while it owes no more than its credit (one job's cost beyond it at
    most), then ``payment`` refusals; once it pays, the next job runs."""
    cost = 2 * PRICE
    with open_local_chain() as chain:
        async with paid_pair(chain, tiny_model, tmp_path, credit_nanoton=3 * cost) as (worker, client):
            w_pay, c_pay = worker.payments, client.payments
            assert w_pay is not None and c_pay is not None
            x = (from_numpy("x", np.ones((2, 4), np.float32)),)
            await client.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)  # opens the channel, pays
            await client.flush_payments()
            honest_pay, released = c_pay.pay, trio.Event()

            async def stalled(worker_id: bytes, amount: int) -> int:
                await released.wait()  # the vouchers do not go: a client that stopped paying
                return await honest_pay(worker_id, amount)

            c_pay.pay = stalled  # type: ignore[method-assign]
            served = 0
            with pytest.raises(JobFailed) as err:
                for _ in range(10):
                    await client.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)
                    served += 1
            assert err.value.code == jf.PAYMENT
            assert served == 4  # owed 0, 1, 2, 3 x cost <= the credit: admitted; owed 4 x cost: refused
            assert w_pay.payee.owed(client.peer_id) == 4 * cost  # the most it risked: credit + one job
            released.set()  # it pays at last: every voucher goes, coalesced
            await client.flush_payments()
            assert w_pay.payee.owed(client.peer_id) == 0
            await client.infer(tiny_model.model_id, inputs=x, max_price_nanoton=PRICE)
