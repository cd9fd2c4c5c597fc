"""Payments in the model: a channel per client-worker pair, real vouchers, the library's settlement policy."""

from __future__ import annotations

import math

from cocoon_p2p.payments.settlement import Action, client_action, worker_action
from cocoon_p2p.payments.vouchers import VoucherBook, VoucherIssuer

from .world import Channel, SimClient, SimWorker, World


class Settlement:
    """Pays for jobs by voucher, opens and closes channels, and counts what went on chain."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.paid_total = 0
        self.paid_floor: dict[int, float] = {}  # worker -> no payer of it paid last before this

    def pay(self, c: SimClient, w: SimWorker, cost: int) -> None:
        """The client pays ``cost`` for a result: on its channel to ``w``, opened (or rolled over) as needed."""
        world = self.world
        ch = c.channels.get(w.idx)
        if (
            ch is not None
            and client_action(world.policy, deposit=ch.deposit, sent=ch.sent, next_cost=cost) is Action.ROLL_OVER
        ):
            self.close(c, w, cooperative=True)
            ch = None
        if ch is None:
            deposit, cid = world.policy.deposit_nanoton, world.rng.getrandbits(128)
            issuer = book = None
            if world.sc.settlement.vouchers:
                issuer = VoucherIssuer(channel_id=cid, key=c.key, deposit_a=deposit)
                book = VoucherBook(channel_id=cid, payer_key=c.key.verify_key, deposit_a=deposit)
            ch = c.channels[w.idx] = Channel(deposit, issuer, book)
            w.payers.add(c.idx)
            world.results.onchain_ops += 2  # deploy + top up, init
            world.results.channels_opened += 1
        if ch.issuer is not None and ch.book is not None:
            voucher = ch.issuer.next(cost)
            ch.book.check(voucher, expect_at_least=cost)  # the worker's real acceptance rules
            ch.book.commit(voucher)
        ch.sent += cost
        self.paid_total += cost
        w.last_paid[c.idx] = world.events.now

    def close(self, c: SimClient, w: SimWorker, *, cooperative: bool) -> None:
        """Close the channel from ``c`` to ``w``: the worker is paid out on chain."""
        ch = c.channels.pop(w.idx)
        w.payers.discard(c.idx)
        w.earned += ch.sent
        self.world.results.onchain_ops += 1 if cooperative else 2  # close; or start + finish after quarantine
        self.world.results.channels_closed += 1

    def watch(self, w: SimWorker, session: int) -> None:
        """The worker's settlement pass over its channels, every watch interval while it is up."""
        world = self.world
        if session != w.session:
            return
        now = world.events.now
        policy = world.policy
        # Nothing can close while every payer paid within idle_close_s (and no amount limit is
        # set): the oldest last payment of the previous pass bounds them all (they only grow).
        if policy.settle_above_nanoton is None and now - self.paid_floor.get(w.idx, -math.inf) < policy.idle_close_s:
            world.events.after(world.sc.settlement.watch_s, self.watch, w, session)
            return
        for c_idx in list(w.payers):
            c = world.client_at(c_idx)
            ch = c.channels.get(w.idx)
            if ch is None:
                continue
            silent = now - w.last_paid.get(c_idx, now)
            if worker_action(world.policy, received=ch.sent, payer_silent_s=silent) is Action.CLOSE:
                self.close(c, w, cooperative=world.online[c.idx])
        self.paid_floor[w.idx] = min((w.last_paid.get(i, now) for i in w.payers), default=now)
        world.events.after(world.sc.settlement.watch_s, self.watch, w, session)

    def held_for(self, w: SimWorker) -> int:
        """What ``w`` holds in vouchers on channels still open."""
        return sum(self.world.client_at(i).channels[w.idx].sent for i in w.payers)

    def held_total(self) -> int:
        """What every open channel holds in vouchers."""
        return sum(ch.sent for c in self.world.clients for ch in c.channels.values())
