"""The client's side of payments (A, the payer): open channels, pay per job, settle.

A client opens one channel per worker on first use: it asks for the worker's
wallet, deploys and funds the official contract from its own wallet with
A = its PeerId key and B = the worker's, and tells the worker the address; the
worker answers with its signed opening state. After each job the client signs
the next voucher (cumulative sent += the job's cost), logs it durably, and sends
it. Open channels are kept in ``payer.json`` (atomic writes) and restored, with
the newest logged voucher of each, after a restart.

Settlement follows :mod:`.settlement`: the channel rolls over (cooperative close,
then a new one) when its deposit runs low; a worker's close proposal is signed
when it asks for no more than our vouchers gave it; a worker that vanished is
closed uncooperatively with our newest voucher and its opening state.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from nacl.signing import SigningKey, VerifyKey
from pytoniq_core import Address

from cocoon_p2p.core.durable import write_atomic
from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.identity import public_key_from_peer_id
from cocoon_p2p.transport.host import unblock_peer

from . import frames as pf
from . import messages as m
from .chain import address_of, read_channel, state_init
from .channelops import CONTROL_FEE, PAY_PROTOCOL, PaymentConfig, PaymentFailed, read_frame, send_control
from .contract import payment_channel_code
from .settlement import OPEN, UNINITED, Action, client_action, quarantine_action
from .voucherlog import VoucherLog
from .vouchers import SignedSemiChannel, VoucherIssuer

log = logging.getLogger("cocoon_p2p.payments.service")
RECONNECT_TRIES = 5  # to a worker that went away: it may still be starting up


@dataclass
class PayerChannel:
    address: str
    issuer: VoucherIssuer
    b_state: SignedSemiChannel | None  # the worker's opening state, for an uncooperative close
    stream: Any = None
    reader: pf.FrameReader = field(default_factory=pf.FrameReader)
    lock: trio.Lock = field(default_factory=trio.Lock)
    last: SignedSemiChannel | None = None  # the newest voucher signed
    acked: int = 0  # the total the worker confirmed holding durably
    broken: bool = True  # no usable stream: (re)connect before the next request

    def to_json(self) -> dict[str, Any]:
        i = self.issuer
        opening = self.b_state.to_record().hex() if self.b_state else ""
        return {"address": self.address, "channel_id": f"{i.channel_id:x}", "deposit": i.deposit_a, "b_state": opening}


class Payer:
    def __init__(self, key: SigningKey, host: Any, config: PaymentConfig) -> None:
        self.key = key
        self.host = host
        self.config = config
        self.issued = VoucherLog(config.data_dir / "issued.log")  # every voucher signed, write-ahead
        self.open: dict[bytes, PayerChannel] = {}  # worker PeerId -> channel
        self.closing: dict[str, int] = {}  # channels closed or being closed, address -> channel id
        self._opening: dict[bytes, trio.Lock] = {}
        self.onchain_ops = 0  # messages this client sent to channel contracts
        self.channels_opened = 0
        # The directory's addresses of a peer (set by the node): to find a restarted worker.
        self.addrs_of: Callable[[bytes], list[str]] = lambda peer: []
        self._restore()

    # ---- durable state ----------------------------------------------------------

    def _restore(self) -> None:
        path = self.config.data_dir / "payer.json"
        if not path.is_file():
            return
        data = json.loads(path.read_text())
        logged = [SignedSemiChannel.from_record(r) for r in self.issued.records]
        for worker_hex, d in data["open"].items():
            issuer = VoucherIssuer(channel_id=int(d["channel_id"], 16), key=self.key, deposit_a=d["deposit"])
            mine = [v for v in logged if v.state.channel_id == issuer.channel_id]
            issuer.restore(mine)
            opening = SignedSemiChannel.from_record(bytes.fromhex(d["b_state"])) if d["b_state"] else None
            ch = PayerChannel(d["address"], issuer, opening)
            ch.last = mine[-1] if mine else None  # resent on reconnect: its acknowledgement may be lost
            self.open[bytes.fromhex(worker_hex)] = ch
        self.closing = {a: int(c, 16) for a, c in data["closing"].items()}

    def _save(self) -> None:
        data = {
            "open": {w.hex(): ch.to_json() for w, ch in self.open.items()},
            "closing": {a: f"{c:x}" for a, c in self.closing.items()},
        }
        write_atomic(self.config.data_dir / "payer.json", json.dumps(data).encode())

    # ---- the pay stream -----------------------------------------------------------

    async def _request(self, ch: PayerChannel, frame: pf.PayFrame) -> pf.PayFrame:
        """Send one request on the channel's stream and read its answer (hold ``ch.lock``)."""
        try:
            await ch.stream.write(pf.encode(frame))
            return await read_frame(ch.stream, ch.reader)
        except Exception as exc:
            ch.broken = True  # a half-sent request: the stream is useless now
            raise PaymentFailed(f"pay stream to the worker failed: {exc!r}") from exc

    async def _connect(self, worker: bytes, ch: PayerChannel) -> None:
        """A fresh pay stream to the worker (same PeerId, maybe a new address after a restart:
        ``addrs_of`` asks the directory), then the newest voucher again, since its
        acknowledgement may be what was lost."""
        for attempt in range(RECONNECT_TRIES):
            addrs = [Multiaddr(a) for a in self.addrs_of(worker)]
            if addrs:  # only what it announces now: its old address died with it
                self.host.get_peerstore().clear_addrs(ID(worker))
                self.host.get_peerstore().add_addrs(ID(worker), addrs, 3600)
                unblock_peer(self.host, worker)
            try:
                ch.stream = await self.host.new_stream(ID(worker), [TProtocol(PAY_PROTOCOL)])
                break
            except Exception as exc:
                if attempt == RECONNECT_TRIES - 1:
                    raise PaymentFailed(f"cannot reach the worker: {exc!r}") from exc
                await trio.sleep(0.5 * (attempt + 1))
        ch.reader, ch.broken = pf.FrameReader(), False
        if ch.last is not None and ch.acked < ch.issuer.sent:
            reply = await self._request(ch, pf.PayVoucher(ch.last.to_record()))
            if isinstance(reply, pf.PaidUpTo):
                ch.acked = reply.received
            elif not (isinstance(reply, pf.PayError) and reply.code == "replayed"):
                raise PaymentFailed(f"the worker did not take our newest voucher: {reply!r}")
            else:
                ch.acked = ch.issuer.sent  # it already holds it

    # ---- opening and paying ---------------------------------------------------------

    async def ensure_channel(self, worker: bytes) -> PayerChannel:
        """The channel to ``worker``: opened on chain on first use, rolled over when low."""
        ch = self.open.get(worker)
        if ch is not None:
            if client_action(self.config.policy, deposit=ch.issuer.deposit_a, sent=ch.issuer.sent) is Action.KEEP:
                return ch
            await self.settle(worker)
        async with self._opening.setdefault(worker, trio.Lock()):
            if worker in self.open:
                return self.open[worker]
            return await self._open(worker)

    async def _open(self, worker: bytes) -> PayerChannel:
        probe = PayerChannel("", VoucherIssuer(channel_id=0, key=self.key, deposit_a=0), None)
        try:
            probe.stream = await self.host.new_stream(ID(worker), [TProtocol(PAY_PROTOCOL)])
        except Exception as exc:  # unreachable worker: the job goes elsewhere
            raise PaymentFailed(f"cannot reach the worker: {exc!r}") from exc
        probe.broken = False
        info = await self._request(probe, pf.PayHello())
        if not isinstance(info, pf.PayInfo):
            raise PaymentFailed(f"worker answered {info!r}")
        channel_id = random.getrandbits(128)
        data = m.initial_data(
            channel_id=channel_id,
            key_a=bytes(self.key.verify_key),
            key_b=public_key_from_peer_id(worker),
            addr_a=Address(self.config.wallet.address),
            addr_b=Address(info.wallet),
            quarantine_s=self.config.quarantine_s,
        )
        init = state_init(payment_channel_code(), data)
        address = address_of(init)
        deposit = self.config.policy.deposit_nanoton
        await trio.to_thread.run_sync(self._deploy, address, init, channel_id, deposit)
        ready = await self._request(probe, pf.ChannelOpened(address))
        if not isinstance(ready, pf.ChannelReady) or ready.channel_id != channel_id:
            raise PaymentFailed(f"worker refused the channel: {ready!r}")
        opening = SignedSemiChannel.from_record(ready.b_state)
        try:
            opening.verify(VerifyKey(public_key_from_peer_id(worker)))
        except CocoonError as exc:
            raise PaymentFailed(f"the worker's opening state: {exc}") from exc
        if opening.state.channel_id != channel_id or opening.state.body.sent != 0:
            raise PaymentFailed("the worker's opening state is not for this channel")
        ch = PayerChannel(address, VoucherIssuer(channel_id=channel_id, key=self.key, deposit_a=deposit), opening)
        ch.stream, ch.reader, ch.broken = probe.stream, probe.reader, False
        self.open[worker] = ch
        self.channels_opened += 1
        self._save()
        log.info("channel %s to %s open with %d nanoton", address, ID(worker), deposit)
        return ch

    def _deploy(self, address: str, init: Any, channel_id: int, deposit: int) -> None:
        chain, wallet = self.config.chain, self.config.wallet
        wallet.transfer(chain, address, deposit + CONTROL_FEE, body=m.top_up(deposit, 0), init=init)
        init_body = m.init_channel(channel_id, deposit, 0, key=self.key, is_a=True)
        wallet.transfer(chain, address, CONTROL_FEE, body=init_body)
        self.onchain_ops += 2

    async def pay(self, worker: bytes, cost: int) -> int:
        """Pay ``worker`` for one job: the next voucher, logged, sent, acknowledged.
        Returns the total the worker holds durably. Raises PaymentFailed."""
        ch = await self.ensure_channel(worker)
        if (
            client_action(self.config.policy, deposit=ch.issuer.deposit_a, sent=ch.issuer.sent, next_cost=cost)
            is Action.ROLL_OVER
        ):
            await self.settle(worker)  # this job is paid from the next channel
            ch = await self.ensure_channel(worker)
        async with ch.lock:  # vouchers go out in seqno order, one at a time per channel
            voucher = ch.issuer.next(cost)
            await trio.to_thread.run_sync(self.issued.append, [voucher.to_record()])  # write-ahead
            ch.last = voucher  # from here on we owe it; a lost acknowledgement is repaired later
            if ch.broken:
                await self._connect(worker, ch)
                if ch.acked >= voucher.state.body.sent:
                    return ch.acked
            try:
                reply = await self._request(ch, pf.PayVoucher(voucher.to_record()))
            except PaymentFailed:  # a stale stream (the worker restarted?): once more on a fresh one
                await self._connect(worker, ch)  # resends this voucher
                if ch.acked >= voucher.state.body.sent:
                    return ch.acked
                raise
        if not isinstance(reply, pf.PaidUpTo) or reply.received != voucher.state.body.sent:
            raise PaymentFailed(f"voucher not acknowledged: {reply!r}")
        ch.acked = reply.received
        return reply.received

    def paid_to(self, worker: bytes) -> int:
        ch = self.open.get(worker)
        return ch.issuer.sent if ch else 0

    # ---- settling ---------------------------------------------------------------------

    def _retire(self, worker: bytes, ch: PayerChannel) -> None:
        del self.open[worker]
        self.closing[ch.address] = ch.issuer.channel_id
        self._save()

    def _terms(self, ch: PayerChannel) -> m.CloseTerms:
        i = ch.issuer
        return m.CloseTerms(i.channel_id, i.deposit_a - i.sent, i.sent, max(i.seqno, 1), 1)

    async def settle(self, worker: bytes, *, uncooperative_if_gone: bool = False) -> int:
        """Close the channel to ``worker`` cooperatively on chain: the worker is paid what
        the vouchers say, we get the rest. Returns the amount paid to the worker.

        ``uncooperative_if_gone``: when the worker cannot be reached, start an
        uncooperative close instead of failing (finished later by :meth:`watch_once`)."""
        ch = self.open.get(worker)
        if ch is None:
            return 0
        terms = self._terms(ch)
        sig_a = m.sign_body(terms.body(), self.key)
        request = pf.CloseRequest(terms.balance_a, terms.balance_b, terms.seqno_a, terms.seqno_b, sig_a)
        async with ch.lock:
            if self.open.get(worker) is not ch:
                return ch.issuer.sent  # closed meanwhile (the worker proposed it)
            try:
                reply: pf.PayFrame = pf.PayError("unreachable")
                for attempt in (1, 2):  # a worker that restarted since our last request: reconnect once
                    try:
                        if ch.broken or ch.acked < ch.issuer.sent:  # gone and back, or an ack lost
                            await self._connect(worker, ch)
                        reply = await self._request(ch, request)
                        break
                    except PaymentFailed:
                        if attempt == 2:
                            raise
            except PaymentFailed:
                if not uncooperative_if_gone or ch.last is None or ch.b_state is None:
                    raise
                self._retire(worker, ch)
                body = m.start_uncooperative_close(ch.issuer.channel_id, ch.last, ch.b_state, key=self.key, is_a=True)
                await self._send(ch.address, body)
                return ch.issuer.sent
            self._retire(worker, ch)
        if not isinstance(reply, pf.CloseSigned):
            raise PaymentFailed(f"worker refused to close: {reply!r}")
        if not m.signed_by(terms.body(), reply.signature_b, public_key_from_peer_id(worker)):
            raise PaymentFailed("the worker's close signature does not verify")
        await self._send(ch.address, m.cooperative_close(terms, sig_a, reply.signature_b))
        return ch.issuer.sent

    async def agree_close(self, worker: bytes, proposal: pf.CloseProposal) -> pf.PayFrame:
        """The worker asks to close: sign if it claims no more than our vouchers gave it."""
        ch = self.open.get(worker)
        if ch is None:
            return pf.PayError("channel", "no open channel with you")
        async with ch.lock:  # no voucher in flight while we decide
            i = ch.issuer
            terms = m.CloseTerms(
                i.channel_id, proposal.balance_a, proposal.balance_b, proposal.seqno_a, proposal.seqno_b
            )
            if proposal.balance_b > i.sent or proposal.balance_a + proposal.balance_b != i.deposit_a:
                return pf.PayError("close", f"the split {proposal.balance_a}/{proposal.balance_b} is not ours")
            if min(proposal.seqno_a, proposal.seqno_b) < 1:
                return pf.PayError("close", "seqnos must be above the committed ones")
            if not m.signed_by(terms.body(), proposal.signature_b, public_key_from_peer_id(worker)):
                return pf.PayError("bad-signature", "the close is not signed by the worker")
            if self.open.get(worker) is ch:
                self._retire(worker, ch)
            return pf.CloseAgreed(m.sign_body(terms.body(), self.key))

    async def _send(self, address: str, body: object) -> None:
        await trio.to_thread.run_sync(send_control, self.config, address, body)
        self.onchain_ops += 1

    async def watch_once(self) -> dict[str, str]:
        """Follow channels being closed: forget the closed, finish quarantines that are over."""
        done: dict[str, str] = {}
        now = 0  # the chain's clock, asked once per pass and only for a quarantine
        for address, cid in list(self.closing.items()):
            try:
                on_chain = await trio.to_thread.run_sync(read_channel, self.config.chain, address)
                if on_chain.state == UNINITED or on_chain.channel_id != cid:
                    del self.closing[address]
                    self._save()
                    done[address] = "closed"
                elif on_chain.state != OPEN:
                    now = now or await trio.to_thread.run_sync(self.config.chain.now)
                    if quarantine_action(on_chain.view(now), we_are_a=True, our_seqno=0, our_sent=0) is Action.FINISH:
                        await self._send(address, m.finish_uncooperative_close())
                        done[address] = "finished"
            except CocoonError as exc:
                log.warning("channel %s: %s", address, exc)
        return done

    def close(self) -> None:
        self.issued.close()
