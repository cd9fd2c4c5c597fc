"""What both ends of a job stream share: the stream's reader and writer, and the
hand-over of parsed frames from a connection's reading task to a waiting task."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import trio

from cocoon_p2p.transport.muxed_stream import MuxedStream

T = TypeVar("T")
READ_SIZE = 1 << 16


def remote_peer(stream: Any) -> bytes:
    """The PeerId (bytes) at the other end of a libp2p stream."""
    return bytes(stream.muxed_conn.peer_id.to_bytes())


class Inbox(Generic[T]):
    """Items from a connection's reading task to one waiting task: a put wakes the
    task directly, and a get finds what arrived meanwhile without a yield."""

    __slots__ = ("items", "_task")

    def __init__(self) -> None:
        self.items: deque[T] = deque()
        self._task: trio.lowlevel.Task | None = None

    @property
    def idle(self) -> bool:
        """The task waits here and nothing is queued before what comes next."""
        return self._task is not None and not self.items

    def put(self, item: T) -> None:
        self.items.append(item)
        if self._task is not None:
            task, self._task = self._task, None
            trio.lowlevel.reschedule(task)

    async def get(self) -> T:
        if not self.items:
            self._task = trio.lowlevel.current_task()

            def abort(_: Any) -> trio.lowlevel.Abort:
                self._task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        return self.items.popleft()


class StreamIO:
    """Reads and writes a job stream. Under py-libp2p's NetStream there is, on our
    connections, our own yamux stream: the job links use it directly (NetStream's
    state checks and lock cost ~5 us a message) and write without a schedule point
    when nothing has to wait (the caller is about to wait for the peer anyway)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        muxed = getattr(stream, "muxed_stream", None)
        self.muxed = muxed if isinstance(muxed, MuxedStream) else None
        self.read: Callable[[int], Awaitable[bytes]] = (self.muxed or stream).read

    async def write(self, data: bytes) -> None:
        if self.muxed is None:
            await self.stream.write(data)
        elif not self.muxed.try_write(data):
            await self.muxed.write(data)
