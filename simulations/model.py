"""The model fidelity: a discrete-event simulation in virtual time over the library's own logic.

What runs unchanged from ``cocoon_p2p``: each client's :class:`WorkerDirectory`
(announcement acceptance, replay and rate limits, gossip + DHT merge, expiry),
its :class:`Router` (the COCOON rule with power of two choices, cool-downs,
learned job times), real :class:`CapabilityRecord` objects in the DHT, the job protocol's
:class:`JobConnection` at both ends of every client-worker link, the
client's price and charge checks (:func:`price_refusal`, :func:`charge_refusal`),
real vouchers (:class:`VoucherIssuer` signs, :class:`VoucherBook` checks) and the
settlement policy (:func:`client_action`, :func:`worker_action`). What is
modelled: the network (:mod:`.latency`), the gossipsub mesh (:mod:`.gossip`),
Kademlia (:mod:`.kademlia`), workers as single FIFO servers that admit up to
``capacity`` jobs, churn, and adversaries. Announcements are delivered without
their signatures (verifying the same bytes at every receiver changes no decision).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from cocoon_p2p.core.errors import LocalProtocolError
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.jobs.connection import JobConnection, Role
from cocoon_p2p.jobs.frames import (
    PRICE,
    WORKER_LOST,
    JobAccepted,
    JobCancel,
    JobError,
    JobRequest,
    JobResult,
    charge_refusal,
    price_refusal,
    retryable,
)
from cocoon_p2p.jobs.routing import Router
from cocoon_p2p.overlay.announcement import Announcement, Offer
from cocoon_p2p.overlay.capability import CapabilityRecord
from cocoon_p2p.overlay.directory import WorkerDirectory, WorkerOffer
from cocoon_p2p.payments.settlement import Action, SettlementPolicy, client_action, worker_action
from cocoon_p2p.payments.vouchers import VoucherBook, VoucherIssuer

from .events import EventQueue
from .gossip import Mesh
from .kademlia import Kademlia, LookupResult
from .latency import Latency
from .results import JobRecord, Results
from .scenario import ClientGroup, Scenario, WorkerGroup

EPOCH_MS = 1_790_000_000_000  # virtual time 0, as Unix milliseconds (records carry absolute times)
DEAD_DETECT_S = 1.0  # a client notices a dead worker's connection after about this long


def model_id_of(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


@dataclass
class _Worker:
    idx: int
    group: WorkerGroup
    ident: Identity
    model_id: bytes
    key: int  # the model's DHT key
    behaviour: str = "honest"  # honest | drop | overcharge | stale
    queue: deque[_Attempt] = field(default_factory=deque)
    serving: _Attempt | None = None
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
class _Channel:
    deposit: int
    issuer: VoucherIssuer | None  # the client's side; None when vouchers are off (sums only)
    book: VoucherBook | None  # the worker's side
    sent: int = 0


@dataclass
class _Link:
    """A client's job connection to one worker: both ends of the real protocol state machine."""

    client: JobConnection
    worker: JobConnection
    session: int  # the worker's session it was opened in (a restart resets the connection)
    to_worker_at: float = 0.0  # when its last message reaches the worker (a stream keeps order)
    to_client_at: float = 0.0


@dataclass
class _Client:
    idx: int
    group: ClientGroup
    key: SigningKey
    model_id: bytes
    dht_key: int
    directory: WorkerDirectory
    router: Router
    channels: dict[int, _Channel] = field(default_factory=dict)  # worker index -> channel
    links: dict[int, _Link] = field(default_factory=dict)  # worker index -> job connection
    next_job_id: int = 0
    looked_up_at: float = -1e9
    session: int = 0


@dataclass(eq=False)
class _Job:
    record: JobRecord
    client: _Client
    deadline: float
    tried: set[bytes] = field(default_factory=set)
    done: bool = False
    current: _Attempt | None = None


@dataclass(eq=False)
class _Attempt:
    job: _Job
    worker: _Worker
    sent_at: float
    client_session: int
    link: _Link
    job_id: int
    wire: bytes = b""  # the request's bytes, as the worker will read them
    service_s: float = 0.0  # the worker's compute time, reported in its result


class ModelSim:
    """One run of a scenario in virtual time. ``run()`` returns its :class:`Results`."""

    def __init__(self, sc: Scenario, *, progress: Callable[[float], None] | None = None) -> None:
        self.sc = sc
        self.progress = progress
        self.rng = random.Random(sc.seed)
        self.events = EventQueue()
        self.latency = Latency(sc.network, random.Random(self.rng.getrandbits(64)))
        self.policy = SettlementPolicy(
            deposit_nanoton=sc.settlement.deposit_nanoton,
            reserve_fraction=sc.settlement.reserve_fraction,
            settle_above_nanoton=sc.settlement.settle_above_nanoton or None,
            idle_close_s=sc.settlement.idle_close_s,
        )
        self.results = Results(sc)
        self._open_jobs: dict[_Job, None] = {}  # insertion-ordered: runs must not depend on addresses
        self._delay_cache: dict[bytes, tuple[Any, list[int], dict[int, Any], float]] = {}
        self._paid_total = 0
        self._visible: list[float] = []  # a new worker: from its start until half the clients know it
        self.workers: list[_Worker] = []
        self.clients: list[_Client] = []
        self._build()

    # ---- set-up ---------------------------------------------------------------------

    def _build(self) -> None:
        sc, rng = self.sc, self.rng
        n = sc.peers
        self.online = [True] * n
        self.mesh = Mesh(n, sc.gossip, random.Random(rng.getrandbits(64)), self.latency, self.online)
        self.kad = Kademlia(n, sc.dht, random.Random(rng.getrandbits(64)), self.latency, self.events, self.online)
        behaviours = self._behaviours()
        idx = 0
        for g in sc.workers:
            for _ in range(g.count):
                mid = model_id_of(g.model)
                ident = Identity(rng.getrandbits(256).to_bytes(32, "big"))
                w = _Worker(idx, g, ident, mid, int.from_bytes(mid[:8], "big") >> (64 - sc.dht.id_bits))
                w.behaviour = behaviours[idx]
                self.workers.append(w)
                idx += 1
        capacity_per_model: dict[str, float] = {}
        for w in self.workers:
            capacity_per_model[w.group.model] = (
                capacity_per_model.get(w.group.model, 0.0) + w.group.speed / w.group.job_s
            )
        for cg in sc.clients:
            rate = cg.rate_per_s
            if sc.load.target > 0:  # arrivals that use this share of the model's service capacity
                clients_of_model = sum(c.count for c in sc.clients if c.model == cg.model)
                rate = sc.load.target * capacity_per_model[cg.model] / (clients_of_model * cg.units)
            cg.rate_per_s = rate
            for _ in range(cg.count):
                mid = model_id_of(cg.model)
                router = Router(rng=random.Random(rng.getrandbits(64)), **self._router_args())
                key = SigningKey(rng.getrandbits(256).to_bytes(32, "big"))
                dht_key = int.from_bytes(mid[:8], "big") >> (64 - sc.dht.id_bits)
                c = _Client(idx, cg, key, mid, dht_key, WorkerDirectory(), router)
                self.clients.append(c)
                idx += 1
        self.by_peer = {w.ident.peer_id: w for w in self.workers}
        for p in range(idx):  # workers and clients join when the run starts; relays are already there
            self.online[p] = False
            self.kad.set_online(p, False)
        self.mesh.build()
        self.churning = {p for p in range(idx) if rng.random() < sc.churn.fraction}

    def _router_args(self) -> dict[str, int]:
        return {"choices": self.sc.routing.choices} if self.sc.routing.choices > 0 else {}

    def _behaviours(self) -> list[str]:
        total = sum(g.count for g in self.sc.workers)
        a = self.sc.adversaries
        order = list(range(total))
        self.rng.shuffle(order)
        out = ["honest"] * total
        cut = 0
        for kind, share in (
            ("drop", a.drop_fraction),
            ("overcharge", a.overcharge_fraction),
            ("stale", a.stale_fraction),
        ):
            n = round(share * total)
            for i in order[cut : cut + n]:
                out[i] = kind
            cut += n
        return out

    def now_ms(self) -> int:
        return EPOCH_MS + int(self.events.now * 1000)

    # ---- running ----------------------------------------------------------------------

    def run(self) -> Results:
        sc, ev = self.sc, self.events
        for w in self.workers:
            ev.at(self.rng.uniform(0, 1.0), self._worker_up, w)
            if w.behaviour == "stale":  # vanishes for good, its records live on
                ev.at(self.rng.uniform(sc.warmup_s, sc.duration_s / 2), self._worker_down, w, True)
        for c in self.clients:
            ev.at(self.rng.uniform(0, 1.0), self._client_up, c)
        for p in self.churning:
            ev.at(self.rng.expovariate(1 / sc.churn.session_mean_s), self._churn_down, p)
        ev.at(sc.sample_s, self._sample)
        ev.run_until(sc.duration_s, self.progress, every_s=max(1.0, sc.duration_s / 50))
        self._finish()
        return self.results

    def _finish(self) -> None:
        """Jobs still running at the end are counted as unfinished; money is summed up."""
        for job in list(self._open_jobs):
            job.done = True
            job.record.code = "unfinished"
            self.results.add_job(job.record)
        self._open_jobs.clear()
        r = self.results
        r.mesh_recomputes = self.mesh.recomputes
        vis = sorted(self._visible)
        r.extra["announce_visible_s_p50"] = vis[len(vis) // 2] if vis else math.nan
        r.events = self.events.processed
        held = sum(ch.sent for c in self.clients for ch in c.channels.values())
        r.money = {
            "vouchers_paid_nanoton": self._paid_total,
            "earned_settled_nanoton": sum(w.earned for w in self.workers),
            "held_in_open_channels_nanoton": held,
        }
        r.workers = [
            {"idx": w.idx, "gpu": w.group.gpu, "speed": w.group.speed, "behaviour": w.behaviour, "jobs": w.jobs_done,
             "busy_s": w.busy_s, "earned_nanoton": w.earned + self._held_for(w)}
            for w in self.workers
        ]  # fmt: skip

    def _held_for(self, w: _Worker) -> int:
        return sum(self.clients[i - len(self.workers)].channels[w.idx].sent for i in w.payers)

    # ---- churn ---------------------------------------------------------------------------

    def _churn_down(self, p: int) -> None:
        if p < len(self.workers):
            self._worker_down(self.workers[p], False)
        else:
            self._client_down(self.clients[p - len(self.workers)])
        self.events.after(self.rng.expovariate(1 / self.sc.churn.offline_mean_s), self._churn_up, p)

    def _churn_up(self, p: int) -> None:
        if p < len(self.workers):
            if self.workers[p].behaviour != "stale" or self.events.now < self.sc.warmup_s:
                self._worker_up(self.workers[p])
        else:
            self._client_up(self.clients[p - len(self.workers)])
        self.events.after(self.rng.expovariate(1 / self.sc.churn.session_mean_s), self._churn_down, p)

    def _peer_up(self, p: int) -> None:
        self.online[p] = True
        self.kad.set_online(p, True)
        # Its first peers (the bootstrap's) take its messages at once (gossipsub's fanout), as the mesh.
        self._graft(p, 5)

    def _graft(self, p: int, tries: int) -> None:
        """Join the mesh; a peer that found too few partners tries again at later heartbeats."""
        self.mesh.graft(p)
        if self.online[p] and len(self.mesh.adj[p]) < self.sc.gossip.D_lo and tries > 1:
            self.events.after(self.sc.gossip.heartbeat_s, self._graft, p, tries - 1)

    def _peer_down(self, p: int) -> None:
        self.online[p] = False
        self.kad.set_online(p, False)
        for q in self.mesh.leave(p):
            self.events.after(self.rng.uniform(0, self.sc.gossip.heartbeat_s), self.mesh.heartbeat, q)

    def _worker_up(self, w: _Worker) -> None:
        if self.online[w.idx]:
            return
        w.session += 1
        self._peer_up(w.idx)
        # It announces as soon as it is up, then periodically (and on load changes).
        self.events.after(self.sc.gossip.hop_delay_ms / 1000, self._first_announcement, w, w.session, self.events.now)
        self.events.after(self.sc.gossip.heartbeat_s, self._publish, w, w.session)
        self.events.after(self.sc.settlement.watch_s, self._watch, w, w.session)

    def _worker_down(self, w: _Worker, forever: bool) -> None:
        if not self.online[w.idx]:
            return
        w.session += 1
        self._peer_down(w.idx)
        lost = list(w.queue) + ([w.serving] if w.serving else [])
        w.queue.clear()
        w.serving = None
        for att in lost:  # the client sees the connection die
            self.events.after(self.latency.pair_rtt(att.job.client.idx, w.idx) + DEAD_DETECT_S / 2,
                              self._attempt_failed, att, WORKER_LOST)  # fmt: skip

    def _client_up(self, c: _Client) -> None:
        c.session += 1
        self._peer_up(c.idx)
        if self.sc.dht.lookup_on_join:  # measure the DHT: every (re)joining client looks its model up
            self.events.after(self.sc.gossip.heartbeat_s, self._join_lookup, c, c.session)
        self.events.after(self.rng.expovariate(c.group.rate_per_s), self._arrival, c, c.session)

    def _client_down(self, c: _Client) -> None:
        c.session += 1
        self._peer_down(c.idx)
        for job in [j for j in self._open_jobs if j.client is c]:
            job.done = True
            job.record.code = "client-left"
            self._open_jobs.pop(job, None)
            self.results.add_job(job.record)

    # ---- gossip and the DHT ------------------------------------------------------------------

    def _snapshot(self, w: _Worker, *, force: bool = False) -> None:
        """The worker announces its load (periodically, and on change at most every 0.5 s)."""
        now = self.events.now
        if force or now - w.last_snapshot >= self.sc.gossip.load_announce_gap_s:
            w.snapshots.append([now, w.running, None])
            w.last_snapshot = now

    def _first_announcement(self, w: _Worker, session: int, joined: float) -> None:
        if session != w.session:
            return
        self._snapshot(w, force=True)
        self.events.after(self.sc.gossip.announce_interval_s, self._announce_tick, w, session)
        if self.events.now >= self.sc.warmup_s / 2 or joined < 1.0:  # sampled: a Dijkstra per join
            if len(self._visible) < 200:
                d = self.mesh.delays_from([w.idx], self.events.now)[w.idx]
                reach = sorted(d[c.idx] for c in self.clients if self.online[c.idx] and c.model_id == w.model_id)
                if reach and math.isfinite(reach[len(reach) // 2]):
                    self._visible.append(float(self.events.now - joined + reach[len(reach) // 2]))

    def _announce_tick(self, w: _Worker, session: int) -> None:
        if session != w.session:
            return
        self._snapshot(w, force=True)
        self.events.after(self.sc.gossip.announce_interval_s, self._announce_tick, w, session)

    def _publish(self, w: _Worker, session: int) -> None:
        if session != w.session:
            return
        now_ms, ttl = self.now_ms(), int(self.sc.dht.record_ttl_s * 1000)
        g = w.group
        rec = CapabilityRecord.create(
            w.ident, ttl_ms=ttl, now_ms=now_ms, model_id=w.model_id, backend="tensorrt", gpu=g.gpu,
            gpu_memory_mb=80_000, max_batch=8, price_nanoton=g.price_nanoton, unit="item", capacity=g.capacity,
            addrs=(f"/sim/{w.idx}",),
        )  # fmt: skip
        expires = self.events.now + self.sc.dht.record_ttl_s
        self.kad.publish(w.idx, w.key, rec, expires, lambda n: None)
        self.events.after(self.sc.dht.refresh_s, self._publish, w, session)

    def _deliver_announcements(self, c: _Client) -> None:
        """Feed the client's directory the newest announcement of each worker that has reached it."""
        now = self.events.now
        sources, delays = self._delays_for(c.model_id, now)
        ttl_ms = int(self.sc.gossip.announce_ttl_s * 1000)
        now_ms = self.now_ms()
        col = c.idx
        for w_idx in sources:
            w = self.workers[w_idx]
            d = delays[w_idx][col]
            if d == math.inf:
                continue
            held = c.directory.announcement_of(w.ident.peer_id)
            for snap in reversed(w.snapshots):
                issued = snap[0]
                if issued + d > now:
                    continue
                issued_ms = EPOCH_MS + int(issued * 1000)
                if (held is not None and held.issued_at_ms >= issued_ms) or issued_ms + ttl_ms <= now_ms:
                    break
                if snap[2] is None:  # one announcement object per message, shared by its receivers
                    g = w.group
                    free = max(0, g.capacity - snap[1])
                    offer = Offer(model_id=w.model_id, backend="tensorrt", gpu=g.gpu, price_nanoton=g.price_nanoton,
                                  unit="item", capacity=g.capacity, free_capacity=free)  # fmt: skip
                    snap[2] = Announcement(peer_id=w.ident.peer_id, addrs=(f"/sim/{w_idx}",), offers=(offer,),
                                           running_jobs=snap[1], issued_at_ms=issued_ms,
                                           expires_at_ms=issued_ms + ttl_ms)  # fmt: skip
                try:
                    c.directory.accept(snap[2], origin=w.ident.peer_id, now_ms=int(EPOCH_MS + (issued + d) * 1000))
                except Exception:
                    pass  # rate-limited or replayed: as a node would, keep what is held
                break

    def _delays_for(self, model_id: bytes, now: float) -> tuple[list[int], dict[int, Any]]:
        """The announcing workers of a model and their mesh delays (cached per mesh epoch)."""
        key = (model_id, self.mesh.version)
        held = self._delay_cache.get(model_id)
        if held is None or held[0] != key or held[3] < now - self.sc.gossip.heartbeat_s:
            sources = [w.idx for w in self.workers if w.model_id == model_id and w.snapshots]
            delays = self.mesh.delays_from(sources, now)
            held = self._delay_cache[model_id] = (key, sources, delays, now)
        return held[1], held[2]

    def _join_lookup(self, c: _Client, session: int) -> None:
        if session == c.session:
            c.looked_up_at = self.events.now
            self.kad.lookup(c.idx, c.dht_key, lambda res: self._lookup_done(c, None, res), key=c.dht_key)

    def _lookup_done(self, c: _Client, job: _Job | None, res: LookupResult) -> None:
        self.results.add_lookup(res, self.sc.peers)
        for rec in res.records.values():
            c.directory.add_record(rec)
        if job is not None:
            self._try(job)

    # ---- jobs --------------------------------------------------------------------------------

    def _arrival(self, c: _Client, session: int) -> None:
        if session != c.session:
            return
        self.events.after(self.rng.expovariate(c.group.rate_per_s), self._arrival, c, session)
        now = self.events.now
        rec = JobRecord(issued=now, client=c.idx, counted=now >= self.sc.warmup_s)
        job = _Job(rec, c, now + self.sc.routing.timeout_s)
        self._open_jobs[job] = None
        self.events.at(job.deadline, self._deadline, job)
        self._try(job)

    def _offers(self, c: _Client) -> list[WorkerOffer]:
        self._deliver_announcements(c)
        return c.directory.workers_for(c.model_id, now_ms=self.now_ms())

    def _try(self, job: _Job) -> None:
        if job.done:
            return
        c, now = job.client, self.events.now
        if job.record.attempts >= self.sc.routing.attempts:
            return self._fail(job, job.record.code or "attempts")
        offers = self._offers(c)
        if not offers and now - c.looked_up_at > 5.0:  # nothing heard yet: ask the DHT
            c.looked_up_at = now
            self.kad.lookup(c.idx, c.dht_key, lambda res: self._lookup_done(c, job, res), key=c.dht_key)
            return
        w = self._choose(c, offers, job)
        if w is None:
            return self._fail(job, "no-workers")
        job.tried.add(w.ident.peer_id)
        job.record.attempts += 1
        c.router.started(w.ident.peer_id)
        link = c.links.get(w.idx)
        if link is None or link.session != w.session:  # (re)connect: a fresh stream, fresh state
            link = c.links[w.idx] = _Link(JobConnection(Role.CLIENT), JobConnection(Role.WORKER), w.session)
        c.next_job_id += 1
        att = _Attempt(job, w, now, c.session, link, c.next_job_id)
        deadline_ms, cap = EPOCH_MS + int(job.deadline * 1000), c.group.max_price_nanoton
        request = JobRequest(job_id=att.job_id, model_id=c.model_id, texts=("x",) * c.group.units,
                             deadline_ms=deadline_ms, max_price_nanoton=cap)  # fmt: skip
        try:
            att.wire = link.client.send(request)
        except LocalProtocolError:  # too many jobs left open on this connection (a worker that never answers)
            return self.events.after(0.0, self._attempt_failed, att, "busy")
        job.current = att
        w.assigned += 1
        link.to_worker_at = max(now + self.latency.one_way(c.idx, w.idx, c.group.request_bytes), link.to_worker_at)
        self.events.at(link.to_worker_at, self._at_worker, att)

    def _choose(self, c: _Client, offers: list[WorkerOffer], job: _Job) -> _Worker | None:
        rule, now = self.sc.routing.rule, self.events.now
        cap = c.group.max_price_nanoton
        if rule in ("oracle", "oracle-wait"):  # a central scheduler that sees every queue exactly
            pool = [
                w for w in self.workers
                if w.model_id == c.model_id and self.online[w.idx] and w.behaviour == "honest"
                and w.group.price_nanoton <= cap and w.ident.peer_id not in job.tried
            ]  # fmt: skip
            if not pool:
                return None
            if rule == "oracle":  # join the shortest queue (jobs there and on their way)
                cost = {w.idx: float(w.running + w.assigned) for w in pool}
            else:  # join the shortest expected wait: the queue weighed by the GPU's speed
                cost = {w.idx: (w.running + w.assigned + 1) / w.group.speed for w in pool}
            best = min(cost.values())
            return self.rng.choice([w for w in pool if cost[w.idx] == best])
        if rule == "random":
            pool_offers = c.router.eligible(offers, max_price=cap, now=now, exclude=frozenset(job.tried))
            return self.by_peer[self.rng.choice(pool_offers).peer_id] if pool_offers else None
        chosen = c.router.choose(offers, max_price=cap, now=now, exclude=frozenset(job.tried))
        return self.by_peer[chosen.peer_id] if chosen is not None else None

    def _at_worker(self, att: _Attempt) -> None:
        w, c = att.worker, att.job.client
        w.assigned -= 1
        back = self.latency.one_way(w.idx, c.idx)
        if not self.online[w.idx] or att.link.session != w.session:  # gone, or restarted: the stream died
            return self.events.after(back + DEAD_DETECT_S, self._attempt_failed, att, WORKER_LOST)
        att.link.worker.receive_data(att.wire)
        request = att.link.worker.next_event()
        assert isinstance(request, JobRequest) and request.job_id == att.job_id
        if w.running >= w.group.capacity:
            refusal = att.link.worker.send(JobError(job_id=att.job_id, code="busy", message="at capacity"))
            return self._to_client(att, back, refusal)
        if w.behaviour == "drop":
            return  # accepted, never answered: the client waits for its deadline
        w.queue.append(att)
        self._snapshot(w)
        if w.serving is None:
            self._serve_next(w)

    def _service_s(self, w: _Worker, units: int) -> float:
        mean = w.group.job_s * units / w.group.speed
        cv = w.group.service_cv
        if cv <= 0:
            return mean
        shape = 1 / (cv * cv)
        return self.rng.gammavariate(shape, mean / shape)

    def _serve_next(self, w: _Worker) -> None:
        if not w.queue:
            return
        att = w.queue.popleft()
        w.serving = att
        t = self._service_s(w, att.job.client.group.units)
        w.busy_s += t
        att.service_s = t
        self.events.after(t, self._served, w, att, w.session)

    def _served(self, w: _Worker, att: _Attempt, session: int) -> None:
        if session != w.session or w.serving is not att:
            return
        w.serving = None
        w.jobs_done += 1
        self._snapshot(w)
        self._serve_next(w)
        c = att.job.client
        units, price = c.group.units, w.group.price_nanoton
        cost = units * price * (2 if w.behaviour == "overcharge" else 1)
        # As the worker does for a quick job: JobAccepted goes out with the result, in one write.
        data = att.link.worker.send(JobAccepted(job_id=att.job_id, price_nanoton=price, unit="item"))
        data += att.link.worker.send(JobResult(job_id=att.job_id, usage_units=units, cost_nanoton=cost,
                                               compute_us=int(att.service_s * 1e6)))  # fmt: skip
        self._to_client(att, self.latency.one_way(w.idx, c.idx, c.group.result_bytes), data)

    def _to_client(self, att: _Attempt, delay: float, data: bytes) -> None:
        link = att.link
        link.to_client_at = max(self.events.now + delay, link.to_client_at)
        self.events.at(link.to_client_at, self._reply, att, data)

    def _reply(self, att: _Attempt, data: bytes) -> None:
        """The worker's frames reach the client's end of the connection."""
        job, w, c = att.job, att.worker, att.job.client
        if att.client_session != c.session:
            return
        att.link.client.receive_data(data)
        first = att.link.client.next_event()
        if isinstance(first, JobError):
            return self._attempt_failed(att, first.code)
        assert isinstance(first, JobAccepted)
        result = att.link.client.next_event()
        assert isinstance(result, JobResult)
        if job.done:
            return
        price = first.price_nanoton
        if price_refusal(price, c.group.max_price_nanoton) or charge_refusal(price, result.usage_units,
                                                                            result.cost_nanoton):  # fmt: skip
            return self._attempt_failed(att, PRICE)  # the client does not pay a wrong bill
        cost = result.cost_nanoton
        now = self.events.now
        c.router.finished(w.ident.peer_id, now - att.sent_at, service_s=result.compute_us / 1e6 or None)
        self._pay(c, w, cost)
        job.done = True
        self._open_jobs.pop(job, None)
        r = job.record
        r.ok, r.latency_s, r.worker, r.cost = True, now - r.issued, w.idx, cost
        self.results.add_job(r)

    def _attempt_failed(self, att: _Attempt, code: str) -> None:
        job, c = att.job, att.job.client
        if job.done or att.client_session != c.session:
            return
        c.router.failed(att.worker.ident.peer_id, self.events.now)
        if code == WORKER_LOST:  # as the node does: forget it until it announces again
            c.directory.forget(att.worker.ident.peer_id)
        job.record.code = code
        if not retryable(code):  # the node's rule
            return self._fail(job, code)
        self._try(job)

    def _deadline(self, job: _Job) -> None:
        if job.done:
            return
        att = job.current
        if att is not None and att.job_id in att.link.client.jobs:  # tell the worker to stop
            cancel = att.link.client.send(JobCancel(job_id=att.job_id))
            if self.online[att.worker.idx] and att.link.session == att.worker.session:
                att.link.worker.receive_data(cancel)
                att.link.worker.next_event()
        self._fail(job, "deadline")

    def _fail(self, job: _Job, code: str) -> None:
        if job.done:
            return
        job.done = True
        self._open_jobs.pop(job, None)
        job.record.code = code
        self.results.add_job(job.record)

    # ---- payments and settlement ----------------------------------------------------------------

    def _pay(self, c: _Client, w: _Worker, cost: int) -> None:
        ch = c.channels.get(w.idx)
        if (
            ch is not None
            and client_action(self.policy, deposit=ch.deposit, sent=ch.sent, next_cost=cost) is Action.ROLL_OVER
        ):
            self._close(c, w, cooperative=True)
            ch = None
        if ch is None:
            deposit, cid = self.policy.deposit_nanoton, self.rng.getrandbits(128)
            issuer = book = None
            if self.sc.settlement.vouchers:
                issuer = VoucherIssuer(channel_id=cid, key=c.key, deposit_a=deposit)
                book = VoucherBook(channel_id=cid, payer_key=c.key.verify_key, deposit_a=deposit)
            ch = c.channels[w.idx] = _Channel(deposit, issuer, book)
            w.payers.add(c.idx)
            self.results.onchain_ops += 2  # deploy + top up, init
            self.results.channels_opened += 1
        if ch.issuer is not None and ch.book is not None:
            voucher = ch.issuer.next(cost)
            ch.book.check(voucher, expect_at_least=cost)  # the worker's real acceptance rules
            ch.book.commit(voucher)
        ch.sent += cost
        self._paid_total += cost
        w.last_paid[c.idx] = self.events.now

    def _close(self, c: _Client, w: _Worker, *, cooperative: bool) -> None:
        ch = c.channels.pop(w.idx)
        w.payers.discard(c.idx)
        w.earned += ch.sent
        self.results.onchain_ops += 1 if cooperative else 2  # close; or start + finish after quarantine
        self.results.channels_closed += 1

    def _watch(self, w: _Worker, session: int) -> None:
        """The worker's settlement pass over its channels."""
        if session != w.session:
            return
        now = self.events.now
        for c_idx in list(w.payers):
            c = self.clients[c_idx - len(self.workers)]
            ch = c.channels.get(w.idx)
            if ch is None:
                continue
            silent = now - w.last_paid.get(c_idx, now)
            if worker_action(self.policy, received=ch.sent, payer_silent_s=silent) is Action.CLOSE:
                self._close(c, w, cooperative=self.online[c.idx])
        self.events.after(self.sc.settlement.watch_s, self._watch, w, session)

    # ---- sampling ---------------------------------------------------------------------------------

    def _sample(self) -> None:
        now = self.events.now
        online_workers = sum(1 for w in self.workers if self.online[w.idx])
        running = sum(w.running for w in self.workers)
        coverage = None
        sources = [w for w in self.workers if self.online[w.idx]]
        if sources:
            src = self.rng.choice(sources).idx
            coverage = [self.mesh.coverage(src, t, now) for t in (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)]
        self.results.add_sample(now, online_workers, running, coverage)
        self.events.after(self.sc.sample_s, self._sample)
