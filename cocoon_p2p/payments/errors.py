"""The payment layer's errors, in the project's hierarchy (:mod:`cocoon_p2p.core.errors`).

What failed and whose fault it was: :class:`PaymentFailed` (a channel could not
be opened or closed, a voucher was not acknowledged: the job goes elsewhere or
the close is retried), :class:`UnknownChannel` and :class:`ChannelConflict`
(the caller named a channel the store does not hold, or holds with other
terms), :class:`ForbiddenTransition` (a channel was asked to do what its
lifecycle state forbids: a bug, or a persisted state the code cannot resume).
"""

from __future__ import annotations

from cocoon_p2p.core.errors import CocoonError, LocalProtocolError


class PaymentFailed(CocoonError):
    """A channel could not be opened or closed, or a voucher was not acknowledged."""


class UnknownChannel(CocoonError):
    """No channel with this id is held here."""


class ChannelConflict(CocoonError):
    """A channel id is already held with other terms (another contract reusing the id)."""


class ForbiddenTransition(LocalProtocolError):
    """The channel's lifecycle state forbids this event (the transition table has no entry)."""

    code = "channel-state"
