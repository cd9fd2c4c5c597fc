"""The pay protocol's rules of order, one machine per ``/cocoon/pay/1`` stream (sans-IO, h11's way).

Bytes in, frames out: ``receive_data(bytes)`` only buffers, ``next_event()``
returns the next frame the rules allow or :data:`~cocoon_p2p.core.framing.NEED_DATA`,
``send(frame)`` checks a frame against the rules and returns its bytes,
``send_failed()`` records a write that did not complete. A rule broken by the
peer raises :class:`UnexpectedFrame` (a RemoteProtocolError); one broken by us
raises LocalProtocolError. After either, the connection is in ERROR and refuses
every call, except that a responder may still send one PayError saying why.

A stream is strict request then reply. The side that opened it (REQUESTER)
sends requests, the other (RESPONDER) answers each before the next arrives.
Its first request says whose stream it is: a client's stream carries PayHello,
ChannelOpened, PayVoucher and CloseRequest; a worker's carries CloseProposal.
Any request may be answered with PayError. Both ends track the same states:

    state            sender     frame                        next state
    START            requester  PayHello                     AWAITING_INFO
    START            requester  ChannelOpened                AWAITING_READY
    START            requester  PayVoucher                   AWAITING_PAID
    START            requester  CloseRequest                 AWAITING_CLOSE_SIGNED
    START            requester  CloseProposal                AWAITING_AGREED
    CLIENT_IDLE      requester  (the four client requests)   (as from START)
    WORKER_IDLE      requester  CloseProposal                AWAITING_AGREED
    AWAITING_INFO    responder  PayInfo | PayError           CLIENT_IDLE
    AWAITING_READY   responder  ChannelReady | PayError      CLIENT_IDLE
    AWAITING_PAID    responder  PaidUpTo | PayError          CLIENT_IDLE
    AWAITING_CLOSE_SIGNED  responder  CloseSigned | PayError CLIENT_IDLE
    AWAITING_AGREED  responder  CloseAgreed | PayError       WORKER_IDLE
"""

from __future__ import annotations

import enum
from typing import Final

from cocoon_p2p.core.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from cocoon_p2p.core.framing import FrameBuffer, NeedData

from .frames import (
    MAX_PAY_FRAME,
    ChannelOpened,
    ChannelReady,
    CloseAgreed,
    CloseProposal,
    CloseRequest,
    CloseSigned,
    PaidUpTo,
    PayError,
    PayErrorCode,
    PayFrame,
    PayHello,
    PayInfo,
    PayVoucher,
    decode,
    encode,
)


class Side(enum.Enum):
    """Which end of the stream this machine is."""

    REQUESTER = "requester"  # opened the stream, sends requests
    RESPONDER = "responder"  # accepted it, answers each request


class PayState(enum.Enum):
    """Where the stream is between requests and replies (see the module's table)."""

    START = "start"
    CLIENT_IDLE = "client-idle"
    WORKER_IDLE = "worker-idle"
    AWAITING_INFO = "awaiting-info"
    AWAITING_READY = "awaiting-ready"
    AWAITING_PAID = "awaiting-paid"
    AWAITING_CLOSE_SIGNED = "awaiting-close-signed"
    AWAITING_AGREED = "awaiting-agreed"
    ERROR = "error"


class UnexpectedFrame(RemoteProtocolError):
    """The peer sent a frame the rules do not allow now (out of order, or not its to send)."""

    code = PayErrorCode.PROTOCOL.value


_P, _REQ, _RESP = PayState, Side.REQUESTER, Side.RESPONDER

# (state, sender, frame type) -> next state. A missing entry breaks the protocol.
TRANSITIONS: Final[dict[tuple[PayState, Side, type], PayState]] = {
    (_P.START, _REQ, PayHello): _P.AWAITING_INFO,
    (_P.START, _REQ, ChannelOpened): _P.AWAITING_READY,
    (_P.START, _REQ, PayVoucher): _P.AWAITING_PAID,
    (_P.START, _REQ, CloseRequest): _P.AWAITING_CLOSE_SIGNED,
    (_P.START, _REQ, CloseProposal): _P.AWAITING_AGREED,
    (_P.CLIENT_IDLE, _REQ, PayHello): _P.AWAITING_INFO,
    (_P.CLIENT_IDLE, _REQ, ChannelOpened): _P.AWAITING_READY,
    (_P.CLIENT_IDLE, _REQ, PayVoucher): _P.AWAITING_PAID,
    (_P.CLIENT_IDLE, _REQ, CloseRequest): _P.AWAITING_CLOSE_SIGNED,
    (_P.WORKER_IDLE, _REQ, CloseProposal): _P.AWAITING_AGREED,
    (_P.AWAITING_INFO, _RESP, PayInfo): _P.CLIENT_IDLE,
    (_P.AWAITING_INFO, _RESP, PayError): _P.CLIENT_IDLE,
    (_P.AWAITING_READY, _RESP, ChannelReady): _P.CLIENT_IDLE,
    (_P.AWAITING_READY, _RESP, PayError): _P.CLIENT_IDLE,
    (_P.AWAITING_PAID, _RESP, PaidUpTo): _P.CLIENT_IDLE,
    (_P.AWAITING_PAID, _RESP, PayError): _P.CLIENT_IDLE,
    (_P.AWAITING_CLOSE_SIGNED, _RESP, CloseSigned): _P.CLIENT_IDLE,
    (_P.AWAITING_CLOSE_SIGNED, _RESP, PayError): _P.CLIENT_IDLE,
    (_P.AWAITING_AGREED, _RESP, CloseAgreed): _P.WORKER_IDLE,
    (_P.AWAITING_AGREED, _RESP, PayError): _P.WORKER_IDLE,
}


class PayConnection:
    """One end of one ``/cocoon/pay/1`` stream."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.state = PayState.START
        self.errored: ProtocolError | None = None
        self._frames = FrameBuffer(MAX_PAY_FRAME, what="pay frame")
        self._may_explain = False  # after a remote error, a responder may send one PayError

    @property
    def peer_side(self) -> Side:
        return Side.RESPONDER if self.side is Side.REQUESTER else Side.REQUESTER

    @property
    def awaiting_reply(self) -> bool:
        """Whether a request is out and its reply not yet through."""
        return self.state.name.startswith("AWAITING_")

    # ---- incoming --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the stream (end of stream is the adapter's to notice)."""
        self._check_usable()
        self._frames.feed(data)

    def next_event(self) -> PayFrame | NeedData:
        """The next complete frame from the peer, checked against the rules; NEED_DATA if
        none is whole yet. A frame that breaks them raises (and puts us in ERROR)."""
        self._check_usable()
        try:
            body = self._frames.next_payload()
            if isinstance(body, NeedData):
                return body
            frame = decode(body)
            self.state = self._next(frame, self.peer_side)
        except RemoteProtocolError as exc:
            self._fail(exc)
            self._may_explain = self.side is Side.RESPONDER
            raise
        return frame

    # ---- outgoing --------------------------------------------------------------

    def send(self, frame: PayFrame) -> bytes:
        """The bytes of ``frame``; LocalProtocolError if the rules forbid sending it now."""
        if self._may_explain and isinstance(frame, PayError):
            self._may_explain = False
            return encode(frame)
        self._check_usable()
        try:
            after = self._next(frame, self.side)
        except UnexpectedFrame as exc:
            raise LocalProtocolError(str(exc), code=exc.code) from exc
        data = encode(frame)
        self.state = after
        return data

    def send_failed(self) -> None:
        """A write of what :meth:`send` returned did not complete: the stream is unusable
        (the peer may have read some, all or none of it)."""
        self._fail(LocalProtocolError("a write on the pay stream failed"))

    # ---- rules -------------------------------------------------------------------

    def _next(self, frame: PayFrame, sender: Side) -> PayState:
        after = TRANSITIONS.get((self.state, sender, type(frame)))
        if after is None:
            raise UnexpectedFrame(f"a {sender.value} must not send {type(frame).__name__} in state {self.state.value}")
        return after

    def _fail(self, exc: ProtocolError) -> None:
        self.errored = exc
        self.state = PayState.ERROR
        self._may_explain = False

    def _check_usable(self) -> None:
        if self.errored is not None:
            raise LocalProtocolError(f"pay connection already failed: {self.errored}")
