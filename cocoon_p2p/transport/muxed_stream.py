"""One yamux stream of a :class:`~.muxer.YamuxMuxer` connection: py-libp2p's ``IMuxedStream``.

Reads take what the connection's reading task already parsed into the stream's
buffer; writes frame, seal and send through the connection (see :mod:`.muxer`
for what cancellation does to a write).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IMuxedStream
from libp2p.stream_muxer.exceptions import MuxedStreamClosed, MuxedStreamEOF, MuxedStreamError, MuxedStreamReset

from cocoon_p2p.core.errors import LocalProtocolError

if TYPE_CHECKING:
    from .muxer import YamuxMuxer


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
