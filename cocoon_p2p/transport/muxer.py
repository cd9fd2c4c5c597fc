"""The trio adapter of :mod:`cocoon_p2p.transport.yamux`: py-libp2p's ``IMuxedConn`` for yamux.

Replaces py-libp2p 0.8.1's own yamux, whose data path took ~13 lock operations
and several task switches per frame (stream throughput 0.15 of a bare Noise
socket). Here one task per connection reads, decrypts and parses everything a
socket read returns and wakes the streams it concerns; writers frame and encrypt
in their own task and send under one lock, so a request costs no task switch
on the sending side. The protocol is the same yamux: go-, rust- and js-libp2p
peers see no difference.

Cancellation: a write that was cancelled after its frames were queued still
sends them, because a half-sent frame would corrupt every stream: sealed bytes
wait in a queue that the next flush (or the owed-frames task) empties. A
connection whose sends make no progress for ``WRITE_TIMEOUT_S`` is aborted.
The reading task never blocks on a send: control frames it owes (credit,
pongs, acknowledgements) go out through a second task, so two peers that both
write faster than they read cannot deadlock.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import IMuxedConn, IMuxedStream, ISecureConn
from libp2p.connection_types import ConnectionType
from libp2p.io.exceptions import ConnectionClosedError, IOException
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import (
    MuxedConnUnavailable,
    MuxedStreamClosed,
    MuxedStreamEOF,
    MuxedStreamError,
    MuxedStreamReset,
)
from multiaddr import Multiaddr

from cocoon_p2p.core.errors import LocalProtocolError, RemoteProtocolError

from . import yamux
from .fastlock import FastLock
from .noise import NoiseSession

log = logging.getLogger(__name__)

WRITE_TIMEOUT_S = 30.0  # a peer that takes no bytes for this long is dropped
PROTOCOL_ID = "/yamux/1.0.0"


class MuxedStream(IMuxedStream):
    """One yamux stream. ``read(n)`` returns 1..n buffered bytes (waiting for some),
    ``read()`` everything buffered; both raise ``MuxedStreamEOF`` after the peer's FIN."""

    muxed_conn: YamuxMuxer

    def __init__(self, conn: YamuxMuxer, stream_id: int) -> None:
        self.muxed_conn = conn
        self.stream_id = stream_id
        self._chunks: deque[bytes] = deque()
        self._head = 0  # bytes of _chunks[0] already read: small reads do not re-copy a big chunk
        self._buffered = 0
        self._lot = trio.lowlevel.ParkingLot()  # readers and writers waiting on this stream
        self._eof = False
        self._reset = False
        self._closed = False  # we sent FIN (or reset)
        self._receiver: Callable[[bytes | None], None] | None = None

    def deliver_to(self, receiver: Callable[[bytes | None], None]) -> None:
        """From now on hand what arrives to ``receiver`` instead of buffering it for
        :meth:`read`, and ``None`` once at the stream's end. It runs in the
        connection's reading task, so it must neither block nor raise; it saves the
        reader a task switch per message."""
        if self._buffered:
            data = self._take(self._buffered)
            self._buffered = 0
            self.muxed_conn._consumed(self.stream_id, len(data))
            receiver(data)
        if self._eof:
            receiver(None)
        else:
            self._receiver = receiver

    # -- called by the connection ------------------------------------------

    def _deliver(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver(data)
            self.muxed_conn._consumed(self.stream_id, len(data))
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._lot.unpark_all()

    def _end(self, *, reset: bool) -> None:
        self._eof = True
        self._reset = self._reset or reset
        self._lot.unpark_all()
        if self._receiver is not None:
            receiver, self._receiver = self._receiver, None
            receiver(None)

    # -- IMuxedStream ------------------------------------------------------

    async def read(self, n: int | None = -1) -> bytes:
        if n == 0:
            return b""
        while not self._buffered:
            if self._reset:
                raise MuxedStreamReset(f"stream {self.stream_id} was reset")
            if self._eof:
                raise MuxedStreamEOF(f"stream {self.stream_id} ended")
            await self._lot.park()
        if n is None or n < 0 or n >= self._buffered:
            n = self._buffered
        data = self._take(n)
        self._buffered -= len(data)
        self.muxed_conn._consumed(self.stream_id, len(data))
        return data

    def _take(self, n: int) -> bytes:
        parts: list[bytes] = []
        chunks = self._chunks
        while n:
            head, start = chunks[0], self._head
            left = len(head) - start
            if left <= n:
                parts.append(head[start:] if start else head)
                chunks.popleft()
                self._head = 0
                n -= left
            else:
                parts.append(head[start : start + n])
                self._head += n
                n = 0
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, data: bytes) -> None:
        conn = self.muxed_conn
        total = len(data)
        sent = 0
        while True:
            if self._reset:
                raise MuxedStreamReset(f"stream {self.stream_id} was reset")
            if self._closed or conn.is_closed:
                raise MuxedStreamClosed(f"stream {self.stream_id} is closed for writing")
            if sent == total:
                return
            try:
                n = conn.proto.send_data(self.stream_id, data if not sent else memoryview(data)[sent:])
            except LocalProtocolError as e:
                raise MuxedStreamClosed(str(e)) from None
            if n:
                sent += n
                await conn._flush()
            else:
                await self._lot.park()  # no credit: woken by a WINDOW_UPDATE, a reset or the end

    def try_write(self, data: bytes) -> bool:
        """Write all of ``data`` now, without waiting or a schedule point, if no wait
        is needed: the stream has the credit and the connection's writer is idle.
        False: nothing was written (call :meth:`write`). What the socket does not
        take at once goes out in order through the owed-frames task.

        For a caller that waits for an answer right after, which is its schedule
        point: a request then costs one pass of the scheduler less."""
        if self._reset or self._closed:
            return False
        return self.muxed_conn._write_now(self.stream_id, data)

    async def close(self) -> None:
        """Half-close (FIN); reading goes on until the peer's FIN."""
        if self._closed or self._reset:
            return
        self._closed = True
        await self._tell_peer(self.muxed_conn.proto.end_stream)

    async def reset(self) -> None:
        """Abort both ways (RST); the peer's reads and writes fail."""
        if self._reset:
            return
        self._closed = True
        self._end(reset=True)
        await self._tell_peer(self.muxed_conn.proto.reset_stream)

    async def _tell_peer(self, frame: Callable[[int], None]) -> None:
        conn = self.muxed_conn
        if conn.proto.is_open(self.stream_id):
            frame(self.stream_id)
            conn._forget_if_done(self.stream_id)
            try:
                await conn._flush()
            except MuxedStreamError:
                pass  # the connection is gone: nothing to tell the peer

    def set_deadline(self, ttl: int) -> None:
        raise NotImplementedError("yamux streams have no deadlines: use trio cancel scopes")

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.muxed_conn.get_remote_address()

    async def __aenter__(self) -> MuxedStream:
        return self


class YamuxMuxer(IMuxedConn):
    """A yamux session over a secured connection, as py-libp2p's swarm drives it:
    ``start()`` runs the session until it ends; ``open_stream``/``accept_stream``."""

    def __init__(
        self,
        secured_conn: ISecureConn,
        peer_id: ID,
        *,
        window: int = yamux.DEFAULT_WINDOW,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        stats: yamux.YamuxStats | None = None,
    ) -> None:
        self.secured_conn = secured_conn
        self.peer_id = peer_id
        self.proto = yamux.YamuxConnection(
            client=secured_conn.is_initiator, window=window, stats=stats or yamux.YamuxStats()
        )
        self.event_started = trio.Event()
        self.event_closed = trio.Event()
        # Set by py-libp2p's SwarmConn: awaited once when the session ends.
        self.on_close: Callable[[], Awaitable[Any]] | None = None
        self._streams: dict[int, MuxedStream] = {}
        # Unbounded, but the protocol refuses inbound streams past its limit.
        self._accept_send, self._accept_recv = trio.open_memory_channel[MuxedStream](math.inf)
        self._session = secured_conn if isinstance(secured_conn, NoiseSession) else None
        self.write_timeout_s = write_timeout_s
        self._write_lock = FastLock()
        self._sealed: deque[bytes | memoryview] = deque()  # sealed, not yet sent, in order
        self._bytes_sent = 0
        self._writing = trio.Event()  # a flush took the write lock: wakes the watchdog
        self._owed = trio.Event()  # the reading task queued control frames
        self._pongs: dict[int, trio.Event] = {}

    # -- IMuxedConn --------------------------------------------------------

    @property
    def is_initiator(self) -> bool:
        return self.proto.client

    @property
    def is_established(self) -> bool:
        return self.event_started.is_set() and not self.event_closed.is_set()

    @property
    def is_closed(self) -> bool:
        return self.event_closed.is_set()

    async def start(self) -> None:
        """Run the session until the peer or :meth:`close` ends it."""
        if self.event_started.is_set():
            return
        self.event_started.set()
        ended_by_peer = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_owed)
                nursery.start_soon(self._watch_sends)
                ended_by_peer = await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            await self._teardown(notify=ended_by_peer)

    async def _read_loop(self) -> bool:
        conn = self.secured_conn
        read_some = conn.read_some if isinstance(conn, NoiseSession) else (lambda: conn.read(None))
        proto = self.proto
        while not self.event_closed.is_set():
            try:
                data = await read_some()
            except (IOException, OSError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
                return True
            except RemoteProtocolError as e:  # a Noise message failed authentication
                log.info("yamux: %s sent a bad message (%s); closing", self.peer_id, e)
                proto.stats.protocol_errors += 1
                return True
            if not data:
                return True
            try:
                events = proto.receive_data(data)
            except yamux.YamuxProtocolError as e:
                log.info("yamux: %s sent a bad frame (%s); closing", self.peer_id, e)
                proto.stats.protocol_errors += 1
                proto.go_away(yamux.GO_AWAY_PROTOCOL_ERROR)
                with trio.move_on_after(1):
                    await self._flush_quietly()
                return True
            for event in events:
                self._dispatch(event)
            if proto.has_data_to_send:
                self._owed.set()
        return False

    def _dispatch(self, event: yamux.Event) -> None:
        if isinstance(event, yamux.DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._deliver(event.data)
            else:  # nobody will read it: give the credit straight back
                self.proto.acknowledge_received(event.stream_id, len(event.data))
        elif isinstance(event, yamux.StreamOpened):
            stream = MuxedStream(self, event.stream_id)
            try:
                self._accept_send.send_nowait(stream)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self.proto.reset_stream(event.stream_id)  # closing down: nobody will accept it
            else:
                self._streams[event.stream_id] = stream
        elif isinstance(event, yamux.WindowUpdated):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._lot.unpark_all()
        elif isinstance(event, (yamux.StreamEnded, yamux.StreamReset)):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._end(reset=isinstance(event, yamux.StreamReset))
                self._forget_if_done(event.stream_id)
        elif isinstance(event, yamux.PongReceived):
            pong = self._pongs.pop(event.opaque, None)
            if pong is not None:
                pong.set()
        elif isinstance(event, yamux.ConnectionTerminated):
            self._accept_send.close()

    async def _send_owed(self) -> None:
        while True:
            await self._owed.wait()
            self._owed = trio.Event()
            await self._flush_quietly()

    async def _flush(self) -> None:
        """Seal every queued frame and send everything sealed, in order.

        Cancel-safe without a shield (a shielded scope per write cost ~6 us):
        sealed bytes wait in ``_sealed`` until this or a later flush sends them,
        one send is a single cancellation point, and a cancelled sender leaves
        the rest to the owed-frames task. A send that makes no progress for
        ``write_timeout_s`` aborts the connection (:meth:`_watch_sends`).
        """
        data = self.proto.data_to_send()
        if data:
            self._sealed.append(self._session.seal(data) if self._session else data)
        if not self._sealed:
            return
        lock = self._write_lock
        if not lock.acquire_nowait():
            try:
                await lock.acquire()
            except trio.Cancelled:
                self._owed.set()  # our bytes are sealed: someone must send them
                raise
        try:
            self._writing.set()
            sealed = self._sealed
            while sealed:
                n = await self._send_some(sealed[0])
                self._bytes_sent += n
                if n == len(sealed[0]):
                    sealed.popleft()
                else:
                    sealed[0] = memoryview(sealed[0])[n:]
        except trio.Cancelled:
            self._owed.set()
            raise
        except (IOException, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._abort()
            await self._close_socket()
            raise MuxedStreamError(f"connection to {self.peer_id} broke: {e}") from None
        finally:
            lock.release()

    def _write_now(self, stream_id: int, data: bytes) -> bool:
        """Frame, seal and send ``data`` on ``stream_id`` without waiting, if nothing has
        to wait: the stream has the credit, and nothing is queued or being sent before
        it. What the socket does not take goes out through the owed-frames task (which
        also meets any error, and closes the connection). False: nothing was done."""
        session = self._session
        if session is None or self.is_closed or self._sealed or self._write_lock.locked():
            return False
        try:
            if self.proto.send_window(stream_id) < len(data):
                return False
        except LocalProtocolError:  # closed for sending: write() says so
            return False
        self.proto.send_data(stream_id, data)
        sealed = session.seal(self.proto.data_to_send())
        try:
            n = session.try_send(sealed)
        except ConnectionClosedError:
            n = 0
        self._bytes_sent += n
        if n < len(sealed):
            self._sealed.append(memoryview(sealed)[n:] if n else sealed)
            self._owed.set()
        return True

    async def _send_some(self, data: bytes | memoryview) -> int:
        if self._session is not None:
            return await self._session.send_some(data)
        with trio.CancelScope(shield=True):  # not our Noise session: it sends all or fails
            await self.secured_conn.write(bytes(data))
        return len(data)

    async def _watch_sends(self) -> None:
        """Abort the connection when sending has made no progress for
        ``write_timeout_s``: the peer takes no bytes, and our writers (and the
        frames every stream owes) would wait forever. Sleeps while nobody sends."""
        while True:
            await self._writing.wait()
            self._writing = trio.Event()  # a flush from now on wakes us again
            stalled = 0.0
            tick = self.write_timeout_s / 4
            while self._write_lock.locked():  # a send is under way: watch it
                seen = self._bytes_sent
                await trio.sleep(tick)
                if self._bytes_sent != seen or not self._write_lock.locked():
                    stalled = 0.0
                    continue
                stalled += tick
                if stalled >= self.write_timeout_s:
                    log.info("yamux: %s took no data for %.0f s; closing", self.peer_id, self.write_timeout_s)
                    self.proto.stats.write_timeouts += 1
                    self._abort()
                    await self._close_socket()  # the blocked send fails, the reading task ends
                    return

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except MuxedStreamError:
            pass

    def _consumed(self, stream_id: int, n: int) -> None:
        self.proto.acknowledge_received(stream_id, n)
        if self.proto.has_data_to_send:
            self._owed.set()

    def _forget_if_done(self, stream_id: int) -> None:
        if not self.proto.is_open(stream_id):
            self._streams.pop(stream_id, None)

    async def open_stream(self) -> IMuxedStream:
        if self.event_closed.is_set():
            raise MuxedStreamError("connection is closed")
        try:
            stream_id = self.proto.open_stream()
        except LocalProtocolError as e:
            raise MuxedStreamError(str(e)) from None
        stream = MuxedStream(self, stream_id)
        self._streams[stream_id] = stream
        await self._flush()
        return stream

    async def accept_stream(self) -> IMuxedStream:
        try:
            return await self._accept_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise MuxedConnUnavailable("connection closed") from None

    async def ping(self, timeout_s: float = 10.0) -> float:
        """Round-trip time of a yamux PING, in seconds."""
        pong = trio.Event()
        opaque = self.proto.ping()
        self._pongs[opaque] = pong
        try:
            start = trio.current_time()
            await self._flush()
            with trio.fail_after(timeout_s):
                await pong.wait()
            return trio.current_time() - start
        finally:
            self._pongs.pop(opaque, None)

    async def close(self) -> None:
        """Say GO_AWAY, close the socket, end every stream."""
        if self.event_closed.is_set():
            return
        self.proto.go_away(yamux.GO_AWAY_NORMAL)
        with trio.move_on_after(1):
            await self._flush_quietly()
        await self._teardown(notify=True)

    def _abort(self) -> None:
        """End every stream now; the caller closes the socket."""
        if self.event_closed.is_set():
            return
        self.event_closed.set()
        self._accept_send.close()
        for stream in list(self._streams.values()):
            stream._end(reset=True)
        self._streams.clear()

    async def _teardown(self, *, notify: bool) -> None:
        first = not self.event_closed.is_set()
        self._abort()
        await self._close_socket()
        if first and notify and self.on_close is not None:
            await self.on_close()

    async def _close_socket(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.secured_conn.close()
            except Exception:  # already closed or broken: either way it is gone
                pass

    def get_transport_addresses(self) -> list[Multiaddr]:
        return self.secured_conn.get_transport_addresses()

    def get_connection_type(self) -> ConnectionType:
        return self.secured_conn.get_connection_type()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.secured_conn.get_remote_address()
