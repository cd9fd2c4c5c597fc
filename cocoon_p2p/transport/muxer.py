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
    MuxedStreamError,
)
from multiaddr import Multiaddr

from cocoon_p2p.core.errors import LocalProtocolError, RemoteProtocolError

from . import yamux
from .fastlock import FastLock
from .muxed_stream import MuxedStream
from .sealed import SealedConn, as_sealed

log = logging.getLogger(__name__)

WRITE_TIMEOUT_S = 30.0  # a peer that takes no bytes for this long is dropped
PROTOCOL_ID = "/yamux/1.0.0"


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
        admit_stream: Callable[[YamuxMuxer], bool] | None = None,
    ) -> None:
        self.secured_conn = secured_conn
        # Asked for each stream the peer opens (after the session's own limit): False resets it.
        self._admit_stream = admit_stream
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
        self._session: SealedConn = as_sealed(secured_conn)
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
        read_some = self._session.read_some
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
            if self._admit_stream is not None and not self._admit_stream(self):
                self.proto.reset_stream(event.stream_id)  # the peer holds too many: refused
                return
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
            self._sealed.append(self._session.seal(data))
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
        if self.is_closed or self._sealed or self._write_lock.locked():
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
        return await self._session.send_some(data)

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
