"""Yamux stream multiplexing as a state machine: bytes in, events out (no I/O).

The wire format is hashicorp's yamux spec, as go-, rust- and js-libp2p speak it:
a 12-byte header (version 0, type, flags, stream id, length) and, for DATA, a
payload. Streams opened by the connection's initiator (the *client*) have odd
ids, the other side's even ids. Each side may send at most the credit the other
granted (256 KiB at open, then WINDOW_UPDATE deltas); we grant ``window`` bytes
per stream at once, in the SYN or ACK frame, as go-yamux does after auto-tuning,
so a fast link is not paced by round trips.

Used like h2: feed received bytes to :meth:`YamuxConnection.receive_data`, act on
the events it returns, and send what :meth:`YamuxConnection.data_to_send`
returns after every call. :mod:`cocoon_p2p.transport.muxer` is the trio adapter.

Limits, each a named error: a frame longer than ``max_frame`` or beyond the
credit we granted, an unknown version or type, a SYN on a live stream or with the
wrong parity are :class:`YamuxProtocolError` (the connection must close, with a
GO_AWAY). Inbound streams beyond ``max_inbound_streams`` are reset, not accepted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cocoon_p2p.core.errors import LocalProtocolError, RemoteProtocolError
from cocoon_p2p.core.metrics import Metric, metric

from .reassembly import Reassembly

HEADER = struct.Struct(">BBHII")
HEADER_SIZE = HEADER.size

TYPE_DATA = 0
TYPE_WINDOW_UPDATE = 1
TYPE_PING = 2
TYPE_GO_AWAY = 3

FLAG_SYN = 1
FLAG_ACK = 2
FLAG_FIN = 4
FLAG_RST = 8

GO_AWAY_NORMAL = 0
GO_AWAY_PROTOCOL_ERROR = 1
GO_AWAY_INTERNAL_ERROR = 2

INITIAL_WINDOW = 256 * 1024  # the spec's credit for a new stream, before any update
DEFAULT_WINDOW = 4 * 1024 * 1024
DEFAULT_MAX_FRAME = 64 * 1024  # what we put in one DATA frame (go-yamux's default)
DEFAULT_MAX_INBOUND_STREAMS = 1024


class YamuxProtocolError(RemoteProtocolError):
    """The peer broke the yamux protocol; the connection must be closed."""

    code = "yamux"


class StreamClosedError(LocalProtocolError):
    """Data or a close on a stream we already closed or that was reset."""

    code = "stream-closed"


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened ``stream_id`` (already acknowledged by us)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Payload bytes for a stream; hand them to :meth:`YamuxConnection.acknowledge_received`
    once the application has consumed them, to give the credit back."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed ``stream_id`` (FIN): no more data will come."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset ``stream_id`` (RST): the stream is gone both ways."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted more credit on ``stream_id``: blocked writers may go on."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The answer to our :meth:`YamuxConnection.ping` with ``opaque``."""

    opaque: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """The peer sent GO_AWAY with ``code``: it opens no streams and accepts none."""

    code: int


Event = StreamOpened | DataReceived | StreamEnded | StreamReset | WindowUpdated | PongReceived | ConnectionTerminated


@dataclass(slots=True)
class _Stream:
    send_window: int
    recv_window: int  # credit the peer still holds on this stream
    unacked: int = 0  # bytes the application consumed that the peer has not been credited for
    local_closed: bool = False
    remote_closed: bool = False


@dataclass(slots=True)
class YamuxStats:
    """Counters an operator may want to see; one instance may serve every
    connection of a node (the node's ``/metrics`` totals)."""

    streams_opened: int = 0
    streams_accepted: int = 0
    streams_refused: int = 0  # inbound streams reset for being over the limit
    frames_received: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    # Kept by the trio adapter (muxer.py):
    protocol_errors: int = 0  # connections closed for a bad frame or Noise message
    write_timeouts: int = 0  # connections dropped: the peer took no bytes for too long

    def metrics(self) -> list[Metric]:
        dropped = "Connections closed on a peer's fault"
        return [
            metric("cocoon_streams_total", "counter", "Streams opened", self.streams_opened, direction="outbound"),
            metric("cocoon_streams_total", "counter", "Streams opened", self.streams_accepted, direction="inbound"),
            metric("cocoon_streams_refused_total", "counter", "Inbound streams over the limit", self.streams_refused),
            metric("cocoon_stream_bytes_total", "counter", "Stream payload bytes", self.bytes_sent, direction="sent"),
            metric(
                "cocoon_stream_bytes_total",
                "counter",
                "Stream payload bytes",
                self.bytes_received,
                direction="received",
            ),
            metric(
                "cocoon_connections_dropped_total", "counter", dropped, self.protocol_errors, reason="protocol-error"
            ),
            metric("cocoon_connections_dropped_total", "counter", dropped, self.write_timeouts, reason="write-timeout"),
        ]


@dataclass
class YamuxConnection:
    """One side of a yamux session. ``client`` is True on the connection's initiator."""

    client: bool
    window: int = DEFAULT_WINDOW
    max_frame: int = DEFAULT_MAX_FRAME
    max_inbound_streams: int = DEFAULT_MAX_INBOUND_STREAMS
    stats: YamuxStats = field(default_factory=YamuxStats)

    def __post_init__(self) -> None:
        if self.window < INITIAL_WINDOW:
            raise ValueError(f"window must be at least {INITIAL_WINDOW}")
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if self.client else 2
        self._inbound = 0
        self._in = Reassembly()
        self._out: list[bytes] = []
        self._ping_id = 0
        self.local_terminated = False  # we sent GO_AWAY
        self.remote_terminated = False  # the peer sent GO_AWAY

    # -- sending -----------------------------------------------------------

    def _frame(self, typ: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> None:
        self._out.append(HEADER.pack(0, typ, flags, stream_id, length))
        if payload:
            self._out.append(payload)
        self.stats.frames_sent += 1

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def data_to_send(self) -> bytes:
        """Every byte queued since the last call, in order."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def open_stream(self) -> int:
        """Open a stream (its SYN is queued) and return its id."""
        if self.local_terminated or self.remote_terminated:
            raise LocalProtocolError("the session is going away", code="go-away")
        stream_id = self._next_id
        if stream_id > 0xFFFFFFFF:
            raise LocalProtocolError("stream ids exhausted", code="go-away")
        self._next_id += 2
        self._streams[stream_id] = _Stream(send_window=INITIAL_WINDOW, recv_window=self.window)
        self._frame(TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, self.window - INITIAL_WINDOW)
        self.stats.streams_opened += 1
        return stream_id

    def send_window(self, stream_id: int) -> int:
        """How many bytes :meth:`send_data` would accept now on ``stream_id``."""
        return self._open_for_sending(stream_id).send_window

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Frame as much of ``data`` as the peer's credit allows; return how much.

        0 means no credit: wait for :class:`WindowUpdated` and call again.
        """
        stream = self._open_for_sending(stream_id)
        sent = 0
        total = len(data)
        while sent < total and stream.send_window > 0:
            n = min(total - sent, stream.send_window, self.max_frame)
            piece = data if n == total and isinstance(data, bytes) else bytes(data[sent : sent + n])
            self._frame(TYPE_DATA, 0, stream_id, n, piece)
            stream.send_window -= n
            sent += n
        self.stats.bytes_sent += sent
        return sent

    def end_stream(self, stream_id: int) -> None:
        """Half-close: queue a FIN. Reading goes on until the peer's FIN."""
        stream = self._open_for_sending(stream_id)
        stream.local_closed = True
        self._frame(TYPE_WINDOW_UPDATE, FLAG_FIN, stream_id, 0)
        if stream.remote_closed:
            self._forget(stream_id)

    def reset_stream(self, stream_id: int) -> None:
        """Abort a stream both ways (RST). Resetting a stream that is gone is a no-op."""
        if stream_id in self._streams:
            self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
            self._forget(stream_id)

    def acknowledge_received(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of ``stream_id``: return the credit,
        in one WINDOW_UPDATE once half a window has been consumed."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        stream.unacked += n
        if stream.unacked >= self.window // 2:
            self._frame(TYPE_WINDOW_UPDATE, 0, stream_id, stream.unacked)
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def ping(self) -> int:
        """Queue a PING; the matching :class:`PongReceived` carries the returned id."""
        self._ping_id = (self._ping_id + 1) & 0xFFFFFFFF
        self._frame(TYPE_PING, FLAG_SYN, 0, self._ping_id)
        return self._ping_id

    def go_away(self, code: int = GO_AWAY_NORMAL) -> None:
        """Queue a GO_AWAY: we open no more streams and accept none."""
        if not self.local_terminated:
            self.local_terminated = True
            self._frame(TYPE_GO_AWAY, 0, 0, code)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def inbound_streams(self) -> int:
        """Streams the peer opened that are still open (either way)."""
        return self._inbound

    def _open_for_sending(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise StreamClosedError(f"stream {stream_id} is closed or reset")
        if stream.local_closed:
            raise StreamClosedError(f"stream {stream_id} was closed for writing")
        return stream

    def _forget(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None and (stream_id % 2 == 1) != self.client:
            self._inbound -= 1

    # -- receiving ---------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse every complete frame in ``data`` (plus what was buffered) into events.

        Raises :class:`YamuxProtocolError`; after it, send :meth:`go_away` and close.
        """
        src = self._in.join(data)
        events: list[Event] = []
        pos = 0
        end = len(src)
        view = memoryview(src)
        try:
            while end - pos >= HEADER_SIZE:
                version, typ, flags, stream_id, length = HEADER.unpack_from(src, pos)
                if version != 0:
                    raise YamuxProtocolError(f"yamux version {version}")
                if typ == TYPE_DATA:
                    if length > self.max_frame_received:
                        raise YamuxProtocolError(f"DATA frame of {length} bytes")
                    if end - pos - HEADER_SIZE < length:
                        break
                    payload = bytes(view[pos + HEADER_SIZE : pos + HEADER_SIZE + length])
                    pos += HEADER_SIZE + length
                    self._on_stream_frame(events, flags, stream_id, payload, 0)
                elif typ == TYPE_WINDOW_UPDATE:
                    pos += HEADER_SIZE
                    self._on_stream_frame(events, flags, stream_id, b"", length)
                elif typ == TYPE_PING:
                    pos += HEADER_SIZE
                    if flags & FLAG_SYN:
                        self._frame(TYPE_PING, FLAG_ACK, 0, length)
                    elif flags & FLAG_ACK:
                        events.append(PongReceived(length))
                elif typ == TYPE_GO_AWAY:
                    pos += HEADER_SIZE
                    self.remote_terminated = True
                    events.append(ConnectionTerminated(length))
                else:
                    raise YamuxProtocolError(f"unknown frame type {typ}")
                self.stats.frames_received += 1
        finally:
            view.release()  # a bytearray with a live view cannot shrink
            self._in.keep(src, pos)
        return events

    @property
    def max_frame_received(self) -> int:
        """No DATA frame may exceed the credit we ever grant one stream."""
        return self.window

    def _on_stream_frame(self, events: list[Event], flags: int, stream_id: int, payload: bytes, delta: int) -> None:
        if flags & FLAG_SYN:
            if not self._accept(events, stream_id):
                return
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # a stream we already closed or reset: late frames are dropped
        if flags & FLAG_RST:
            self._forget(stream_id)
            events.append(StreamReset(stream_id))
            return
        if delta:
            stream.send_window += delta
            if stream.send_window > 0xFFFFFFFF:
                raise YamuxProtocolError(f"window of stream {stream_id} overflows")
            if not flags & FLAG_SYN:  # nobody can be waiting on a stream just opened
                events.append(WindowUpdated(stream_id))
        if payload:
            if stream.remote_closed:
                raise YamuxProtocolError(f"DATA after FIN on stream {stream_id}")
            if len(payload) > stream.recv_window:
                raise YamuxProtocolError(f"stream {stream_id} exceeded its receive window")
            stream.recv_window -= len(payload)
            self.stats.bytes_received += len(payload)
            events.append(DataReceived(stream_id, payload))
        if flags & FLAG_FIN and not stream.remote_closed:
            stream.remote_closed = True
            events.append(StreamEnded(stream_id))
            if stream.local_closed:
                self._forget(stream_id)

    def _accept(self, events: list[Event], stream_id: int) -> bool:
        if stream_id == 0 or (stream_id % 2 == 1) == self.client:
            raise YamuxProtocolError(f"SYN for stream {stream_id} of the wrong parity")
        if stream_id in self._streams:
            raise YamuxProtocolError(f"SYN for live stream {stream_id}")
        if self.local_terminated or self._inbound >= self.max_inbound_streams:
            self._frame(TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0)
            self.stats.streams_refused += 1
            return False
        self._streams[stream_id] = _Stream(send_window=INITIAL_WINDOW, recv_window=self.window)
        self._inbound += 1
        self._frame(TYPE_WINDOW_UPDATE, FLAG_ACK, stream_id, self.window - INITIAL_WINDOW)
        self.stats.streams_accepted += 1
        events.append(StreamOpened(stream_id))
        return True
