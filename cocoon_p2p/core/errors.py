"""The exception hierarchy of cocoon-p2p.

Errors say whose fault it was, as h11 does: a :class:`LocalProtocolError` means
this program misused the API; a :class:`RemoteProtocolError` means a peer sent
something it must not. Every protocol error carries a short ``code`` that can
be sent back to the peer in an error frame.
"""

from __future__ import annotations


class CocoonError(Exception):
    """Base class of every error raised by cocoon-p2p."""


class ProtocolError(CocoonError):
    """A message broke the protocol. ``code`` names the rule it broke."""

    code: str = "protocol"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """We were asked to build or send something invalid."""

    code = "local"


class RemoteProtocolError(ProtocolError):
    """A peer sent bytes that do not decode to a valid message."""

    code = "malformed"


class MessageTooLarge(RemoteProtocolError):
    """The encoded message exceeds the hard size limit of its kind."""

    code = "too-large"


class MalformedMessage(RemoteProtocolError):
    """The bytes are not a well-formed, canonically encoded message."""

    code = "malformed"


class BadSignature(RemoteProtocolError):
    """The signature does not verify under the key the message names."""

    code = "bad-signature"


class ExpiredMessage(RemoteProtocolError):
    """The message's validity window does not contain the current time."""

    code = "expired"


class ReplayedMessage(RemoteProtocolError):
    """The message is not newer than one already accepted from its origin."""

    code = "replayed"


class ForeignKey(RemoteProtocolError):
    """The message is stored under, or relayed as, a key it does not belong to."""

    code = "foreign-key"


class RateLimited(RemoteProtocolError):
    """The origin sent more messages than its rate allows."""

    code = "rate-limited"


class IdentityError(CocoonError):
    """A key file is missing, unreadable, or not a cocoon identity."""


class ConfigError(CocoonError):
    """A node was configured with invalid values."""


class NotRunning(CocoonError):
    """The node or service is not running: use it inside its ``async with`` block."""
