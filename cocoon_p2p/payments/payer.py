"""The client's side of payments (A, the payer): open channels, pay per job, settle.

A client opens one channel per worker on first use: it asks for the worker's
wallet, writes the new channel down as OPENING, deploys and funds the official
contract from its own wallet with A = its PeerId key and B = the worker's, and
tells the worker the address; the worker answers with its signed opening state
and the channel is OPEN. After each job the client signs the next voucher
(cumulative sent += the job's cost), logs it durably, and sends it.

Each channel's :class:`~.channelstate.Lifecycle` is written to ``payer.json``
(:mod:`.payerbook`) before the client acts on it, and restored after a restart
with the newest logged voucher: an OPEN channel carries on, an OPENING one is
confirmed if the chain shows it open (else abandoned), a closing one is followed
until the chain shows it closed.

Settlement follows :mod:`.settlement`: the channel rolls over (cooperative close,
then a new one) when its deposit runs low; a worker's close proposal is signed
when it asks for no more than our vouchers gave it; a worker that vanished is
closed uncooperatively with our newest voucher and its opening state.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from nacl.signing import SigningKey
from pytoniq_core import Address

from cocoon_p2p.core.crashpoints import CrashPoint, crash_point
from cocoon_p2p.core.durable import write_atomic
from cocoon_p2p.core.errors import CocoonError
from cocoon_p2p.core.identity import public_key_from_peer_id
from cocoon_p2p.core.logfields import fields

from . import deposits
from . import frames as pf
from . import messages as m
from .chain import address_of, read_channel, state_init
from .channelops import PAY_PROTOCOL, PaymentConfig, PaymentFailed, send_control
from .channelstate import CLOSING, ChannelEvent, ChannelState, CloseOutcome, Lifecycle
from .closeterms import payer_terms, proposal_refusal
from .contract import payment_channel_code
from .deposits import Deposits, opening_state
from .payerbook import encode_book, load_book
from .payerchannel import PayerChannel, connect, request
from .settlement import OPEN, UNINITED, Action, client_action, quarantine_action
from .voucherlog import VoucherLog
from .vouchers import VoucherIssuer

log = logging.getLogger(__name__)
_E = ChannelEvent


class Payer:
    """A client's channels, one per worker it pays, and the vouchers it signed."""

    def __init__(
        self,
        key: SigningKey,
        host: Any,
        config: PaymentConfig,
        *,
        peer_addrs: Callable[[bytes], list[str]] = lambda peer: [],
    ) -> None:
        self.key = key
        self.host = host
        self.config = config
        self.peer_addrs = peer_addrs  # a peer's announced addresses: to find a restarted worker
        self.issued = VoucherLog(config.data_dir / "issued.log")  # every voucher signed, write-ahead
        self.deposits = Deposits(key, config)  # the chain side of opening channels
        self.channels: dict[str, PayerChannel] = {}  # address -> every channel not yet closed
        self._current: dict[bytes, PayerChannel] = {}  # worker -> its OPENING or OPEN channel
        self._opening: dict[bytes, trio.Lock] = {}
        self._control_ops = 0  # closes and other control messages sent to channel contracts
        self.channels_opened = 0
        self.open_waits_s: list[float] = []  # per channel opened: deposit sent to OPEN, in seconds
        try:
            self._restore()
        except BaseException:
            self.issued.close()
            raise

    @property
    def open(self) -> dict[bytes, PayerChannel]:
        """Worker -> its OPEN channel."""
        return {w: ch for w, ch in self._current.items() if ch.state is ChannelState.OPEN}

    @property
    def current(self) -> dict[bytes, PayerChannel]:
        """Worker -> the channel jobs to it are paid through: OPEN, or still OPENING."""
        return dict(self._current)

    @property
    def closing(self) -> dict[str, PayerChannel]:
        """Address -> each channel being closed."""
        return {a: ch for a, ch in self.channels.items() if ch.state in CLOSING}

    @property
    def onchain_ops(self) -> int:
        """Messages this client sent to channel contracts (deposits, inits, closes)."""
        return self._control_ops + self.deposits.ops

    def count_by_state(self) -> Counter[ChannelState]:
        return Counter(ch.state for ch in self.channels.values())

    def paid_to(self, worker: bytes) -> int:
        """What the vouchers of our current channel to ``worker`` have sent it."""
        ch = self._current.get(worker)
        return ch.issuer.sent if ch else 0

    # ---- durable state ----------------------------------------------------------

    def _restore(self) -> None:
        """Channels from ``payer.json``, each continuing after its newest logged voucher
        (StateFileDamaged, never a fresh start, if the two files do not allow it)."""
        records, logged = load_book(self.config.data_dir / "payer.json", self.issued)
        for r in records:
            issuer = VoucherIssuer(channel_id=r.channel_id, key=self.key, deposit_a=r.deposit)
            mine = [v for v in logged if v.state.channel_id == r.channel_id]
            issuer.restore(mine)
            ch = PayerChannel(r.address, r.worker, issuer, r.b_state, r.life, since=r.since)
            ch.last = mine[-1] if mine else None  # resent on reconnect: its acknowledgement may be lost
            self.channels[r.address] = ch
            if r.worker is not None and ch.state in (ChannelState.OPENING, ChannelState.OPEN):
                self._current[r.worker] = ch

    def _save(self) -> None:
        book = encode_book(ch.record() for ch in self.channels.values())
        write_atomic(self.config.data_dir / "payer.json", book)

    def _advance(self, ch: PayerChannel, event: ChannelEvent) -> None:
        """Apply ``event`` to ``ch`` and write it down, before acting on it."""
        before, ch.life = ch.life, ch.life.apply(event)  # ForbiddenTransition: nothing changed
        try:
            self._save()
        except BaseException:
            ch.life = before
            raise
        if ch.state is ChannelState.CLOSED:
            del self.channels[ch.address]
        if ch.state not in (ChannelState.OPENING, ChannelState.OPEN) and ch.worker is not None:
            if self._current.get(ch.worker) is ch:
                del self._current[ch.worker]

    # ---- the pay stream -----------------------------------------------------------

    # ---- opening and paying ---------------------------------------------------------

    async def ensure_channel(self, worker: bytes) -> PayerChannel:
        """The channel to ``worker``: opened on chain on first use (or confirmed, if an
        opening was interrupted), rolled over when low."""
        ch = self._current.get(worker)
        if ch is not None and ch.state is ChannelState.OPEN:
            if client_action(self.config.policy, deposit=ch.issuer.deposit_a, sent=ch.issuer.sent) is Action.KEEP:
                return ch
            await self.settle(worker)
        async with self._opening.setdefault(worker, trio.Lock()):
            ch = self._current.get(worker)
            if ch is not None and ch.state is ChannelState.OPENING:
                await self._resume_opening(worker, ch)
                ch = self._current.get(worker)
            if ch is not None and ch.state is ChannelState.OPEN:
                return ch
            await self._finish_closes(worker)
            return await self._open(worker)

    async def _finish_closes(self, worker: bytes) -> None:
        """Before a new channel to ``worker``: send the cooperative closes a restart left
        unsent, while the worker still takes them as closes of our current channel with it."""
        for old in list(self.channels.values()):
            if old.worker == worker and old.state is ChannelState.CLOSING_COOPERATIVE and not old.close_in_hand:
                try:
                    await self._close_again(old)
                except CocoonError as exc:  # watch_once asks again; the worker may close it itself
                    log.warning("could not finish its close: %s", exc, extra=fields(channel=old.address, peer=worker))

    async def _open(self, worker: bytes) -> PayerChannel:
        try:
            stream = await self.host.new_stream(ID(worker), [TProtocol(PAY_PROTOCOL)])
        except Exception as exc:  # unreachable worker: the job goes elsewhere
            raise PaymentFailed(f"cannot reach the worker: {exc!r}") from exc
        probe = PayerChannel("", worker, VoucherIssuer(0, self.key, 0), None, stream=stream, broken=False)
        channel_id = random.getrandbits(128)
        info = await request(probe, pf.PayHello(channel_id))
        if not isinstance(info, pf.PayInfo):
            raise PaymentFailed(f"worker answered {info!r}")
        # The worker's opening state before the deposit leaves: with it we can close the
        # channel alone (and get the deposit back) should the worker never confirm it.
        b_opening = opening_state(worker, channel_id, info.b_state) if info.b_state else None
        data = m.initial_data(
            channel_id=channel_id,
            key_a=bytes(self.key.verify_key),
            key_b=public_key_from_peer_id(worker),
            addr_a=Address(self.config.wallet.address),
            addr_b=Address(info.wallet),
            quarantine_s=self.config.quarantine_s,
        )
        init = state_init(payment_channel_code(), data)
        deposit = self.config.policy.deposit_nanoton
        issuer = VoucherIssuer(channel_id=channel_id, key=self.key, deposit_a=deposit)
        opening = Lifecycle(ChannelState.OPENING)
        ch = PayerChannel(address_of(init), worker, issuer, b_opening, opening, probe.stream, probe.conn, broken=False)
        self.channels[ch.address], self._current[worker] = ch, ch
        self._save()  # written down before the deposit leaves
        crash_point(CrashPoint.PAYER_OPENING_WRITTEN)
        ch.since = int(time.time())
        self._save()  # from here on the deposit may land, even if we die before hearing of it
        t0 = time.monotonic()
        await trio.to_thread.run_sync(self.deposits.deploy, ch.address, init, channel_id, deposit)
        crash_point(CrashPoint.PAYER_DEPOSIT_SENT)
        await self.deposits.wait_until_open(ch.address, channel_id)
        await self._confirm(worker, ch)
        self.open_waits_s.append(time.monotonic() - t0)
        log.info("channel open", extra=fields(channel=ch.address, peer=worker, nanoton=deposit))
        return ch

    async def _confirm(self, worker: bytes, ch: PayerChannel) -> None:
        """Tell the worker the contract's address and take its signed opening state: OPEN."""
        if ch.broken:
            await connect(self.host, self.peer_addrs, worker, ch)
        ready = await request(ch, pf.ChannelOpened(ch.address))
        if not isinstance(ready, pf.ChannelReady) or ready.channel_id != ch.issuer.channel_id:
            raise PaymentFailed(f"worker refused the channel: {ready!r}")
        ch.b_state = opening_state(worker, ch.issuer.channel_id, ready.b_state)
        self._advance(ch, _E.OPEN_CONFIRMED)
        self.channels_opened += 1

    async def _refund(self, ch: PayerChannel) -> None:
        """A contract holding our deposit that its worker never confirmed: close it alone with
        our zero state and the worker's opening state; :meth:`watch_once` finishes it after
        the quarantine and the deposit comes back."""
        assert ch.b_state is not None
        self._advance(ch, _E.UNCOOPERATIVE_CLOSE_STARTED)
        await self._send(ch.address, self.deposits.refund_body(ch.issuer.channel_id, ch.b_state))

    async def _resume_opening(self, worker: bytes, ch: PayerChannel) -> None:
        """An opening that did not finish (a restart, a refusal). Open on chain: confirm it.
        Deployed with our deposit but not initialised (the init was lost): initialise it
        again. Not deployed: abandon it (the caller opens a new channel) if its deposit was
        never handed to the chain, else once it no longer can land (``OPEN_WAIT_S`` after
        it was sent: a wallet message is valid for 60 s). Never forgotten with money in it:
        a contract holding a balance is not abandoned."""
        cid, seen = ch.issuer.channel_id, await self.deposits.look(ch.address)
        ours = seen.ours(cid)
        if ours is not None and ours.state == UNINITED:
            log.warning(
                "it holds our deposit but was never initialised: initialising it",
                extra=fields(channel=ch.address, peer=worker),
            )
            await trio.to_thread.run_sync(self.deposits.initialise, ch.address, cid, ch.issuer.deposit_a)
            await self.deposits.wait_until_open(ch.address, cid)
            ours = (await self.deposits.look(ch.address)).ours(cid)
        if ours is not None and ours.state == OPEN:
            try:
                await self._confirm(worker, ch)
                return
            except PaymentFailed as exc:
                if ch.b_state is None or time.time() - ch.since < deposits.OPEN_WAIT_S:
                    raise
                log.warning(
                    "the worker never confirmed it (%s): refunding our deposit",
                    exc,
                    extra=fields(channel=ch.address, peer=worker),
                )
                await self._refund(ch)
                raise PaymentFailed(f"channel {ch.address} never confirmed by the worker: refunding it") from exc
        if seen.active or seen.balance > 0 or (ch.since and time.time() - ch.since < deposits.OPEN_WAIT_S):
            raise PaymentFailed(f"channel {ch.address} is still opening (its deposit may not have landed yet)")
        log.warning("never opened on chain: abandoned", extra=fields(channel=ch.address, peer=worker))
        self._advance(ch, _E.OPEN_ABANDONED)

    async def pay(self, worker: bytes, cost: int) -> int:
        """Pay ``worker`` for one job: a voucher covering it, logged, sent, acknowledged.
        Jobs paid while another voucher is on its way share the next one (one voucher, one
        write and one round trip for all of them). Returns the total the worker holds
        durably. Raises PaymentFailed."""
        ch = await self.ensure_channel(worker)
        next_cost = ch.pending + cost
        if (
            client_action(self.config.policy, deposit=ch.issuer.deposit_a, sent=ch.issuer.sent, next_cost=next_cost)
            is Action.ROLL_OVER
        ):
            await self.settle(worker)  # this job is paid from the next channel
            ch = await self.ensure_channel(worker)
        ch.pending += cost
        return await self._send_pending(worker, ch)

    async def _send_pending(self, worker: bytes, ch: PayerChannel) -> int:
        """One voucher for every cost waiting on ``ch`` (none: the total held)."""
        async with ch.lock:  # vouchers go out in seqno order, one at a time per channel
            if not ch.pending:  # the voucher sent while we waited covered ours
                return ch.acked
            amount, ch.pending = ch.pending, 0
            voucher = ch.issuer.next(amount)
            crash_point(CrashPoint.PAYER_VOUCHER_SIGNED)
            await trio.to_thread.run_sync(self.issued.append, [voucher.to_record()])  # write-ahead
            crash_point(CrashPoint.PAYER_VOUCHER_LOGGED)
            ch.last = voucher  # from here on we owe it; a lost acknowledgement is repaired later
            if ch.broken:
                await connect(self.host, self.peer_addrs, worker, ch)
                if ch.acked >= voucher.state.body.sent:
                    return ch.acked
            try:
                reply = await request(ch, pf.PayVoucher(voucher.to_record()))
            except PaymentFailed:  # a stale stream (the worker restarted?): once more on a fresh one
                await connect(self.host, self.peer_addrs, worker, ch)  # resends this voucher
                if ch.acked >= voucher.state.body.sent:
                    return ch.acked
                raise
        if not isinstance(reply, pf.PaidUpTo) or reply.received != voucher.state.body.sent:
            raise PaymentFailed(f"voucher not acknowledged: {reply!r}")
        ch.acked = reply.received
        return reply.received

    # ---- settling ---------------------------------------------------------------------

    async def _close_request(self, worker: bytes, ch: PayerChannel, close: pf.CloseRequest) -> pf.PayFrame:
        if ch.broken or ch.acked < ch.issuer.sent:  # gone and back, or an acknowledgement lost
            await connect(self.host, self.peer_addrs, worker, ch)
        return await request(ch, close)

    async def settle(self, worker: bytes, *, uncooperative_if_gone: bool = False) -> int:
        """Close the channel to ``worker`` cooperatively on chain: the worker is paid what
        the vouchers say, we get the rest. Returns the amount paid to the worker.

        ``uncooperative_if_gone``: when the worker cannot be reached, start an
        uncooperative close instead of failing (finished later by :meth:`watch_once`).

        An opening interrupted before the worker confirmed it (the worker died while the
        deposit landed) is resumed first, so that a deposit is never left in a contract
        nobody closes: confirmed, then closed like any open channel; or abandoned."""
        ch = self._current.get(worker)
        if ch is not None and ch.state is ChannelState.OPENING:
            async with self._opening.setdefault(worker, trio.Lock()):
                if ch.state is ChannelState.OPENING:
                    await self._resume_opening(worker, ch)  # PaymentFailed: still opening
            ch = self._current.get(worker)
        if ch is None or ch.state is not ChannelState.OPEN:
            return 0
        if ch.pending:  # jobs finished and not in a voucher yet: paid before we close
            with contextlib.suppress(PaymentFailed):  # a voucher logged and unacknowledged still counts
                await self._send_pending(worker, ch)
        request = self._our_close(ch)
        async with ch.lock:
            if ch.state is not ChannelState.OPEN:
                return ch.issuer.sent  # closed meanwhile (the worker proposed it)
            try:
                try:
                    reply = await self._close_request(worker, ch, request)
                except PaymentFailed:  # a worker that restarted since our last request: once more
                    reply = await self._close_request(worker, ch, request)
            except PaymentFailed:
                if not uncooperative_if_gone or ch.last is None or ch.b_state is None:
                    raise
                self._advance(ch, _E.UNCOOPERATIVE_CLOSE_STARTED)
                body = m.start_uncooperative_close(ch.issuer.channel_id, ch.last, ch.b_state, key=self.key, is_a=True)
                await self._send(ch.address, body)
                return ch.issuer.sent
            self._advance(ch, _E.CLOSE_PROPOSED)  # no more vouchers on it, whatever the answer
            ch.close_in_hand = isinstance(reply, pf.CloseSigned)  # else watch_once asks again
        await self._send_close(ch, request, reply)
        return ch.issuer.sent

    def _our_close(self, ch: PayerChannel) -> pf.CloseRequest:
        """The cooperative close our vouchers allow, signed by us."""
        t = payer_terms(ch.issuer)
        return pf.CloseRequest(t.balance_a, t.balance_b, t.seqno_a, t.seqno_b, m.sign_body(t.body(), self.key))

    async def _send_close(self, ch: PayerChannel, ours: pf.CloseRequest, reply: pf.PayFrame) -> None:
        """Send the close the worker countersigned in ``reply`` on chain (PaymentFailed if it did not)."""
        assert ch.worker is not None
        if not isinstance(reply, pf.CloseSigned):
            raise PaymentFailed(f"worker refused to close: {reply!r}")
        terms = m.CloseTerms(ch.issuer.channel_id, ours.balance_a, ours.balance_b, ours.seqno_a, ours.seqno_b)
        if not m.signed_by(terms.body(), reply.signature_b, public_key_from_peer_id(ch.worker)):
            raise PaymentFailed("the worker's close signature does not verify")
        crash_point(CrashPoint.PAYER_CLOSE_WRITTEN)
        await self._send(ch.address, m.cooperative_close(terms, ours.signature_a, reply.signature_b))
        ch.close_in_hand = True
        crash_point(CrashPoint.PAYER_CLOSE_SENT)

    async def _close_again(self, ch: PayerChannel) -> None:
        """A cooperative close written down before a restart, never seen on chain: ask the
        worker to countersign the same terms again and send it (PaymentFailed if it will not)."""
        assert ch.worker is not None
        request = self._our_close(ch)
        async with ch.lock:
            reply = await self._close_request(ch.worker, ch, request)
        await self._send_close(ch, request, reply)

    async def channel_ended(self, worker: bytes) -> None:
        """The worker refuses jobs on our channel because it is closing it: it signed our
        close and went away before we heard (a crash), or closes it on its own. Close it
        cooperatively if it countersigns our newest terms again; otherwise stop paying into
        it anyway and let :meth:`watch_once` follow its close on chain. Either way the next
        :meth:`ensure_channel` opens a new channel."""
        ch = self._current.get(worker)
        if ch is None or ch.state is not ChannelState.OPEN:
            return
        try:
            await self.settle(worker)
            log.info("the worker was closing it; closed cooperatively", extra=fields(channel=ch.address, peer=worker))
        except PaymentFailed as exc:
            async with ch.lock:
                if ch.state is ChannelState.OPEN:
                    self._advance(ch, _E.CLOSE_PROPOSED)  # no more vouchers on it
                ch.close_in_hand = True  # the worker is closing it: not ours to ask again
            log.warning(
                "the worker is closing it (%s); following its close on chain",
                exc,
                extra=fields(channel=ch.address, peer=worker),
            )

    async def agree_close(self, worker: bytes, proposal: pf.CloseProposal) -> pf.PayFrame:
        """The worker asks to close: sign if it claims no more than our vouchers gave it."""
        ch = self._current.get(worker)
        if ch is None or ch.state is not ChannelState.OPEN:
            return pf.PayError(pf.PayErrorCode.CHANNEL, "no open channel with you")
        async with ch.lock:  # no voucher in flight while we decide
            refusal = proposal_refusal(ch.issuer, proposal, public_key_from_peer_id(worker))
            if refusal is not None:
                return refusal
            if ch.state is ChannelState.OPEN:
                self._advance(ch, _E.CLOSE_PROPOSED)
            ch.close_in_hand = True  # the worker sends it
            p = proposal
            terms = m.CloseTerms(ch.issuer.channel_id, p.balance_a, p.balance_b, p.seqno_a, p.seqno_b)
            return pf.CloseAgreed(m.sign_body(terms.body(), self.key))

    async def _send(self, address: str, body: object) -> None:
        await trio.to_thread.run_sync(send_control, self.config, address, body)
        self._control_ops += 1

    async def watch_once(self) -> dict[str, CloseOutcome]:
        """Follow channels being closed: forget the closed, finish quarantines that are over;
        settle openings left hanging past ``OPEN_WAIT_S`` (confirmed, abandoned, refunded);
        and send again a newest voucher whose acknowledgement never came."""
        await self._resend_unacknowledged()
        done: dict[str, CloseOutcome] = {}
        for ch in list(self.channels.values()):
            stale = ch.since and time.time() - ch.since > deposits.OPEN_WAIT_S
            if ch.state is ChannelState.OPENING and ch.worker and stale:
                try:
                    async with self._opening.setdefault(ch.worker, trio.Lock()):
                        await self._resume_opening(ch.worker, ch)
                except CocoonError as exc:
                    log.warning("opening: %s", exc, extra=fields(channel=ch.address, peer=ch.worker))
        now = 0  # the chain's clock, asked once per pass and only for a quarantine
        for address, ch in self.closing.items():
            try:
                on_chain = await trio.to_thread.run_sync(read_channel, self.config.chain, address)
                if on_chain.state == UNINITED or on_chain.channel_id != ch.issuer.channel_id:
                    self._advance(ch, _E.CLOSED_ON_CHAIN)
                    done[address] = CloseOutcome.CLOSED
                elif on_chain.state == OPEN:
                    if ch.state is ChannelState.CLOSING_COOPERATIVE and not ch.close_in_hand and ch.worker:
                        await self._close_again(ch)
                        done[address] = CloseOutcome.COOPERATIVE
                else:  # in quarantine
                    if ch.state is not ChannelState.CLOSING_UNCOOPERATIVE:
                        self._advance(ch, _E.QUARANTINE_SEEN)
                    now = now or await trio.to_thread.run_sync(self.config.chain.now)
                    if quarantine_action(on_chain.view(now), we_are_a=True, our_seqno=0, our_sent=0) is Action.FINISH:
                        self._advance(ch, _E.CLOSE_FINISHED)
                        await self._send(address, m.finish_uncooperative_close())
                        done[address] = CloseOutcome.FINISHED
            except CocoonError as exc:
                log.warning("watching the channel: %s", exc, extra=fields(channel=address, peer=ch.worker))
                done[address] = CloseOutcome.FAILED
        return done

    async def _resend_unacknowledged(self) -> None:
        """A voucher signed and logged but never acknowledged (the worker died as it came,
        and was not back before our reconnects gave up) would otherwise wait for our next
        job to that worker, or settlement; a worker back meanwhile and closing on its own
        would close short of it. Each pass offers it again."""
        for worker, ch in list(self.open.items()):
            if ch.last is None or ch.acked >= ch.issuer.sent or ch.lock.locked():
                continue  # acknowledged, or a payment is on its way and will do it
            try:
                async with ch.lock:
                    if ch.acked < ch.issuer.sent:  # one dial a pass: a worker gone for good stalls no pass
                        await connect(self.host, self.peer_addrs, worker, ch, tries=1)
            except CocoonError as exc:
                log.info(
                    "our newest voucher is still not acknowledged: %s",
                    exc,
                    extra=fields(channel=ch.address, peer=worker),
                )

    def close(self) -> None:
        """Close the voucher log (the payer is unusable after)."""
        self.issued.close()
