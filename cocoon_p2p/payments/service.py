"""Paying for jobs: ``/cocoon/pay/1`` over TON payment channels (the trio service).

One node can be a client (:class:`~.payer.Payer`: opens channels, pays per job)
and a worker (:class:`~.payee.Payee`: accepts channels and vouchers, bills jobs)
at once. This module joins them to the host: the stream handler, the requests a
worker makes to a client, and :meth:`PaymentService.watch`, the loop that applies
the settlement policy (:mod:`.settlement`) to every channel on chain.

Cancellation: a payment cancelled mid-send counts as broken (the stream is
dropped); the voucher is already in the client's log, so the next payment
carries it (vouchers are cumulative), and nothing is paid twice.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from nacl.signing import SigningKey

from cocoon_p2p.core.errors import ProtocolError
from cocoon_p2p.core.framing import NeedData
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.transport.host import close_quietly

from . import frames as pf
from .channelops import PAY_PROTOCOL, PaymentConfig, PaymentFailed, read_frame
from .payee import Payee
from .payer import Payer, PayerChannel

__all__ = ["PAY_PROTOCOL", "PaymentConfig", "PaymentFailed", "PaymentService"]
log = logging.getLogger("cocoon_p2p.payments.service")
ASK_TIMEOUT_S = 10.0


class PaymentService:
    """One node's payments: as a client (``pay``) and as a worker (the stream handler)."""

    def __init__(self, identity: Identity, host: Any, config: PaymentConfig) -> None:
        self.host = host
        self.config = config
        key = SigningKey(identity.seed)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.payer = Payer(key, host, config)
        self.payee = Payee(key, config)
        host.set_stream_handler(TProtocol(PAY_PROTOCOL), self._handle)

    # What the job protocol and the node call.
    def admission(self, client: bytes) -> str | None:
        return self.payee.admission(client)

    def bill(self, client: bytes, cost: int) -> None:
        self.payee.bill(client, cost)

    async def ensure_channel(self, worker: bytes) -> PayerChannel:
        return await self.payer.ensure_channel(worker)

    async def pay(self, worker: bytes, cost: int) -> int:
        return await self.payer.pay(worker, cost)

    async def settle(self, worker: bytes, *, uncooperative_if_gone: bool = False) -> int:
        return await self.payer.settle(worker, uncooperative_if_gone=uncooperative_if_gone)

    @property
    def onchain_ops(self) -> int:
        """Messages this node sent to channel contracts (open, init, close, challenge, finish)."""
        return self.payer.onchain_ops + self.payee.onchain_ops

    async def _handle(self, stream: Any) -> None:
        peer = bytes(stream.muxed_conn.peer_id.to_bytes())
        reader = pf.FrameReader()
        try:
            while data := await stream.read(pf.MAX_PAY_FRAME):
                reader.feed(data)
                while not isinstance(frame := reader.next(), NeedData):
                    if isinstance(frame, pf.CloseProposal):  # a worker of ours wants to settle
                        reply = await self.payer.agree_close(peer, frame)
                    else:
                        reply = await self.payee.answer(peer, frame)
                    await stream.write(pf.encode(reply))
        except ProtocolError as exc:
            log.info("peer broke the pay protocol: %s", exc)
        except Exception as exc:
            log.debug("pay stream ended: %r", exc)
        finally:
            await close_quietly(stream)

    async def _ask(self, peer: bytes, frame: pf.PayFrame) -> pf.PayFrame:
        """One request to ``peer`` on a fresh pay stream (a worker asking its client)."""
        try:
            with trio.fail_after(ASK_TIMEOUT_S):
                stream = await self.host.new_stream(ID(peer), [TProtocol(PAY_PROTOCOL)])
                try:
                    await stream.write(pf.encode(frame))
                    return await read_frame(stream, pf.FrameReader())
                finally:
                    await close_quietly(stream)
        except PaymentFailed:
            raise
        except Exception as exc:
            raise PaymentFailed(f"cannot ask {ID(peer)}: {exc!r}") from exc

    async def watch_once(self, *, shutting_down: bool = False) -> dict[str, str]:
        """One pass of the settlement policy over every channel, both sides."""
        done = {
            f"{cid:x}": how
            for cid, how in (await self.payee.watch_once(self._ask, shutting_down=shutting_down)).items()
        }
        done.update(await self.payer.watch_once())
        return done

    async def watch(self) -> None:
        """Apply the settlement policy every ``watch_interval_s`` (run in a nursery)."""
        while True:
            await trio.sleep(self.config.watch_interval_s)
            try:
                done = await self.watch_once()
            except Exception as exc:  # a chain hiccup must not stop the node
                log.warning("settlement pass failed: %r", exc)
                continue
            for channel, how in done.items():
                log.info("channel %s: %s", channel, how)

    async def shutdown(self) -> dict[str, str]:
        """Before the node stops: close what the policy says to close (a worker's earnings)."""
        return await self.watch_once(shutting_down=True)

    def paid_to(self, worker: bytes) -> int:
        return self.payer.paid_to(worker)

    def close(self) -> None:
        self.payer.close()
        self.payee.store.close()
