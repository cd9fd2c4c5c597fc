"""A payment channel's life as an explicit state (sans-IO), as lnd's channel arbitrator keeps it.

Both parties track each channel through the same states. The client (A) starts
a channel in OPENING; the worker (B) first hears of a channel when the contract
is already open on chain, so it starts in OPEN. Each side persists the state
*before* acting on it (the worker in its :class:`~.store.ChannelStore`, the
client in ``payer.json``), so a restart resumes from the last state written
instead of guessing from which collection a channel sits in.

States:

    OPENING                 client: id and contract address chosen and written down, the
                            deposit being sent; the worker has not yet confirmed the
                            contract open (its signed opening state is not in hand)
    OPEN                    vouchers flow; jobs are admitted
    CLOSING_COOPERATIVE     a cooperative close was proposed or signed: no more jobs;
                            the two-signature close goes (or went) on chain
    CLOSING_UNCOOPERATIVE   an uncooperative close was started (by us, or seen on chain):
                            quarantine, challenges, then finish
    CLOSED                  the chain shows the contract closed, or it never opened
                            (abandoned): nothing left to watch

The whole transition map (a missing entry raises :class:`ForbiddenTransition`):

    OPENING                --OPEN_CONFIRMED-------------->  OPEN
    OPENING                --OPEN_ABANDONED-------------->  CLOSED
    OPENING                --UNCOOPERATIVE_CLOSE_STARTED->  CLOSING_UNCOOPERATIVE (never confirmed: refund)
    OPEN                   --CLOSE_PROPOSED-------------->  CLOSING_COOPERATIVE
    OPEN                   --UNCOOPERATIVE_CLOSE_STARTED->  CLOSING_UNCOOPERATIVE
    OPEN                   --QUARANTINE_SEEN------------->  CLOSING_UNCOOPERATIVE
    OPEN                   --CLOSED_ON_CHAIN------------->  CLOSED
    CLOSING_COOPERATIVE    --UNCOOPERATIVE_CLOSE_STARTED->  CLOSING_UNCOOPERATIVE
    CLOSING_COOPERATIVE    --QUARANTINE_SEEN------------->  CLOSING_UNCOOPERATIVE
    CLOSING_COOPERATIVE    --CLOSED_ON_CHAIN------------->  CLOSED
    CLOSING_UNCOOPERATIVE  --UNCOOPERATIVE_CLOSE_STARTED->  CLOSING_UNCOOPERATIVE (sent again)
    CLOSING_UNCOOPERATIVE  --QUARANTINE_SEEN------------->  CLOSING_UNCOOPERATIVE
    CLOSING_UNCOOPERATIVE  --STATE_CHALLENGED------------>  CLOSING_UNCOOPERATIVE
    CLOSING_UNCOOPERATIVE  --CLOSE_FINISHED-------------->  CLOSING_UNCOOPERATIVE
    CLOSING_UNCOOPERATIVE  --CLOSED_ON_CHAIN------------->  CLOSED

Beside the state, a channel records how it ends (:class:`CloseOutcome`): the
furthest its close went, cooperative < uncooperative < challenged, or
abandoned; a channel the other party closed without us is simply "closed".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .errors import ForbiddenTransition


class ChannelState(enum.Enum):
    """Where a channel is in its life (see the module's docstring)."""

    OPENING = "opening"
    OPEN = "open"
    CLOSING_COOPERATIVE = "closing-cooperative"
    CLOSING_UNCOOPERATIVE = "closing-uncooperative"
    CLOSED = "closed"


class ChannelEvent(enum.Enum):
    """What happens to a channel: our own decisions, and what the chain shows."""

    OPEN_CONFIRMED = "open-confirmed"  # the worker accepted the contract it saw open
    OPEN_ABANDONED = "open-abandoned"  # the contract never opened, or the worker refused it
    CLOSE_PROPOSED = "close-proposed"  # a cooperative close proposed or countersigned
    UNCOOPERATIVE_CLOSE_STARTED = "uncooperative-close-started"  # we sent start_uncooperative_close
    QUARANTINE_SEEN = "quarantine-seen"  # the chain shows the channel in quarantine
    STATE_CHALLENGED = "state-challenged"  # we replaced an older quarantined state
    CLOSE_FINISHED = "close-finished"  # we sent finish_uncooperative_close
    CLOSED_ON_CHAIN = "closed-on-chain"  # the chain shows the contract closed


class CloseOutcome(enum.StrEnum):
    """How a channel ends, and what one pass of the settlement policy did to it.

    A string enum: the values are what logs, ``watch_once`` results and the
    persisted records carry. COOPERATIVE, UNCOOPERATIVE, CHALLENGED, ABANDONED
    and CLOSED are endings; FINISHED, NOTHING and FAILED only report a step.
    """

    COOPERATIVE = "cooperative"  # both signed the final split
    UNCOOPERATIVE = "uncooperative"  # closed through quarantine with the newest states
    CHALLENGED = "challenged"  # uncooperative, and an old state was replaced by a newer one
    ABANDONED = "abandoned"  # never opened: nothing was paid through it
    CLOSED = "closed"  # seen closed on chain (by the other party, or at the end of ours)
    FINISHED = "finished"  # the quarantine's end: finish_uncooperative_close sent
    NOTHING = "nothing"  # no voucher held: nothing of ours to close
    FAILED = "failed"  # a chain or peer error: retried on the next pass


_S, _E = ChannelState, ChannelEvent

# state -> event -> next state. A missing entry is a forbidden transition.
TRANSITIONS: dict[ChannelState, dict[ChannelEvent, ChannelState]] = {
    _S.OPENING: {
        _E.OPEN_CONFIRMED: _S.OPEN,
        _E.OPEN_ABANDONED: _S.CLOSED,
        _E.UNCOOPERATIVE_CLOSE_STARTED: _S.CLOSING_UNCOOPERATIVE,
    },
    _S.OPEN: {
        _E.CLOSE_PROPOSED: _S.CLOSING_COOPERATIVE,
        _E.UNCOOPERATIVE_CLOSE_STARTED: _S.CLOSING_UNCOOPERATIVE,
        _E.QUARANTINE_SEEN: _S.CLOSING_UNCOOPERATIVE,
        _E.CLOSED_ON_CHAIN: _S.CLOSED,
    },
    _S.CLOSING_COOPERATIVE: {
        _E.UNCOOPERATIVE_CLOSE_STARTED: _S.CLOSING_UNCOOPERATIVE,
        _E.QUARANTINE_SEEN: _S.CLOSING_UNCOOPERATIVE,
        _E.CLOSED_ON_CHAIN: _S.CLOSED,
    },
    _S.CLOSING_UNCOOPERATIVE: {
        _E.UNCOOPERATIVE_CLOSE_STARTED: _S.CLOSING_UNCOOPERATIVE,
        _E.QUARANTINE_SEEN: _S.CLOSING_UNCOOPERATIVE,
        _E.STATE_CHALLENGED: _S.CLOSING_UNCOOPERATIVE,
        _E.CLOSE_FINISHED: _S.CLOSING_UNCOOPERATIVE,
        _E.CLOSED_ON_CHAIN: _S.CLOSED,
    },
    _S.CLOSED: {},
}

# The ending an event points to; the recorded ending only ever moves up this ranking.
_ENDING: dict[ChannelEvent, CloseOutcome] = {
    _E.OPEN_ABANDONED: CloseOutcome.ABANDONED,
    _E.CLOSE_PROPOSED: CloseOutcome.COOPERATIVE,
    _E.UNCOOPERATIVE_CLOSE_STARTED: CloseOutcome.UNCOOPERATIVE,
    _E.QUARANTINE_SEEN: CloseOutcome.UNCOOPERATIVE,
    _E.STATE_CHALLENGED: CloseOutcome.CHALLENGED,
}
_RANK: dict[CloseOutcome | None, int] = {
    None: 0,
    CloseOutcome.COOPERATIVE: 1,
    CloseOutcome.ABANDONED: 1,
    CloseOutcome.UNCOOPERATIVE: 2,
    CloseOutcome.CHALLENGED: 3,
}

# The states in which a channel still needs watching on chain.
UNSETTLED = frozenset({_S.OPEN, _S.CLOSING_COOPERATIVE, _S.CLOSING_UNCOOPERATIVE})
CLOSING = frozenset({_S.CLOSING_COOPERATIVE, _S.CLOSING_UNCOOPERATIVE})


def next_state(state: ChannelState, event: ChannelEvent) -> ChannelState:
    """The state ``event`` leads to from ``state``; ForbiddenTransition if the table has none."""
    after = TRANSITIONS[state].get(event)
    if after is None:
        raise ForbiddenTransition(f"a channel in state {state.value} cannot take {event.value}")
    return after


@dataclass(frozen=True)
class Lifecycle:
    """A channel's state and how it is ending; immutable, so a failed write changes nothing."""

    state: ChannelState
    ending: CloseOutcome | None = None

    def apply(self, event: ChannelEvent) -> Lifecycle:
        """The lifecycle after ``event``. Raises ForbiddenTransition (and changes nothing)."""
        state = next_state(self.state, event)
        ending = self.ending
        candidate = _ENDING.get(event)
        if candidate is not None and _RANK[candidate] >= _RANK[ending]:
            ending = candidate
        if state is _S.CLOSED and ending is None:
            ending = CloseOutcome.CLOSED  # the other party closed it
        return Lifecycle(state, ending)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "ending": self.ending.value if self.ending else None}

    @classmethod
    def from_json(cls, data: dict[str, Any], *, default: ChannelState) -> Lifecycle:
        """A persisted lifecycle; ``default`` for a record written before states existed."""
        if "state" not in data:
            return cls(default, CloseOutcome.CLOSED if default is _S.CLOSED else None)
        ending = data.get("ending")
        return cls(ChannelState(data["state"]), CloseOutcome(ending) if ending else None)
