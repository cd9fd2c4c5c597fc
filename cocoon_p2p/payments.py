"""Paying for jobs: ``/cocoon/pay/1`` over TON payment channels (trio service, both sides).

A client opens one channel per worker on first use: it asks for the worker's
wallet, deploys and funds the official contract from its own wallet with
A = its PeerId key and B = the worker's, and tells the worker the address. The
worker reads the channel from the chain and accepts it only if the keys are the
two peers' own, the payout address its wallet, and the channel open.

After each job the client signs the next voucher (cumulative sent += the job's
cost), logs it durably, and sends it; the worker checks it, makes it durable
(:class:`~.channelstore.ChannelStore`) and only then acknowledges. A worker
refuses new jobs from a client that owes more than its credit allows.

Chain calls are blocking HTTP and run in threads. Cancellation: a payment
cancelled mid-send counts as broken (the stream is dropped); the voucher is
already in the client's log, so the next payment carries it (vouchers are
cumulative), and nothing is paid twice.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from multiaddr import Multiaddr
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from pytoniq_core import Address

from . import channel_messages as m
from . import payframes as pf
from .chain import TonCenter, Wallet, address_of, read_channel, state_init
from .channelstore import ChannelStore, ChannelTerms
from .contract_code import payment_channel_code
from .durable import write_atomic
from .errors import CocoonError, ProtocolError
from .host import close_quietly, unblock_peer
from .identity import Identity, public_key_from_peer_id
from .jobconn import NeedData
from .voucherlog import VoucherLog
from .vouchers import SignedSemiChannel, VoucherIssuer

log = logging.getLogger("cocoon_p2p.payments")
PAY_PROTOCOL = "/cocoon/pay/1"
CONTROL_FEE = 50_000_000  # nanoton attached to channel control messages for gas
RECONNECT_TRIES = 5  # to a worker that went away: it may still be starting up


class PaymentFailed(CocoonError):
    """A channel could not be opened or a voucher was not acknowledged."""


@dataclass
class PaymentConfig:
    chain: TonCenter
    wallet: Wallet
    data_dir: Path
    deposit_nanoton: int = 1_000_000_000  # what a client puts in each new channel
    credit_nanoton: int = 100_000_000  # what a worker lets a client owe before refusing jobs
    quarantine_s: int = 3600


@dataclass
class _OpenChannel:
    address: str
    issuer: VoucherIssuer
    stream: Any
    reader: pf.FrameReader = field(default_factory=pf.FrameReader)
    lock: trio.Lock = field(default_factory=trio.Lock)
    last: SignedSemiChannel | None = None  # the newest voucher signed
    acked: int = 0  # the total the worker confirmed holding durably
    broken: bool = False  # the stream failed: reconnect before the next request


class PaymentService:
    """One node's payments: as a client (``pay``) and as a worker (the stream handler)."""

    def __init__(self, identity: Identity, host: Any, config: PaymentConfig) -> None:
        self.identity = identity
        self.host = host
        self.config = config
        self.key = SigningKey(identity.seed)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ChannelStore(config.data_dir / "channels")  # worker side: vouchers received
        self.issued = VoucherLog(config.data_dir / "issued.log")  # client side: vouchers signed
        self._channel_of: dict[bytes, int] = self._load_clients()  # client PeerId -> channel id
        self.billed: dict[int, int] = {}  # worker side: what the jobs on each channel cost
        self.open: dict[bytes, _OpenChannel] = {}  # client side: worker PeerId -> channel
        self.closing: set[bytes] = set()  # worker side: clients whose channel is being closed
        self._opening: dict[bytes, trio.Lock] = {}
        # The directory's addresses of a peer (set by the node): to find a restarted worker.
        self.addrs_of: Callable[[bytes], list[str]] = lambda peer: []
        host.set_stream_handler(TProtocol(PAY_PROTOCOL), self._handle)

    # ---- worker side ------------------------------------------------------------

    def owed(self, client: bytes) -> int:
        """What ``client``'s jobs on its current channel cost, less what its vouchers paid."""
        cid = self._channel_of.get(client)
        if cid is None:
            return 0
        return self.billed.get(cid, 0) - self.store.earned(cid)

    def admission(self, client: bytes) -> str | None:
        """None if ``client`` may start a job, else why not (a job error code)."""
        if client not in self._channel_of or client in self.closing:
            return "payment"
        if self.owed(client) > self.config.credit_nanoton:
            return "payment"
        return None

    def bill(self, client: bytes, cost: int) -> None:
        cid = self._channel_of.get(client)
        if cid is not None:
            self.billed[cid] = self.billed.get(cid, 0) + cost

    def _load_clients(self) -> dict[bytes, int]:
        path = self.config.data_dir / "clients.json"
        if not path.is_file():
            return {}
        return {bytes.fromhex(k): int(v, 16) for k, v in json.loads(path.read_text()).items()}

    def _save_clients(self) -> None:
        data = {k.hex(): f"{v:x}" for k, v in self._channel_of.items()}
        write_atomic(self.config.data_dir / "clients.json", json.dumps(data).encode())

    async def _handle(self, stream: Any) -> None:
        client = bytes(stream.muxed_conn.peer_id.to_bytes())
        reader = pf.FrameReader()
        try:
            while data := await stream.read(pf.MAX_PAY_FRAME):
                reader.feed(data)
                while not isinstance(frame := reader.next(), NeedData):
                    reply = await self._answer(client, frame)
                    await stream.write(pf.encode(reply))
        except ProtocolError as exc:
            log.info("client broke the pay protocol: %s", exc)
        except Exception as exc:
            log.debug("pay stream ended: %r", exc)
        finally:
            await close_quietly(stream)

    async def _answer(self, client: bytes, frame: pf.PayFrame) -> pf.PayFrame:
        if isinstance(frame, pf.PayHello):
            return pf.PayInfo(self.config.wallet.address)
        if isinstance(frame, pf.ChannelOpened):
            try:
                on_chain = await trio.to_thread.run_sync(read_channel, self.config.chain, frame.address)
            except CocoonError as exc:
                return pf.PayError("channel", str(exc))
            problems = []
            if on_chain.state != 1:
                problems.append("not open")
            if on_chain.key_a != public_key_from_peer_id(client):
                problems.append("A's key is not the client's PeerId key")
            if on_chain.key_b != bytes(self.key.verify_key):
                problems.append("B's key is not ours")
            if on_chain.addr_b != self.config.wallet.address:
                problems.append("B's payout address is not our wallet")
            if problems:
                return pf.PayError("channel", "; ".join(problems))
            terms = ChannelTerms(
                channel_id=on_chain.channel_id,
                payer_key=on_chain.key_a,
                deposit_a=on_chain.balance_a,
                deposit_b=on_chain.balance_b,
                fine=on_chain.misbehavior_fine,
            )
            self.store.open(terms)
            self._channel_of[client] = terms.channel_id
            self.closing.discard(client)  # a new channel after a settled one
            self._save_clients()
            return pf.ChannelReady(terms.channel_id, terms.deposit_a)
        if isinstance(frame, pf.PayVoucher):
            cid = self._channel_of.get(client)
            if cid is None:
                return pf.PayError("channel", "no channel with you")
            try:
                voucher = SignedSemiChannel.from_record(frame.record)
            except ProtocolError as exc:
                return pf.PayError(exc.code, str(exc))
            result = await trio.to_thread.run_sync(self.store.accept, cid, [(voucher, 0)])  # fsync off the loop
            if result.refused:
                _, refusal = result.refused[0]
                return pf.PayError(refusal.code, str(refusal))
            return pf.PaidUpTo(self.store.earned(cid))
        if isinstance(frame, pf.CloseRequest):
            return self._countersign_close(client, frame)
        return pf.PayError("protocol", f"unexpected {type(frame).__name__}")

    def _countersign_close(self, client: bytes, req: pf.CloseRequest) -> pf.PayFrame:
        """Sign a cooperative close only if it pays us everything our newest voucher says."""
        cid = self._channel_of.get(client)
        if cid is None:
            return pf.PayError("channel", "no channel with you")
        terms = self.store.channels[cid].terms
        received, newest = self.store.earned(cid), self.store.newest(cid)
        seqno_a = newest.state.body.seqno if newest else 0
        want = m.CloseTerms(cid, terms.deposit_a - received, terms.deposit_b + received, max(seqno_a, 1), 1)
        got = m.CloseTerms(cid, req.balance_a, req.balance_b, req.seqno_a, req.seqno_b)
        if got != want:
            return pf.PayError("close", f"terms {got} differ from ours {want}")
        try:
            VerifyKey(terms.payer_key).verify(want.body().hash, req.signature_a)
        except BadSignatureError:
            return pf.PayError("bad-signature", "the close is not signed by the channel's payer")
        self.closing.add(client)  # no more jobs on this channel
        return pf.CloseSigned(m.sign_body(want.body(), self.key))

    # ---- client side ------------------------------------------------------------

    async def _request(self, ch: _OpenChannel, frame: pf.PayFrame) -> pf.PayFrame:
        async with ch.lock:
            return await self._request_locked(ch, frame)

    async def _request_locked(self, ch: _OpenChannel, frame: pf.PayFrame) -> pf.PayFrame:
        try:
            await ch.stream.write(pf.encode(frame))
            while isinstance(reply := ch.reader.next(), NeedData):
                data = await ch.stream.read(pf.MAX_PAY_FRAME)
                if not data:
                    raise PaymentFailed("the worker closed the pay stream")
                ch.reader.feed(data)
        except Exception as exc:
            ch.broken = True  # a half-sent request: the stream is useless now
            raise PaymentFailed(f"pay stream to the worker failed: {exc!r}") from exc
        return reply

    async def _reconnect(self, worker: bytes, ch: _OpenChannel) -> None:
        """A fresh pay stream to a worker that went away and came back (same PeerId, maybe a
        new address: ``addrs_of`` asks the directory), then the newest voucher again, since
        its acknowledgement may be what was lost."""
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
            reply = await self._request_locked(ch, pf.PayVoucher(ch.last.to_record()))
            if isinstance(reply, pf.PaidUpTo):
                ch.acked = reply.received
            elif not (isinstance(reply, pf.PayError) and reply.code == "replayed"):
                raise PaymentFailed(f"the worker did not take our newest voucher: {reply!r}")
            else:
                ch.acked = ch.issuer.sent  # it already holds it

    async def ensure_channel(self, worker: bytes) -> _OpenChannel:
        """The channel to ``worker``, opened on chain on first use."""
        if worker in self.open:
            return self.open[worker]
        async with self._opening.setdefault(worker, trio.Lock()):
            if worker in self.open:
                return self.open[worker]
            try:
                stream = await self.host.new_stream(ID(worker), [TProtocol(PAY_PROTOCOL)])
            except Exception as exc:  # unreachable worker: the job goes elsewhere
                raise PaymentFailed(f"cannot reach the worker: {exc!r}") from exc
            probe = _OpenChannel("", VoucherIssuer(channel_id=0, key=self.key, deposit_a=0), stream)
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
            deposit = self.config.deposit_nanoton
            await trio.to_thread.run_sync(self._deploy, address, init, channel_id, deposit)
            ready = await self._request(probe, pf.ChannelOpened(address))
            if not isinstance(ready, pf.ChannelReady) or ready.channel_id != channel_id:
                raise PaymentFailed(f"worker refused the channel: {ready!r}")
            probe.address = address
            probe.issuer = VoucherIssuer(channel_id=channel_id, key=self.key, deposit_a=deposit)
            self.open[worker] = probe
            log.info("channel %s to %s open with %d nanoton", address, ID(worker), deposit)
            return probe

    def _deploy(self, address: str, init: Any, channel_id: int, deposit: int) -> None:
        chain, wallet = self.config.chain, self.config.wallet
        wallet.transfer(chain, address, deposit + CONTROL_FEE, body=m.top_up(deposit, 0), init=init)
        init_body = m.init_channel(channel_id, deposit, 0, key=self.key, is_a=True)
        wallet.transfer(chain, address, CONTROL_FEE, body=init_body)

    async def pay(self, worker: bytes, cost: int) -> int:
        """Pay ``worker`` for one job: the next voucher, logged, sent, acknowledged.
        Returns the total the worker holds durably. Raises PaymentFailed."""
        ch = await self.ensure_channel(worker)
        async with ch.lock:  # vouchers go out in seqno order, one at a time per channel
            voucher = ch.issuer.next(cost)
            await trio.to_thread.run_sync(self.issued.append, [voucher.to_record()])  # write-ahead
            ch.last = voucher  # from here on we owe it; a lost acknowledgement is repaired later
            if ch.broken:
                await self._reconnect(worker, ch)
                if ch.acked >= voucher.state.body.sent:
                    return ch.acked
            reply = await self._request_locked(ch, pf.PayVoucher(voucher.to_record()))
        if not isinstance(reply, pf.PaidUpTo) or reply.received != voucher.state.body.sent:
            raise PaymentFailed(f"voucher not acknowledged: {reply!r}")
        ch.acked = reply.received
        return reply.received

    async def settle(self, worker: bytes) -> int:
        """Close the channel to ``worker`` cooperatively on chain: the worker is paid what
        the vouchers say, we get the rest. Returns the amount paid to the worker."""
        ch = self.open.get(worker)
        if ch is None:
            return 0
        issuer = ch.issuer
        terms = m.CloseTerms(issuer.channel_id, issuer.deposit_a - issuer.sent, issuer.sent, max(issuer.seqno, 1), 1)
        sig_a = m.sign_body(terms.body(), self.key)
        request = pf.CloseRequest(terms.balance_a, terms.balance_b, terms.seqno_a, terms.seqno_b, sig_a)
        async with ch.lock:
            for attempt in (1, 2):  # a worker that restarted since our last request: reconnect once
                try:
                    if ch.broken or ch.acked < issuer.sent:  # gone and back, or an acknowledgement lost
                        await self._reconnect(worker, ch)
                    reply = await self._request_locked(ch, request)
                    break
                except PaymentFailed:
                    if attempt == 2:
                        raise
        del self.open[worker]
        if not isinstance(reply, pf.CloseSigned):
            raise PaymentFailed(f"worker refused to close: {reply!r}")
        try:
            VerifyKey(public_key_from_peer_id(worker)).verify(terms.body().hash, reply.signature_b)
        except BadSignatureError as exc:
            raise PaymentFailed("the worker's close signature does not verify") from exc
        body = m.cooperative_close(terms, sig_a, reply.signature_b)
        await trio.to_thread.run_sync(self._send_control, ch.address, body)
        return issuer.sent

    def _send_control(self, address: str, body: Any) -> None:
        self.config.wallet.transfer(self.config.chain, address, CONTROL_FEE, body=body)

    def paid_to(self, worker: bytes) -> int:
        ch = self.open.get(worker)
        return ch.issuer.sent if ch else 0

    def close(self) -> None:
        self.store.close()
        self.issued.close()

