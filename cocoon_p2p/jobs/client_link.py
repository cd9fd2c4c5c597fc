"""The client's end of the job stream to one worker, shared by every job sent to it."""

from __future__ import annotations

from typing import Any

import trio

from cocoon_p2p.core.errors import RemoteProtocolError
from cocoon_p2p.core.framing import NeedData
from cocoon_p2p.transport.fastlock import FastLock

from . import frames as jf
from .attempts import JobFailed
from .connection import JobConnection, Role
from .ports import PeerFeedback
from .stream import READ_SIZE, Inbox, StreamIO


class ClientLink:
    """One stream to one worker; each frame goes to its job's inbox.

    Frames are parsed where the bytes arrive: on our connections, in the
    connection's reading task (no hand-over to a task of the link's own, which
    costs a pass of the scheduler per result). A broken link fails every job
    waiting on it with ``worker-lost``; a worker that broke the protocol is also
    reported to ``feedback``.
    """

    def __init__(self, peer_id: bytes, stream: Any, feedback: PeerFeedback) -> None:
        self.peer_id = peer_id
        self.stream = stream
        self.feedback = feedback
        self.io = StreamIO(stream)
        self.conn = JobConnection(Role.CLIENT)
        self.lock = FastLock()
        self.waiters: dict[int, Inbox[jf.Frame | JobFailed]] = {}
        self.broken: JobFailed | None = None
        self.relayed = False  # on a relayed connection (replaced once a direct one exists)

    def start(self, nursery: trio.Nursery) -> None:
        """Begin delivering frames: from our multiplexer's reading task, or a task of its own."""
        if self.io.muxed is not None:
            self.io.muxed.deliver_to(self.receive)
        else:
            nursery.start_soon(self._read_loop)

    async def send(self, frame: jf.Frame) -> None:
        """Write one frame (LocalProtocolError, untouched link: the rules forbid it now).
        Cancelled mid-write, some of it may have gone: the caller marks the link broken."""
        async with self.lock:
            await self.io.write(self.conn.send(frame))

    def receive(self, data: bytes | None) -> None:
        """Bytes from the worker (None: the stream ended); never raises."""
        if self.broken is not None:
            return
        try:
            if data is None:
                raise JobFailed(jf.WORKER_LOST, "stream closed", worker=self.peer_id)
            self.conn.receive_data(data)
            while not isinstance(frame := self.conn.next_event(), NeedData):
                inbox = self.waiters.get(frame.job_id)
                if inbox is not None:
                    inbox.put(frame)
        except JobFailed as exc:
            self.fail(exc)
        except RemoteProtocolError as exc:
            self.fail(JobFailed(jf.WORKER_LOST, f"worker broke the protocol: {exc}", worker=self.peer_id))
            self.feedback.misbehaved(self.peer_id, exc)
        except Exception as exc:
            self.fail(JobFailed(jf.WORKER_LOST, repr(exc), worker=self.peer_id))

    def fail(self, failure: JobFailed) -> None:
        """The link is broken: every waiting job gets ``failure``."""
        self.broken = failure
        for inbox in self.waiters.values():
            inbox.put(failure)

    async def _read_loop(self) -> None:  # for a stream on another multiplexer than ours
        try:
            while self.broken is None:
                self.receive(await self.io.read(READ_SIZE) or None)
        except Exception as exc:
            self.fail(JobFailed(jf.WORKER_LOST, repr(exc), worker=self.peer_id))
        finally:
            if self.broken is None:
                self.fail(JobFailed(jf.WORKER_LOST, "client stopped", worker=self.peer_id))
