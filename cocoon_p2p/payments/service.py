"""Paying for jobs: ``/cocoon/pay/1`` over TON payment channels (the trio service).

One node can be a client (:class:`~.payer.Payer`: opens channels, pays per job)
and a worker (:class:`~.payee.Payee`: accepts channels and vouchers, bills jobs)
at once. This module joins them to the host: the stream handler (each stream
checked by a :class:`~.connection.PayConnection`), the requests a worker makes
to a client, :meth:`PaymentService.watch`, the loop that applies the settlement
policy (:mod:`.settlement`) to every channel on chain and writes what clients
owe as jobs are billed, and the payment metrics.

Cancellation: a payment cancelled mid-send counts as broken (the stream is
dropped); the voucher is already in the client's log, so the next payment
carries it (vouchers are cumulative), and nothing is paid twice. A channel's
lifecycle state is written before the step it names, so a step cancelled (or
cut by a restart) halfway is resumed from that state: an opening is confirmed
with the next job, a worker's close is proposed or sent again by the next
settlement pass while the chain still shows the channel open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from nacl.signing import SigningKey

from cocoon_p2p.core.errors import ProtocolError
from cocoon_p2p.core.framing import NeedData
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.metrics import Metric, metric
from cocoon_p2p.transport.host import close_quietly

from . import frames as pf
from .channelops import PAY_PROTOCOL, PaymentConfig, PaymentFailed, exchange
from .channelstate import ChannelState, CloseOutcome
from .connection import PayConnection, Side
from .payee import Misbehaved, Payee
from .payer import Payer
from .payerchannel import PayerChannel

__all__ = ["PAY_PROTOCOL", "CloseOutcome", "PaymentConfig", "PaymentFailed", "PaymentService"]
log = logging.getLogger(__name__)
ASK_TIMEOUT_S = 10.0


class PaymentService:
    """One node's payments: as a client (``pay``) and as a worker (the stream handler).

    ``peer_addrs``: a peer's currently announced addresses (the node passes its
    directory's), used to find a worker again after it restarted elsewhere.
    ``misbehaved``: told of a client whose voucher broke the channel's rules
    (forged, malformed, a seqno jump), to score it down (the node passes its peer
    guard's ``misbehaved``).
    """

    def __init__(
        self,
        identity: Identity,
        host: Any,
        config: PaymentConfig,
        *,
        peer_addrs: Callable[[bytes], list[str]] = lambda peer: [],
        misbehaved: Misbehaved | None = None,
    ) -> None:
        self.host = host
        self.config = config
        key = SigningKey(identity.seed)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.payer = Payer(key, host, config, peer_addrs=peer_addrs)
        try:
            self.payee = Payee(key, config, misbehaved=misbehaved)
        except BaseException:
            self.payer.close()
            raise
        host.set_stream_handler(TProtocol(PAY_PROTOCOL), self._handle)

    # ---- what the job protocol and the node call ----------------------------------

    def admission(self, client: bytes) -> str | None:
        """None if ``client`` may start a job here, else the job error code to refuse it with."""
        return self.payee.admission(client)

    def bill(self, client: bytes, cost: int) -> None:
        """Record ``cost`` nanoton owed by ``client`` for a job whose result was sent."""
        self.payee.bill(client, cost)

    @property
    def pay_linger_s(self) -> float:
        """How long a client's finished jobs gather before one voucher pays for them all."""
        return self.config.pay_linger_s

    async def ensure_channel(self, worker: bytes) -> PayerChannel:
        """The open channel to ``worker`` (opened on chain first if needed). Raises a CocoonError."""
        return await self.payer.ensure_channel(worker)

    async def pay(self, worker: bytes, cost: int) -> int:
        """Pay ``cost`` for a job; the total ``worker`` holds durably. Raises PaymentFailed."""
        return await self.payer.pay(worker, cost)

    async def channel_ended(self, worker: bytes) -> None:
        """``worker`` is closing our channel: close it with it and open a new one next
        (see :meth:`Payer.channel_ended`)."""
        await self.payer.channel_ended(worker)

    async def settle(self, worker: bytes, *, uncooperative_if_gone: bool = False) -> int:
        """Close our channel to ``worker``; what it was paid (see :meth:`Payer.settle`)."""
        return await self.payer.settle(worker, uncooperative_if_gone=uncooperative_if_gone)

    def paid_to(self, worker: bytes) -> int:
        """What our current channel to ``worker`` has paid it."""
        return self.payer.paid_to(worker)

    @property
    def onchain_ops(self) -> int:
        """Messages this node sent to channel contracts (open, init, close, challenge, finish)."""
        return self.payer.onchain_ops + self.payee.onchain_ops

    # ---- the stream handler and the worker's requests -------------------------------

    async def _handle(self, stream: Any) -> None:
        peer = bytes(stream.muxed_conn.peer_id.to_bytes())
        conn = PayConnection(Side.RESPONDER)
        try:
            while data := await stream.read(pf.MAX_PAY_FRAME):
                conn.receive_data(data)
                while not isinstance(frame := conn.next_event(), NeedData):
                    if isinstance(frame, pf.CloseProposal):  # a worker of ours wants to settle
                        reply = await self.payer.agree_close(peer, frame)
                    else:
                        reply = await self.payee.answer(peer, frame)
                    await stream.write(conn.send(reply))
        except ProtocolError as exc:
            log.info("peer broke the pay protocol: %s", exc, extra=fields(peer=peer))
            if conn.errored is exc:  # theirs: say why before hanging up
                try:
                    await stream.write(conn.send(pf.PayError(exc.code, str(exc))))
                except Exception as write_exc:
                    log.debug("pay stream: the error reply was not sent: %r", write_exc, extra=fields(peer=peer))
        except Exception as exc:
            log.debug("pay stream ended: %r", exc, extra=fields(peer=peer))
        finally:
            await close_quietly(stream)

    async def _ask(self, peer: bytes, frame: pf.PayFrame) -> pf.PayFrame:
        """One request to ``peer`` on a fresh pay stream (a worker asking its client)."""
        try:
            with trio.fail_after(ASK_TIMEOUT_S):
                stream = await self.host.new_stream(ID(peer), [TProtocol(PAY_PROTOCOL)])
                try:
                    return await exchange(stream, PayConnection(Side.REQUESTER), frame)
                finally:
                    await close_quietly(stream)
        except PaymentFailed:
            raise
        except Exception as exc:
            raise PaymentFailed(f"cannot ask {ID(peer)}: {exc!r}") from exc

    # ---- settlement ------------------------------------------------------------------

    async def watch_once(self, *, shutting_down: bool = False) -> dict[str, CloseOutcome]:
        """One pass of the settlement policy over every channel, both sides: what was done,
        by channel (a worker's by channel id in hex, a client's by contract address)."""
        worker_side = await self.payee.watch_once(self._ask, shutting_down=shutting_down)
        done = {f"{cid:x}": how for cid, how in worker_side.items()}
        done.update(await self.payer.watch_once())
        return done

    async def watch(self) -> None:
        """Apply the settlement policy every ``watch_interval_s``, and write what clients owe
        as jobs are billed (run in a nursery). Cancelled: stops between passes or inside
        one; each step's state is already written; bills not yet written are written by
        :meth:`close`."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.payee.keep_bills_durable)
            await self._settle_forever()

    async def _settle_forever(self) -> None:
        while True:
            await trio.sleep(self.config.watch_interval_s)
            try:
                done = await self.watch_once()
            except Exception as exc:  # a chain hiccup must not stop the node
                log.warning("settlement pass failed: %r", exc)
                continue
            for channel, how in done.items():
                log.info("settled: %s", how, extra=fields(channel=channel))

    async def shutdown(self) -> dict[str, CloseOutcome]:
        """Before the node stops: close what the policy says to close (a worker's earnings)."""
        return await self.watch_once(shutting_down=True)

    def close(self) -> None:
        """Write the last bills and close the durable logs (after every task using the
        service has stopped)."""
        try:
            self.payee.close_store()
        finally:
            self.payer.close()

    # ---- metrics -------------------------------------------------------------------------

    def metrics(self) -> list[Metric]:
        """Channels by role and by lifecycle state, unsettled earnings, deposit left, chain operations."""
        store, payer = self.payee.store, self.payer
        unsettled = store.unsettled()
        open_channels = payer.open
        out = [
            metric("cocoon_channels", "gauge", "Payment channels not yet closed", len(unsettled), role="worker"),
            metric("cocoon_channels", "gauge", "Payment channels not yet closed", len(open_channels), role="client"),
            metric(
                "cocoon_channel_earned_unsettled_nanoton",
                "gauge",
                "Worker: held in vouchers, not yet paid out on chain",
                sum(store.earned(cid) for cid in unsettled),
            ),
            metric(
                "cocoon_channel_deposit_left_nanoton",
                "gauge",
                "Client: what its open channels can still pay",
                sum(ch.issuer.deposit_a - ch.issuer.sent for ch in open_channels.values()),
            ),
            metric(
                "cocoon_onchain_operations_total", "counter", "Messages sent to channel contracts", self.onchain_ops
            ),
        ]
        for role, counts in (("worker", store.count_by_state()), ("client", payer.count_by_state())):
            out += [
                metric(
                    "cocoon_channel_states",
                    "gauge",
                    "Payment channels by lifecycle state",
                    counts[s],
                    role=role,
                    state=s.value,
                )
                for s in ChannelState
                if not (role == "client" and s is ChannelState.CLOSED)  # a client forgets closed channels
            ]
        return out
