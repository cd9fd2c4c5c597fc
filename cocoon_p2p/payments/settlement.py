"""When a payment channel touches the chain: the settlement policy (sans-IO).

Pure decisions over plain views of a channel, so the payment service and the
simulator (issue 6) apply the same rules. Each channel's life on chain is three
operations: open (deploy + top up), init, close. Everything between is off chain.

Client (A, the payer): keeps one channel per worker and *rolls it over*
(cooperative close, then a new channel at the next job) when what is left of the
deposit falls below a reserve, or cannot pay the next job.

Worker (B, the payee): its earnings reach its wallet only when the channel
closes, so it closes when

* it holds more than ``settle_above_nanoton`` unsettled (its risk limit),
* the payer has been silent for ``idle_close_s`` with earnings unsettled,
* it shuts down with earnings unsettled (``close_on_shutdown``),

first cooperatively (the payer countersigns), else uncooperatively with the
payer's newest voucher. Either side watches channels in quarantine: it
challenges a state older than the newest it holds, and finishes the close once
quarantine (and the conditionals window) is over.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ContractState(enum.IntEnum):
    """A channel's state as the contract's get_channel_state reports it (not our
    :class:`~.channelstate.ChannelState`, which also covers what is off chain)."""

    UNINITED = 0  # never initialised, or closed and paid out
    OPEN = 1
    CLOSURE_STARTED = 2  # quarantine
    SETTLING_CONDITIONALS = 3
    AWAITING_FINALIZATION = 4


UNINITED = ContractState.UNINITED
OPEN = ContractState.OPEN
CLOSURE_STARTED = ContractState.CLOSURE_STARTED
SETTLING_CONDITIONALS = ContractState.SETTLING_CONDITIONALS
AWAITING_FINALIZATION = ContractState.AWAITING_FINALIZATION


@dataclass(frozen=True)
class SettlementPolicy:
    """The knobs of settlement; defaults suit a worker paid a few nanoton-cents per job."""

    deposit_nanoton: int = 1_000_000_000  # client: each new channel's deposit
    reserve_fraction: float = 0.02  # client: roll over when less than this share of the deposit is left
    settle_above_nanoton: int | None = None  # worker: close when this much is unsettled (None: no limit)
    idle_close_s: float = 24 * 3600.0  # worker: close when the payer is silent this long, money unsettled
    close_on_shutdown: bool = True  # worker: close channels holding earnings when it stops


class Action(enum.Enum):
    """What the settlement policy says to do with a channel now."""

    KEEP = "keep"  # nothing to do now
    ROLL_OVER = "roll-over"  # client: close this channel cooperatively; the next job opens a new one
    CLOSE = "close"  # worker: close now, cooperatively if the payer answers, else uncooperatively
    CHALLENGE = "challenge"  # the quarantined state is older than the newest we hold
    FINISH = "finish"  # quarantine is over: send finish_uncooperative_close
    WAIT = "wait"  # in quarantine, nothing for us to do until it ends


@dataclass(frozen=True)
class Quarantine:
    """The states an uncooperative close put in quarantine (from get_channel_data)."""

    seqno_a: int
    sent_a: int
    seqno_b: int
    sent_b: int
    started_at: int  # chain time (unix seconds)
    committed_by_a: bool
    challenged: bool = False


@dataclass(frozen=True)
class ChainView:
    """A channel as the chain shows it now."""

    state: int
    now: int  # chain time
    quarantine_s: int
    conditional_close_s: int = 0
    quarantine: Quarantine | None = None


def client_action(policy: SettlementPolicy, *, deposit: int, sent: int, next_cost: int = 0) -> Action:
    """Whether the client should roll its channel over before paying ``next_cost``."""
    left = deposit - sent
    if left < next_cost or left < deposit * policy.reserve_fraction:
        return Action.ROLL_OVER
    return Action.KEEP


def worker_action(
    policy: SettlementPolicy, *, received: int, payer_silent_s: float, shutting_down: bool = False
) -> Action:
    """Whether the worker should close an open channel now (``received``: unsettled earnings)."""
    if received <= 0:
        return Action.KEEP  # nothing at stake: the payer closes when it likes
    if shutting_down and policy.close_on_shutdown:
        return Action.CLOSE
    if policy.settle_above_nanoton is not None and received >= policy.settle_above_nanoton:
        return Action.CLOSE
    if payer_silent_s >= policy.idle_close_s:
        return Action.CLOSE
    return Action.KEEP


def quarantine_action(view: ChainView, *, we_are_a: bool, our_seqno: int, our_sent: int) -> Action:
    """What to do with a channel in quarantine.

    ``our_seqno``/``our_sent``: the newest state of the *other* party we hold
    signed (a worker holds A's vouchers; a client holds nothing of B's that pays
    it, so it passes zeros and only ever finishes).
    """
    q = view.quarantine
    if view.state < CLOSURE_STARTED or q is None:
        return Action.KEEP
    ends = q.started_at + view.quarantine_s
    if view.now < ends:
        theirs_committed = q.committed_by_a != we_are_a
        their_seqno, their_sent = (q.seqno_b, q.sent_b) if we_are_a else (q.seqno_a, q.sent_a)
        older = our_seqno > their_seqno or our_sent > their_sent
        if theirs_committed and older and not q.challenged:
            return Action.CHALLENGE
        return Action.WAIT
    if view.now > ends + view.conditional_close_s:
        return Action.FINISH
    return Action.WAIT
