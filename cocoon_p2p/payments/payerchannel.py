"""A client's channel to one worker, in memory, and its pay stream (``/cocoon/pay/1``).

:class:`PayerChannel` is what :mod:`.payer` keeps per channel: what it writes down
(:meth:`PayerChannel.record`), its voucher issuer, and its stream. :func:`request`
sends one request on that stream and reads its answer; :func:`connect` opens a
fresh stream to the worker (wherever it now listens) and resends the newest
voucher, whose acknowledgement may be what was lost.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from cocoon_p2p.transport.host import unblock_peer

from . import frames as pf
from .channelops import PAY_PROTOCOL, PaymentFailed, exchange
from .channelstate import ChannelState, Lifecycle
from .connection import PayConnection, Side
from .payerbook import ChannelRecord
from .vouchers import SignedSemiChannel, VoucherIssuer

RECONNECT_TRIES = 5  # to a worker that went away: it may still be starting up
REPLY_WAIT_S = 30.0  # for the worker's answer on the pay stream (it may read the chain first)


@dataclass
class PayerChannel:
    """One channel to a worker: what is written down about it, and its pay stream."""

    address: str
    worker: bytes | None
    issuer: VoucherIssuer
    b_state: SignedSemiChannel | None  # the worker's opening state, for an uncooperative close
    life: Lifecycle = field(default_factory=lambda: Lifecycle(ChannelState.OPEN))
    stream: Any = None
    conn: PayConnection = field(default_factory=lambda: PayConnection(Side.REQUESTER))
    lock: trio.Lock = field(default_factory=trio.Lock)
    last: SignedSemiChannel | None = None  # the newest voucher signed
    acked: int = 0  # the total the worker confirmed holding durably
    # Costs of jobs finished but in no voucher yet: the next voucher covers them all (while one
    # voucher is on its way, the jobs that finish meanwhile gather for the next: a group commit).
    pending: int = 0
    broken: bool = True  # no usable stream: (re)connect before the next request
    # The cooperative close was sent on chain, or is the worker's to send, by this process;
    # False for a channel restored CLOSING_COOPERATIVE: a crash may have kept it from the chain.
    close_in_hand: bool = False
    since: int = 0  # unix seconds when its deposit was handed to the chain (0: not yet)

    @property
    def state(self) -> ChannelState:
        return self.life.state

    def record(self) -> ChannelRecord:
        i = self.issuer
        return ChannelRecord(self.worker, self.address, i.channel_id, i.deposit_a, self.b_state, self.life, self.since)


async def request(ch: PayerChannel, frame: pf.PayFrame) -> pf.PayFrame:
    """Send one request on the channel's stream and read its answer (hold ``ch.lock``)."""
    try:
        with trio.fail_after(REPLY_WAIT_S):
            return await exchange(ch.stream, ch.conn, frame)
    except BaseException as exc:
        ch.broken = True  # a half-done request (failed or cancelled): the stream is useless now
        if isinstance(exc, Exception):
            raise PaymentFailed(f"pay stream to the worker failed: {exc!r}") from exc
        raise


async def connect(
    host: Any,
    peer_addrs: Callable[[bytes], list[str]],
    worker: bytes,
    ch: PayerChannel,
    *,
    tries: int = RECONNECT_TRIES,
) -> None:
    """A fresh pay stream to the worker (same PeerId, maybe a new address after a restart:
    ``peer_addrs`` asks the directory), then the newest voucher again, since its
    acknowledgement may be what was lost. ``tries``: dials, with a growing pause between."""
    for attempt in range(tries):
        addrs = [Multiaddr(a) for a in peer_addrs(worker)]
        if addrs:  # only what it announces now: its old address died with it
            host.get_peerstore().clear_addrs(ID(worker))
            host.get_peerstore().add_addrs(ID(worker), addrs, 3600)
            unblock_peer(host, worker)
        try:
            ch.stream = await host.new_stream(ID(worker), [TProtocol(PAY_PROTOCOL)])
            break
        except Exception as exc:
            if attempt == tries - 1:
                raise PaymentFailed(f"cannot reach the worker: {exc!r}") from exc
            await trio.sleep(0.5 * (attempt + 1))
    ch.conn, ch.broken = PayConnection(Side.REQUESTER), False
    if ch.last is not None and ch.acked < ch.issuer.sent:
        reply = await request(ch, pf.PayVoucher(ch.last.to_record()))
        if isinstance(reply, pf.PaidUpTo):
            ch.acked = reply.received
        elif not (isinstance(reply, pf.PayError) and reply.code == pf.PayErrorCode.REPLAYED):
            raise PaymentFailed(f"the worker did not take our newest voucher: {reply!r}")
        else:
            ch.acked = ch.issuer.sent  # it already holds it
