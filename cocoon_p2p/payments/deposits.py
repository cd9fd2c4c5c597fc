"""The chain side of a client's channel deposits: fund, initialise, wait, look, refund.

A client opens a channel in two messages from its wallet (deploy with the deposit,
then init) and, on TON, sees it open only blocks later. :class:`Deposits` does
those steps and reads back how far a channel got (:meth:`Deposits.look`), so the
payer's lifecycle (:mod:`.payer`) can decide after a restart: confirm, initialise
again, wait, abandon, or refund. Blocking chain calls run in threads; each
transfer is confirmed by its transactions (:meth:`~.wallet.Wallet.transfer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio
from nacl.signing import SigningKey, VerifyKey

from cocoon_p2p.core.crashpoints import CrashPoint, crash_point
from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.identity import public_key_from_peer_id

from . import messages as m
from .chain import ChannelOnChain, read_channel
from .channelops import CONTROL_FEE, PaymentConfig, PaymentFailed
from .settlement import OPEN
from .vouchers import SemiChannel, SemiChannelBody, SignedSemiChannel

# How long a new channel may take to show open on chain: on TON the deposit's internal
# message lands a block or two after our wallet's transaction (seconds; more when busy).
# Also how long after its deposit was sent an opening is given before it is abandoned or
# refunded (a wallet message is valid for 60 s).
OPEN_WAIT_S = 180.0


@dataclass(frozen=True)
class Lookup:
    """How far a channel's contract got, as the chain shows it now."""

    active: bool  # deployed
    on_chain: ChannelOnChain | None  # its data, when deployed
    balance: int  # what the address holds when not deployed (0 when deployed: not asked)

    def ours(self, channel_id: int) -> ChannelOnChain | None:
        """Its data if it is the channel ``channel_id`` (an address is the hash of its data)."""
        return self.on_chain if self.on_chain is not None and self.on_chain.channel_id == channel_id else None


class Deposits:
    """Funds and initialises a client's channel contracts and reads back how far they got."""

    def __init__(self, key: SigningKey, config: PaymentConfig) -> None:
        self.key = key
        self.config = config
        self.ops = 0  # messages sent to channel contracts

    def deploy(self, address: str, init: Any, channel_id: int, deposit: int) -> None:
        """Deploy the contract with ``deposit``, then initialise it (blocking: run in a thread)."""
        chain, wallet = self.config.chain, self.config.wallet
        wallet.transfer(chain, address, deposit + CONTROL_FEE, body=m.top_up(deposit, 0), init=init)
        self.ops += 1
        crash_point(CrashPoint.PAYER_DEPOSIT_LANDED)
        self.initialise(address, channel_id, deposit)

    def initialise(self, address: str, channel_id: int, deposit: int) -> None:
        """Send the init message (again, after a restart that lost it; blocking)."""
        init_body = m.init_channel(channel_id, deposit, 0, key=self.key, is_a=True)
        self.config.wallet.transfer(self.config.chain, address, CONTROL_FEE, body=init_body)
        self.ops += 1

    async def wait_until_open(self, address: str, channel_id: int) -> None:
        """Until the chain shows the contract deployed and initialised, polled with backoff: a
        worker told of it earlier would find it not open yet and refuse it. PaymentFailed
        after ``OPEN_WAIT_S``."""
        delay = self.config.chain.confirm_poll_s
        deadline = trio.current_time() + OPEN_WAIT_S
        while True:
            try:
                on_chain = await trio.to_thread.run_sync(read_channel, self.config.chain, address)
                if on_chain.state == OPEN and on_chain.channel_id == channel_id:
                    return
            except CocoonError:  # not deployed yet, or the endpoint hiccuped: ask again
                pass
            if trio.current_time() + delay > deadline:
                raise PaymentFailed(f"channel {address} not open on chain after {OPEN_WAIT_S:.0f} s")
            await trio.sleep(delay)
            delay = min(2 * delay, 10.0)

    async def look(self, address: str) -> Lookup:
        """How far the contract at ``address`` got (PaymentFailed when the chain cannot say)."""
        chain = self.config.chain
        try:
            active = await trio.to_thread.run_sync(chain.state, address) == "active"
            on_chain = await trio.to_thread.run_sync(read_channel, chain, address) if active else None
            balance = 0 if active else await trio.to_thread.run_sync(chain.balance, address)
        except CocoonError as exc:
            raise PaymentFailed(f"channel {address} is opening, the chain cannot say how far: {exc}") from exc
        return Lookup(active, on_chain, balance)

    def refund_body(self, channel_id: int, b_state: SignedSemiChannel) -> Any:
        """The uncooperative close that gives a never-confirmed channel's deposit back: our
        zero state and the worker's opening state."""
        ours = SemiChannel(channel_id, SemiChannelBody(0, 0)).sign(self.key)
        return m.start_uncooperative_close(channel_id, ours, b_state, key=self.key, is_a=True)


def opening_state(worker: bytes, channel_id: int, record: bytes) -> SignedSemiChannel:
    """The worker's signed opening state for ``channel_id``, checked (PaymentFailed if not)."""
    try:
        opening = SignedSemiChannel.from_record(record)
        opening.verify(VerifyKey(public_key_from_peer_id(worker)))
    except CocoonError as exc:
        raise PaymentFailed(f"the worker's opening state: {exc}") from exc
    if opening.state.channel_id != channel_id or opening.state.body.sent != 0:
        raise PaymentFailed("the worker's opening state is not for this channel")
    return opening
