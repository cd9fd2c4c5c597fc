"""The worker's end of one client's job stream, and a job admitted on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cocoon_p2p.core.errors import LocalProtocolError
from cocoon_p2p.core.framing import NeedData
from cocoon_p2p.execution.executor import RunRequest
from cocoon_p2p.transport.fastlock import FastLock

from . import frames as jf
from .connection import JobConnection, Role
from .slots import Slots, StreamSlots
from .stream import READ_SIZE, Inbox, StreamIO, remote_peer


@dataclass(eq=False)
class WorkerJob:
    """A job admitted on a link: its request, what the executor runs, its batch key."""

    req: jf.JobRequest
    run: RunRequest
    link: WorkerLink
    key: object
    cancelled: bool = False
    admitted_at: float = field(default_factory=time.perf_counter)


class Flush:
    """An inbox item: send what is pending (the reading task could not without a wait)."""


FLUSH = Flush()
WorkerItem = jf.Frame | Exception | Flush | None


class WorkerLink:
    """The worker's end of one client stream.

    On our connections frames are parsed where the bytes arrive, in the
    connection's reading task: a quick job for an idle model runs right there
    (``inline`` returns True when it took the request), and everything else
    queues, in order, for the stream's task (:meth:`next_item`).

    The link holds the worker's slots its jobs took (``jobs``, out of ``slots``):
    :meth:`close` gives them all back when the stream ends, however it ended.
    """

    def __init__(self, stream: Any, inline: Callable[[WorkerLink, jf.JobRequest], bool], slots: Slots) -> None:
        self.stream = stream
        self.io = StreamIO(stream)
        self.peer = remote_peer(stream)
        self.conn = JobConnection(Role.WORKER)
        self.lock = FastLock()  # held only around one write: no scheduler trip when free
        self.jobs: StreamSlots[WorkerJob] = slots.stream(self.peer)
        self.pending = bytearray()  # frames held back to share the next write
        self.inbox: Inbox[WorkerItem] = Inbox()
        self._inline = inline
        self._failed = False
        if self.io.muxed is not None:
            self.io.muxed.deliver_to(self.receive)

    def receive(self, data: bytes | None) -> None:
        """Bytes from the client (None: the stream ended); never raises."""
        if self._failed:
            return
        if data is None:
            self.inbox.put(None)
            return
        try:
            self.conn.receive_data(data)
            while not isinstance(frame := self.conn.next_event(), NeedData):
                if not (isinstance(frame, jf.JobRequest) and self.inbox.idle and self._inline(self, frame)):
                    self.inbox.put(frame)
        except Exception as exc:  # the stream's task raises it
            self._failed = True
            # The stream closes once its task sees this: frames still queued ahead of it
            # are dropped unserved (a flood of pipelined requests costs nothing more).
            self.inbox.items.clear()
            self.inbox.put(exc)

    def close(self) -> list[WorkerJob]:
        """The stream ended: every slot its jobs held goes back, and no job is admitted
        on it any more. The jobs that were still open, now abandoned (neither answered nor billed)."""
        self._failed = True
        jobs = self.jobs.close()
        for job in jobs:
            job.cancelled = True
        return jobs

    async def next_item(self) -> WorkerItem:
        """The next frame (or error, or flush) for the stream's task; None at the end."""
        if self.io.muxed is None:  # another multiplexer than ours: read here
            while not self.inbox.items:
                self.receive(await self.io.read(READ_SIZE) or None)
        return await self.inbox.get()

    def send_later(self, frame: jf.Frame) -> None:
        """Queue ``frame`` to go out with the next :meth:`send` or :meth:`flush`:
        a fast job's JobAccepted then shares one encrypted write with its result."""
        self.pending += self.conn.send(frame)

    def flush_now(self) -> None:
        """Send what is pending if that needs no wait, else leave it to the stream's task."""
        if not self.pending:
            return
        if not self.lock.locked() and self.io.muxed is not None and self.io.muxed.try_write(bytes(self.pending)):
            self.pending = bytearray()
        else:
            self.inbox.put(FLUSH)

    async def send(self, frame: jf.Frame) -> None:
        """Write ``frame`` after what is pending; a frame the rules no longer allow
        (its job already ended) is dropped."""
        async with self.lock:
            try:
                data = self.conn.send(frame)
            except LocalProtocolError:  # e.g. the job already ended: nothing to send
                return
            if self.pending:
                data, self.pending = bytes(self.pending) + data, bytearray()
            await self.io.write(data)

    async def flush(self) -> None:
        """Write what is pending."""
        async with self.lock:
            if self.pending:
                data, self.pending = bytes(self.pending), bytearray()
                await self.io.write(data)
