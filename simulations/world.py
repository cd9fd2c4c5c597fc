"""The simulated peers, and the state every part of the model shares (:class:`World`)."""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nacl.signing import SigningKey

from cocoon_p2p.core.identity import Identity
from cocoon_p2p.jobs.attempts import JobAttempts
from cocoon_p2p.jobs.connection import JobConnection
from cocoon_p2p.jobs.routing import Router
from cocoon_p2p.overlay.capability import CapabilityRecord
from cocoon_p2p.overlay.directory import WorkerDirectory
from cocoon_p2p.payments.settlement import SettlementPolicy
from cocoon_p2p.payments.vouchers import VoucherBook, VoucherIssuer

from .events import EventQueue
from .gossip import Mesh
from .kademlia import Kademlia
from .latency import Latency
from .results import JobRecord, Results
from .scenario import ClientGroup, Scenario, WorkerGroup

if TYPE_CHECKING:
    from .spotchecks import Check

EPOCH_MS = 1_790_000_000_000  # virtual time 0, as Unix milliseconds (records carry absolute times)
DEAD_DETECT_S = 1.0  # a client notices a dead worker's connection after about this long


def model_id_of(name: str) -> bytes:
    """A scenario's model name as a model id (what real nodes would hash from the file)."""
    return hashlib.sha256(name.encode()).digest()


@dataclass
class SimWorker:
    idx: int
    group: WorkerGroup
    ident: Identity
    model_id: bytes
    key: int  # the model's DHT key
    behaviour: str = "honest"  # honest | drop | overcharge | stale
    attested: bool = False  # carries a TEE attestation claim (its evidence passes every check)
    cheats: bool = False  # returns wrong results on a share cheat.rate of its jobs
    queue: deque[Attempt] = field(default_factory=deque)
    serving: Attempt | None = None
    busy_s: float = 0.0
    jobs_done: int = 0
    assigned: int = 0  # jobs sent its way and not yet arrived (what a central scheduler also counts)
    # (issued, running, the announcement built once when first delivered) for recent announcements
    snapshots: deque[list[Any]] = field(default_factory=lambda: deque(maxlen=32))
    last_snapshot: float = -1.0
    payers: set[int] = field(default_factory=set)  # clients with an open channel to this worker
    last_paid: dict[int, float] = field(default_factory=dict)
    earned: int = 0  # paid out on chain to this worker
    session: int = 0  # bumped at each crash: events of an older session are void

    @property
    def running(self) -> int:
        return len(self.queue) + (self.serving is not None)


@dataclass
class Channel:
    deposit: int
    issuer: VoucherIssuer | None  # the client's side; None when vouchers are off (sums only)
    book: VoucherBook | None  # the worker's side
    sent: int = 0


@dataclass
class JobLink:
    """A client's job connection to one worker: both ends of the real protocol state machine."""

    client: JobConnection
    worker: JobConnection
    session: int  # the worker's session it was opened in (a restart resets the connection)
    to_worker_at: float = 0.0  # when its last message reaches the worker (a stream keeps order)
    to_client_at: float = 0.0


@dataclass
class SimClient:
    idx: int
    group: ClientGroup
    key: SigningKey
    model_id: bytes
    dht_key: int
    directory: WorkerDirectory
    router: Router
    channels: dict[int, Channel] = field(default_factory=dict)  # worker index -> channel
    links: dict[int, JobLink] = field(default_factory=dict)  # worker index -> job connection
    next_job_id: int = 0
    looked_up_at: float = -1e9
    session: int = 0
    joined_at: float = 0.0  # when its current session began (it hears only announcements sent since)
    requires_tee: bool = False  # its jobs go to attested workers only
    trusts_proofs: bool = False  # bans a worker on a fraud proof gossiped by another client
    banned: set[bytes] = field(default_factory=set)  # workers it caught, or heard proofs against: never used again
    records: dict[bytes, CapabilityRecord] = field(default_factory=dict)  # sampled view: its DHT records (.views)
    load_reports: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # worker -> (at ms, queue): job path


@dataclass(eq=False)
class SimJob:
    record: JobRecord
    client: SimClient
    deadline: float
    attempts: JobAttempts  # the library's retry policy, as JobClient.infer drives it
    done: bool = False
    current: Attempt | None = None
    held: bool = False  # its result is under a spot check: owed, past the deadline if need be
    check: Check | None = None  # this job is a run of that spot check (not a caller's job)


@dataclass(eq=False)
class Attempt:
    job: SimJob
    worker: SimWorker
    sent_at: float
    client_session: int
    link: JobLink
    job_id: int
    wire: bytes = b""  # the request's bytes, as the worker will read them
    service_s: float = 0.0  # the worker's compute time, reported in its result
    answer: int = 0  # what the worker returned: 0 the right result, n > 0 a wrong one (no two alike)
    queue_at_accept: tuple[int, int] | None = None  # (ms, jobs running) the worker put in its JobAccepted


@dataclass
class World:
    """What the model's parts share: the scenario, the clock, randomness, the network and the peers."""

    sc: Scenario
    rng: random.Random
    events: EventQueue
    latency: Latency
    policy: SettlementPolicy
    results: Results
    online: list[bool]
    mesh: Mesh
    kad: Kademlia
    workers: list[SimWorker]
    clients: list[SimClient]
    by_peer: dict[bytes, SimWorker]
    sampled: bool = False  # clients route from a sample of their view (.views), not a scan of it

    def now_ms(self) -> int:
        return EPOCH_MS + int(self.events.now * 1000)

    def client_at(self, idx: int) -> SimClient:
        """The client with peer index ``idx`` (clients come after the workers)."""
        return self.clients[idx - len(self.workers)]
