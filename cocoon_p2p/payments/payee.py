"""The worker's side of payments (B, the payee): accept channels and vouchers, bill jobs, settle.

A channel is accepted only as the chain shows it: open, A's key the client's
PeerId key, B's key and payout address ours. Each voucher is checked and made
durable (:class:`~.store.ChannelStore`) before it is acknowledged. Jobs are
admitted only on a client's current channel while it is OPEN; its lifecycle
state is written to the store before the worker acts on it, so a restarted
worker neither admits jobs on a channel it was closing nor forgets a close it
started. What each client owes (its jobs' cost less what its vouchers paid) is
kept in the store too, group-committed as jobs are billed
(:meth:`Payee.keep_bills_durable`), so a restart gives no fresh credit to a
client that stopped paying. A client whose voucher breaks the channel's rules
(a forged signature, a seqno jump) is reported through ``misbehaved``.

Settlement follows :mod:`.settlement`: the worker closes a channel holding its
earnings when they pass its limit, when the payer has gone silent, or when the
worker shuts down; cooperatively when the payer countersigns, otherwise by an
uncooperative close with the payer's newest voucher, finished after quarantine.
It challenges a quarantined state older than the newest voucher it holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import trio
from nacl.signing import SigningKey

from cocoon_p2p.core.crashpoints import CrashPoint, crash_point
from cocoon_p2p.core.durable import StateFileDamaged, read_json, write_atomic
from cocoon_p2p.core.errors import CocoonError, ProtocolError, ReplayedMessage
from cocoon_p2p.core.identity import public_key_from_peer_id
from cocoon_p2p.core.logfields import fields

from . import frames as pf
from . import messages as m
from .chain import ChannelOnChain, read_channel
from .channelops import PaymentConfig, PaymentFailed, b_state, send_control
from .channelstate import ChannelEvent, ChannelState, CloseOutcome
from .closeterms import payee_terms
from .errors import ChannelConflict
from .frames import PayErrorCode
from .settlement import OPEN, UNINITED, Action, quarantine_action, worker_action
from .store import ChannelStore, ChannelTerms
from .vouchers import SignedSemiChannel

log = logging.getLogger(__name__)
_E, _S = ChannelEvent, ChannelState

# Sends one frame to a peer on a fresh pay stream and returns its answer.
Ask = Callable[[bytes, pf.PayFrame], Awaitable[pf.PayFrame]]
# The job protocol's refusal codes (admission answers with them): "pay first", and "your
# channel here is closing or closed, open a new one" (we signed or started its close, perhaps
# without the client hearing of it: a crash between the two).
PAYMENT_REQUIRED = "payment"
CHANNEL_ENDED = "channel-ended"
# The least time between two writes of what jobs billed: a group commit of everything
# billed meanwhile, so a busy worker writes a few times a second, not once per job.
BILL_WRITE_INTERVAL_S = 0.05
# Reads of a channel a client says is open before refusing it (backing off from the chain
# client's poll interval: 1+2+4 s on TON, within the client's wait for our answer).
OPEN_READS = 4
# How long a cooperative close sent (by us, or by the client with our signature) may take to
# show on chain before the settlement policy acts on the channel again: on TON it lands a
# block or two later, and acting meanwhile would propose it again and, refused by a client
# that already let the channel go, close it uncooperatively.
CLOSE_GRACE_S = 120.0
# Reports a peer that broke the payment rules (the node passes its peer guard's).
Misbehaved = Callable[[bytes, ProtocolError], None]


class Payee:
    """A worker's channels, the jobs billed on them, and its side of settlement."""

    def __init__(self, key: SigningKey, config: PaymentConfig, *, misbehaved: Misbehaved | None = None) -> None:
        self.key = key
        self.config = config
        self.misbehaved: Misbehaved = misbehaved or (lambda peer, error: None)
        self.store = ChannelStore(config.data_dir / "channels")
        self._channel_of: dict[bytes, int] = self._load_clients()  # client PeerId -> current channel
        self._billed = trio.Event()  # set when a bill waits to be written
        self.last_seen: dict[bytes, float] = {}  # client -> trio time of its last pay frame
        self._closing_since: dict[int, float] = {}  # channel -> trio time its cooperative close went out
        self.onchain_ops = 0  # messages this worker sent to channel contracts

    # ---- admission and billing ------------------------------------------------

    def owed(self, client: bytes) -> int:
        """What ``client``'s jobs on its current channel cost, less what its vouchers paid."""
        cid = self._channel_of.get(client)
        if cid is None:
            return 0
        return self.store.billed(cid) - self.store.earned(cid)

    def admission(self, client: bytes) -> str | None:
        """None if ``client`` may start a job, else why not (a job error code)."""
        cid = self._channel_of.get(client)
        if cid is None:
            return PAYMENT_REQUIRED
        if self.store.state(cid) is not _S.OPEN:
            return CHANNEL_ENDED
        if self.owed(client) > self.config.credit_nanoton:
            return PAYMENT_REQUIRED
        return None

    def bill(self, client: bytes, cost: int) -> None:
        """Count ``cost`` nanoton against ``client``'s current channel (written to the store
        by :meth:`keep_bills_durable` within moments)."""
        cid = self._channel_of.get(client)
        if cid is not None:
            self.store.bill(cid, cost)
            self._billed.set()

    async def flush_bills(self) -> None:
        """Write what was billed since the last write, off the event loop. Cancelled: the
        write finishes or not; either way the bills are written again with the next."""
        bills = self.store.take_unwritten_bills()
        if not bills:
            return
        try:
            await trio.to_thread.run_sync(self.store.write_bills, bills)
        except BaseException:
            self.store.requeue_bills(bills)
            raise

    async def keep_bills_durable(self) -> None:
        """Write bills as they come, a batch at a time (run in a nursery until cancelled).
        A kill -9 loses at most the bills of the last ``BILL_WRITE_INTERVAL_S`` and one
        write, in the client's favour; a failed write (a full disk) is retried."""
        while True:
            await self._billed.wait()
            self._billed = trio.Event()
            try:
                await self.flush_bills()
            except OSError as exc:
                log.warning("could not write what clients owe (retrying): %r", exc)
                self._billed.set()
            await trio.sleep(BILL_WRITE_INTERVAL_S)

    def close_store(self) -> None:
        """Write the bills not yet written and close the store (blocking; the payee is
        unusable after)."""
        try:
            self.store.flush_bills()
        finally:
            self.store.close()

    def _load_clients(self) -> dict[bytes, int]:
        path = self.config.data_dir / "clients.json"
        if not path.is_file():
            return {}
        try:
            return {bytes.fromhex(k): int(v, 16) for k, v in read_json(path).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise StateFileDamaged(path, f"not a map of clients to channels: {exc!r}") from exc

    def _save_clients(self) -> None:
        data = {k.hex(): f"{v:x}" for k, v in self._channel_of.items()}
        write_atomic(self.config.data_dir / "clients.json", json.dumps(data).encode())

    # ---- the pay protocol -------------------------------------------------------

    async def answer(self, client: bytes, frame: pf.PayFrame) -> pf.PayFrame:
        """The reply to a client's request (the connection has checked it is one)."""
        self.last_seen[client] = trio.current_time()
        if isinstance(frame, pf.PayHello):
            # Our opening state for the channel the client is about to fund: it can only ever
            # let the client close with its own vouchers, which pay us; it costs us nothing.
            opening = b_state(self.key, frame.channel_id, None).to_record() if frame.channel_id is not None else b""
            return pf.PayInfo(self.config.wallet.address, opening)
        if isinstance(frame, pf.ChannelOpened):
            return await self._accept_channel(client, frame.address)
        if isinstance(frame, pf.PayVoucher):
            return await self._accept_voucher(client, frame)
        if isinstance(frame, pf.CloseRequest):
            return self._countersign_close(client, frame)
        return pf.PayError(PayErrorCode.PROTOCOL, f"unexpected {type(frame).__name__}")

    async def _accept_voucher(self, client: bytes, frame: pf.PayVoucher) -> pf.PayFrame:
        try:
            voucher = SignedSemiChannel.from_record(frame.record)
        except ProtocolError as exc:
            self.misbehaved(client, exc)
            return pf.PayError(exc.code, str(exc))
        cid = self._channel_for(client, voucher.state.channel_id)
        if cid is None:
            return pf.PayError(PayErrorCode.CHANNEL, "no channel with you")
        if self.store.state(cid) is _S.CLOSED:  # a closing channel still takes them: a newer one may challenge
            return pf.PayError(PayErrorCode.CHANNEL, "the channel is closed")
        crash_point(CrashPoint.PAYEE_VOUCHER_RECEIVED)
        result = await trio.to_thread.run_sync(self.store.accept, cid, [(voucher, 0)])  # fsync off the loop
        crash_point(CrashPoint.PAYEE_VOUCHER_LOGGED)
        if result.refused:
            _, refusal = result.refused[0]
            if not isinstance(refusal, ReplayedMessage):  # a replay is a resend whose acknowledgement was lost
                self.misbehaved(client, refusal)
            return pf.PayError(refusal.code, str(refusal))
        return pf.PaidUpTo(self.store.earned(cid))

    def _channel_for(self, client: bytes, cid: int) -> int | None:
        """The channel a voucher from ``client`` naming ``cid`` goes to: that one if the
        client pays through it (an older channel's last voucher, resent after a restart),
        else the client's current channel (whose rules then refuse it)."""
        current = self._channel_of.get(client)
        held = self.store.channels.get(cid)
        if current is not None and held is not None:  # the current one was accepted with A = the client's key
            if held.terms.payer_key == self.store.channels[current].terms.payer_key:
                return cid
        return current

    async def _accept_channel(self, client: bytes, address: str) -> pf.PayFrame:
        # The client saw it open; our endpoint may lag a block behind theirs: a contract that
        # names us and the client but is not open yet is read again a few times. Anything
        # else is refused at once (a bogus address must not buy repeated chain reads).
        delay = self.config.chain.confirm_poll_s
        for attempt in range(OPEN_READS):
            try:
                on_chain = await trio.to_thread.run_sync(read_channel, self.config.chain, address)
            except CocoonError as exc:
                return pf.PayError(PayErrorCode.CHANNEL, str(exc))
            ours = on_chain.key_b == bytes(self.key.verify_key) and on_chain.key_a == public_key_from_peer_id(client)
            if on_chain.state == OPEN or not ours or attempt == OPEN_READS - 1:
                break
            await trio.sleep(delay)
            delay *= 2
        problems = []
        if on_chain.state != OPEN:
            problems.append("not open")
        if on_chain.key_a != public_key_from_peer_id(client):
            problems.append("A's key is not the client's PeerId key")
        if on_chain.key_b != bytes(self.key.verify_key):
            problems.append("B's key is not ours")
        if on_chain.addr_b != self.config.wallet.address:
            problems.append("B's payout address is not our wallet")
        if problems:
            return pf.PayError(PayErrorCode.CHANNEL, "; ".join(problems))
        terms = ChannelTerms(
            channel_id=on_chain.channel_id,
            payer_key=on_chain.key_a,
            deposit_a=on_chain.balance_a,
            deposit_b=on_chain.balance_b,
            fine=on_chain.misbehavior_fine,
            address=address,
        )
        try:
            state = self.store.open(terms)
        except ChannelConflict as exc:
            return pf.PayError(PayErrorCode.CHANNEL, str(exc))
        if state is not _S.OPEN:
            return pf.PayError(PayErrorCode.CHANNEL, f"that channel is {state.value}")
        crash_point(CrashPoint.PAYEE_CHANNEL_STORED)
        self._channel_of[client] = terms.channel_id  # a new channel after a settled one
        self._save_clients()
        opening = b_state(self.key, terms.channel_id, None)
        return pf.ChannelReady(terms.channel_id, terms.deposit_a, opening.to_record())

    def _close_terms(self, cid: int) -> m.CloseTerms:
        """The only cooperative close we sign: everything our newest voucher says is ours."""
        return payee_terms(self.store.channels[cid].terms, self.store.earned(cid), self.store.newest(cid))

    def _countersign_close(self, client: bytes, req: pf.CloseRequest) -> pf.PayFrame:
        cid = self._channel_of.get(client)
        if cid is None:
            return pf.PayError(PayErrorCode.CHANNEL, "no channel with you")
        state = self.store.state(cid)
        if state not in (_S.OPEN, _S.CLOSING_COOPERATIVE):  # the latter: our signature again, if it was lost
            return pf.PayError(PayErrorCode.CLOSE, f"the channel is {state.value}")
        want = self._close_terms(cid)
        got = m.CloseTerms(cid, req.balance_a, req.balance_b, req.seqno_a, req.seqno_b)
        if got != want:
            return pf.PayError(PayErrorCode.CLOSE, f"terms {got} differ from ours {want}")
        if not m.signed_by(want.body(), req.signature_a, self.store.channels[cid].terms.payer_key):
            return pf.PayError(PayErrorCode.BAD_SIGNATURE, "the close is not signed by the channel's payer")
        if state is _S.OPEN:
            self.store.advance(cid, _E.CLOSE_PROPOSED)  # no more jobs on this channel
        self._closing_since[cid] = trio.current_time()  # the client sends it
        crash_point(CrashPoint.PAYEE_CLOSE_SIGNED)
        return pf.CloseSigned(m.sign_body(want.body(), self.key))

    # ---- settlement ---------------------------------------------------------------

    def client_of(self, cid: int) -> bytes | None:
        """The client whose current channel is ``cid`` (None: an older channel, or none)."""
        return next((c for c, x in self._channel_of.items() if x == cid), None)

    async def close(self, cid: int, ask: Ask) -> CloseOutcome:
        """Close channel ``cid`` to get our earnings: cooperatively if its payer countersigns,
        else uncooperatively. Returns how (COOPERATIVE, UNCOOPERATIVE, or NOTHING to close)."""
        client = self.client_of(cid)
        newest = self.store.newest(cid)
        if newest is None:
            return CloseOutcome.NOTHING  # no voucher, nothing of ours in it
        state = self.store.state(cid)
        if client is not None and state in (_S.OPEN, _S.CLOSING_COOPERATIVE):
            if state is _S.OPEN:
                self.store.advance(cid, _E.CLOSE_PROPOSED)  # no more jobs while we ask
            crash_point(CrashPoint.PAYEE_CLOSE_PROPOSED)
            terms = self._close_terms(cid)
            sig_b = m.sign_body(terms.body(), self.key)
            proposal = pf.CloseProposal(terms.balance_a, terms.balance_b, terms.seqno_a, terms.seqno_b, sig_b)
            try:
                reply = await ask(client, proposal)
                if not isinstance(reply, pf.CloseAgreed):
                    raise PaymentFailed(f"the client answered {reply!r}")
                if not m.signed_by(terms.body(), reply.signature_a, self.store.channels[cid].terms.payer_key):
                    raise PaymentFailed("the client's close signature does not verify")
                await self._send(cid, m.cooperative_close(terms, reply.signature_a, sig_b))
                self._closing_since[cid] = trio.current_time()
                return CloseOutcome.COOPERATIVE
            except CocoonError as exc:
                log.info(
                    "cooperative close failed (%s): closing it uncooperatively",
                    exc,
                    extra=fields(channel=cid, peer=client),
                )
        self.store.advance(cid, _E.UNCOOPERATIVE_CLOSE_STARTED)
        crash_point(CrashPoint.PAYEE_UNCOOPERATIVE_WRITTEN)
        mine = b_state(self.key, cid, newest.state.body)
        await self._send(cid, m.start_uncooperative_close(cid, newest, mine, key=self.key, is_a=False))
        return CloseOutcome.UNCOOPERATIVE

    async def _send(self, cid: int, body: object) -> None:
        address = self.store.channels[cid].terms.address
        await trio.to_thread.run_sync(send_control, self.config, address, body)
        self.onchain_ops += 1

    async def watch_once(self, ask: Ask, *, shutting_down: bool = False) -> dict[int, CloseOutcome]:
        """Check every unsettled channel on chain and act on it; returns what was done per channel."""
        done: dict[int, CloseOutcome] = {}
        now_t = trio.current_time()
        chain_now = 0  # the chain's clock, asked once per pass and only for a quarantine
        for cid in self.store.unsettled():
            address = self.store.channels[cid].terms.address
            if not address:
                continue
            try:
                on_chain = await trio.to_thread.run_sync(read_channel, self.config.chain, address)
                if on_chain.state not in (UNINITED, OPEN) and not chain_now:
                    chain_now = await trio.to_thread.run_sync(self.config.chain.now)
                action = self._decide(cid, on_chain, chain_now, now_t, shutting_down)
                if action is Action.KEEP or action is Action.WAIT:
                    continue
                done[cid] = await self._act(cid, action, ask)
            except CocoonError as exc:
                log.warning("watching the channel: %s", exc, extra=fields(channel=cid))
                done[cid] = CloseOutcome.FAILED
        return done

    def _decide(self, cid: int, on_chain: ChannelOnChain, chain_now: int, now_t: float, shutting_down: bool) -> Action:
        """What to do with channel ``cid`` now; records what the chain shows first."""
        state = self.store.state(cid)
        if on_chain.state == UNINITED:
            self.store.advance(cid, _E.CLOSED_ON_CHAIN)  # no more jobs on it: a new channel is needed
            return Action.KEEP
        newest = self.store.newest(cid)
        if on_chain.state != OPEN:
            if state is not _S.CLOSING_UNCOOPERATIVE:
                self.store.advance(cid, _E.QUARANTINE_SEEN)
            seqno, sent = (newest.state.body.seqno, newest.state.body.sent) if newest else (0, 0)
            return quarantine_action(on_chain.view(chain_now), we_are_a=False, our_seqno=seqno, our_sent=sent)
        if state is _S.CLOSING_UNCOOPERATIVE:
            return Action.CLOSE  # we started it, yet the contract is open: our message never landed
        went_out = self._closing_since.get(cid)
        if state is _S.CLOSING_COOPERATIVE and went_out is not None and now_t - went_out < CLOSE_GRACE_S:
            return Action.WAIT  # its close is on its way to the chain
        client = self.client_of(cid)
        silent = now_t - self.last_seen.get(client, now_t) if client is not None else float("inf")
        return worker_action(
            self.config.policy, received=self.store.earned(cid), payer_silent_s=silent, shutting_down=shutting_down
        )

    async def _act(self, cid: int, action: Action, ask: Ask) -> CloseOutcome:
        newest = self.store.newest(cid)
        if action is Action.CLOSE:
            how = await self.close(cid, ask)
            if how is CloseOutcome.COOPERATIVE:
                await self._note_if_closed(cid)
            return how
        if action is Action.CHALLENGE and newest is not None:
            self.store.advance(cid, _E.STATE_CHALLENGED)
            mine = b_state(self.key, cid, newest.state.body)
            await self._send(cid, m.challenge_quarantined_state(cid, newest, mine, key=self.key, is_a=False))
            return CloseOutcome.CHALLENGED
        if action is Action.FINISH:
            self.store.advance(cid, _E.CLOSE_FINISHED)
            await self._send(cid, m.finish_uncooperative_close())
            await self._note_if_closed(cid)
            return CloseOutcome.FINISHED
        return CloseOutcome.NOTHING

    async def _note_if_closed(self, cid: int) -> None:
        """Mark the channel settled if the chain already shows it closed (a local chain does
        at once; on TON the next pass of :meth:`watch_once` sees it)."""
        on_chain = await trio.to_thread.run_sync(
            read_channel, self.config.chain, self.store.channels[cid].terms.address
        )
        if on_chain.state == UNINITED:
            self.store.advance(cid, _E.CLOSED_ON_CHAIN)
