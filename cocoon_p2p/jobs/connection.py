"""The job protocol's state machine, one per stream, in the manner of h11.

Bytes in, frames out: ``receive_data(bytes)`` buffers, ``next_event()`` returns
the next frame or :data:`NEED_DATA`; ``send(frame)`` checks the frame against
the rules and returns the bytes to write. A rule broken by the peer raises
:class:`RemoteProtocolError`; one broken by us raises :class:`LocalProtocolError`.
After a remote error the connection is in the error state and refuses every call.

Per job, both sides track the same states (a table below):

    client sends JobRequest          -> REQUESTED
    worker sends JobAccepted         REQUESTED -> RUNNING
    worker sends JobChunk            RUNNING -> RUNNING (seq 0, 1, 2, ... in order)
    worker sends JobResult/JobError  REQUESTED|RUNNING -> closed (job id retired)
    client sends JobCancel           REQUESTED|RUNNING -> same state, ``cancelling``

Job ids on a connection strictly increase, so a replayed request is refused
with constant memory. A cancel may cross the job's last frame on the wire, so
a worker ignores a cancel for a job it has already finished.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cocoon_p2p.core.errors import (
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    ReplayedMessage,
)
from cocoon_p2p.core.framing import FrameBuffer, NeedData

from .frames import (
    MAX_FRAME,
    Frame,
    JobAccepted,
    JobCancel,
    JobChunk,
    JobError,
    JobRequest,
    JobResult,
    decode_frame,
    encode_frame,
)


class Role(enum.Enum):
    CLIENT = "client"
    WORKER = "worker"


class JobState(enum.Enum):
    REQUESTED = "requested"
    RUNNING = "running"


MAX_OPEN_JOBS = 1024  # per connection; a worker refuses beyond its capacity long before


@dataclass
class _Job:
    state: JobState
    next_seq: int = 0
    cancelling: bool = False


# (sender role, frame type) -> states the job may be in. A missing entry is a protocol error.
_ALLOWED: dict[tuple[Role, type], frozenset[JobState]] = {
    (Role.WORKER, JobAccepted): frozenset({JobState.REQUESTED}),
    (Role.WORKER, JobChunk): frozenset({JobState.RUNNING}),
    (Role.WORKER, JobResult): frozenset({JobState.RUNNING}),
    (Role.WORKER, JobError): frozenset({JobState.REQUESTED, JobState.RUNNING}),
    (Role.CLIENT, JobCancel): frozenset({JobState.REQUESTED, JobState.RUNNING}),
}


class JobConnection:
    """Both ends of ``/cocoon/job/1`` use one of these, with their own ``role``."""

    def __init__(self, role: Role, *, max_frame: int = MAX_FRAME) -> None:
        self.role = role
        self.max_frame = max_frame
        self.jobs: dict[int, _Job] = {}
        self._last_job_id = -1
        self._frames = FrameBuffer(max_frame, what="job frame")
        self.errored: ProtocolError | None = None

    # ---- incoming --------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the stream (``b""`` is not end of stream here)."""
        self._check_usable()
        self._frames.feed(data)

    def next_event(self) -> Frame | NeedData:
        """The next complete frame from the peer, after checking it against the rules.

        A cancel that crossed the job's end is swallowed (it returns the frame after it).
        """
        self._check_usable()
        while True:
            try:
                body = self._frames.next_payload()
            except MessageTooLarge as exc:
                return self._fail(exc)
            if isinstance(body, NeedData):
                return body
            try:
                frame = decode_frame(body, max_frame=self.max_frame)
                if self._apply(frame, sender=self._peer_role(), incoming=True):
                    return frame
            except RemoteProtocolError as exc:
                return self._fail(exc)

    # ---- outgoing --------------------------------------------------------------

    def send(self, frame: Frame) -> bytes:
        """Bytes for ``frame``; LocalProtocolError if the rules forbid sending it now."""
        self._check_usable()
        data = encode_frame(frame, max_frame=self.max_frame)  # too large: refused, state untouched
        try:
            self._apply(frame, sender=self.role, incoming=False)
        except RemoteProtocolError as exc:  # the same rule, broken by us
            raise LocalProtocolError(str(exc), code=exc.code) from exc
        return data

    def open_job_ids(self) -> list[int]:
        return list(self.jobs)

    # ---- rules -------------------------------------------------------------------

    def _peer_role(self) -> Role:
        return Role.WORKER if self.role is Role.CLIENT else Role.CLIENT

    def _apply(self, frame: Frame, *, sender: Role, incoming: bool) -> bool:
        """Check ``frame`` from ``sender`` and update the job table; False: ignore it."""
        jid = frame.job_id
        if isinstance(frame, JobRequest):
            if sender is not Role.CLIENT:
                raise MalformedMessage("only a client sends job requests")
            if jid <= self._last_job_id:
                raise ReplayedMessage(f"job id {jid} is not above {self._last_job_id}")
            if len(self.jobs) >= MAX_OPEN_JOBS:
                raise MalformedMessage(f"more than {MAX_OPEN_JOBS} open jobs on one connection", code="busy")
            self._last_job_id = jid
            self.jobs[jid] = _Job(JobState.REQUESTED)
            return True
        allowed = _ALLOWED.get((sender, type(frame)))
        if allowed is None:
            raise MalformedMessage(f"a {sender.value} must not send {type(frame).__name__}")
        job = self.jobs.get(jid)
        if job is None:
            if isinstance(frame, JobCancel) and incoming:
                return False  # crossed the job's last frame: nothing to stop
            raise MalformedMessage(f"{type(frame).__name__} for job {jid}, which is not open")
        if job.state not in allowed:
            raise MalformedMessage(f"{type(frame).__name__} for job {jid} in state {job.state.value}")
        if isinstance(frame, JobCancel):
            if job.cancelling:
                return False
            job.cancelling = True
        elif isinstance(frame, JobAccepted):
            job.state = JobState.RUNNING
        elif isinstance(frame, JobChunk):
            if frame.seq != job.next_seq:
                raise MalformedMessage(f"job {jid}: chunk {frame.seq} where {job.next_seq} was due")
            job.next_seq += 1
        else:  # JobResult or JobError: the job's last frame
            del self.jobs[jid]
        return True

    def _fail(self, exc: RemoteProtocolError) -> NeedData:
        self.errored = exc
        raise exc

    def _check_usable(self) -> None:
        if self.errored is not None:
            raise LocalProtocolError(f"connection already failed: {self.errored}")
