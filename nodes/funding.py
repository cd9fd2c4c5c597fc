"""A node's wallet at start-up: how much it needs, and waiting for the operator to fund it.

A fresh wallet is an address with nothing on it and no contract. The node says
which address to fund and how much (``fund <address> with at least X TON (it
holds Y)``), polls its balance with backoff (every 1, 2, 4, 8, then 10 s),
deploys the wallet once it holds enough, and goes on. It waits as long as it
takes unless given a timeout (``--funding-timeout-s``, for scripts); SIGINT or
SIGTERM ends the wait (see :func:`unless_signalled`).

What is enough: a worker only pays the gas of closing its channels (it is the
payee); a client or a gateway opens a channel with a deposit, which costs the
deposit plus the gas of the open, the init and the close.
"""

from __future__ import annotations

import enum
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from functools import partial
from typing import Any, TextIO, TypeVar

import trio

from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.payments.addresses import friendly
from cocoon_p2p.payments.chain import ChainError, TonCenter, Wallet
from cocoon_p2p.payments.channelops import CONTROL_FEE, PaymentConfig

from . import logs
from .config import RoleConfig

log = logging.getLogger(__name__)

NANOTON_PER_TON = 1_000_000_000
WALLET_FEES_NANOTON = 10_000_000  # the wallet's own deploy and per-transfer fees, with room to spare
FIRST_POLL_S = 1.0
MAX_POLL_S = 10.0  # toncenter allows about 1 request a second without an API key: stay well below


T = TypeVar("T")


class Role(enum.Enum):
    """What the node does with its wallet."""

    WORKER = "worker"  # is paid: closes channels
    CLIENT = "client"  # pays: opens channels with a deposit
    GATEWAY = "gateway"  # a client behind an HTTP API


class Funding(enum.Enum):
    """How :func:`ensure_funded` ended."""

    HELD_ENOUGH = "held-enough"  # no wait
    FUNDED = "funded"  # after a wait


class WalletUnfunded(CocoonError):
    """The wallet did not receive what the node needs within the funding timeout."""


def required_nanoton(role: Role, deposit_nanoton: int) -> int:
    """The balance the node's wallet must hold before it starts: a worker's closes (one
    control message each), or a client's first channel (deposit + open + init + close)."""
    if role is Role.WORKER:
        return CONTROL_FEE + WALLET_FEES_NANOTON
    return deposit_nanoton + 3 * CONTROL_FEE + WALLET_FEES_NANOTON


def poll_delays(first_s: float = FIRST_POLL_S, max_s: float = MAX_POLL_S) -> Iterator[float]:
    """Seconds between balance checks: doubling from ``first_s``, at most ``max_s``, forever."""
    delay = first_s
    while True:
        yield min(delay, max_s)
        delay = min(delay * 2, max_s)


def format_ton(nanoton: int) -> str:
    """``nanoton`` in TON, exactly and without trailing zeros: 60000000 -> ``0.06``."""
    text = format(Decimal(nanoton) / NANOTON_PER_TON, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def fund_line(shown_address: str, need_nanoton: int, holds_nanoton: int) -> str:
    """What the node prints when its wallet holds too little (tools parse ``split()[1]``)."""
    return f"fund {shown_address} with at least {format_ton(need_nanoton)} TON (it holds {format_ton(holds_nanoton)})"


async def ensure_funded(
    chain: TonCenter,
    wallet: Wallet,
    *,
    need_nanoton: int,
    shown_address: str,
    say: Callable[[str], None],
    timeout_s: float | None = None,
    delays: Iterator[float] | None = None,
) -> Funding:
    """Wait until ``wallet`` holds ``need_nanoton``, then make sure it is deployed.

    The first balance read raises ChainError when the chain cannot be reached (a wrong
    endpoint should stop the node, not leave it waiting); later failed reads are logged
    and retried, since toncenter refuses requests past its rate. Prints (through ``say``)
    the fund line once, when it has to wait. Raises WalletUnfunded after ``timeout_s``
    (None: never). Cancelled: stops between reads, or abandons a read or a deploy in
    flight (it goes on in its thread; its result is lost, nothing is written).
    """
    balance = await _in_thread(partial(chain.balance, wallet.address))
    outcome = Funding.HELD_ENOUGH
    if balance < need_nanoton:
        say(fund_line(shown_address, need_nanoton, balance))
        outcome = Funding.FUNDED
        with trio.move_on_after(timeout_s if timeout_s is not None else float("inf")) as waited:
            for delay in delays if delays is not None else poll_delays():
                await trio.sleep(delay)
                try:
                    balance = await _in_thread(partial(chain.balance, wallet.address))
                except ChainError as exc:
                    log.warning(
                        "reading the wallet's balance failed (will retry): %s", exc, extra=fields(wallet=shown_address)
                    )
                    continue
                if balance >= need_nanoton:
                    break
        if waited.cancelled_caught:
            raise WalletUnfunded(
                f"wallet {shown_address} still holds {format_ton(balance)} TON after {timeout_s:g} s; "
                f"it needs at least {format_ton(need_nanoton)} TON"
            )
        say(f"funded {shown_address} holds {format_ton(balance)} TON")
    await _in_thread(partial(wallet.ensure_deployed, chain))
    return outcome


async def fund_wallet(cfg: RoleConfig, payments: PaymentConfig, role: Role, out: TextIO | None = None) -> bool:
    """Print ``wallet <address>`` (user-friendly, non-bounceable, testnet-flagged on
    testnet) on stdout, or on stderr when ``out`` is ``sys.stderr`` (there a JSON record
    under --log-json: see :func:`.logs.say`), then wait until the wallet holds what ``role`` needs
    and is deployed (:func:`ensure_funded`). False if SIGINT/SIGTERM came first."""
    shown = friendly(payments.wallet.address, testnet=cfg.testnet)

    def say(line: str) -> None:  # stdout is read by tools; a client's stdout is the job's output
        level = logging.WARNING if line.startswith("fund ") else logging.INFO  # waits for the operator
        logs.say(line, fields(wallet=shown), to=logs.To.STDERR if out is sys.stderr else logs.To.STDOUT, level=level)

    say(f"wallet {shown}")
    return await unless_signalled(
        partial(
            ensure_funded,
            payments.chain,
            payments.wallet,
            need_nanoton=required_nanoton(role, cfg.deposit_nanoton),
            shown_address=shown,
            say=say,
            timeout_s=cfg.funding_timeout_s or None,
        )
    )


async def unless_signalled(work: Callable[[], Awaitable[object]]) -> bool:
    """Run ``work()`` unless SIGINT or SIGTERM comes first: True if it finished, False if
    a signal cancelled it. Its errors propagate. Call it from trio's main thread."""
    finished = False
    async with trio.open_nursery() as nursery:

        async def watch(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                task_status.started()  # from here on a signal cancels the work
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        await nursery.start(watch)
        await work()
        finished = True
        nursery.cancel_scope.cancel()
    return finished


async def _in_thread(fn: Callable[[], T]) -> T:
    """``fn()`` in a worker thread (the chain client blocks); a cancel abandons it, so a
    signal is not held up by a slow request. (The installed trio stubs predate the flag.)"""
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)  # type: ignore[call-arg]
