"""The model fidelity: a discrete-event simulation in virtual time over the library's own logic.

What runs unchanged from ``cocoon_p2p``: each client's :class:`WorkerDirectory`
(announcement acceptance, replay and rate limits, gossip + DHT merge, expiry),
its :class:`Router` (the COCOON rule with power of two choices, cool-downs,
learned job times) and the client's retry policy (:class:`JobAttempts`), real
:class:`CapabilityRecord` objects in the DHT, the job protocol's
:class:`JobConnection` at both ends of every client-worker link, the client's
price and charge checks (:func:`price_refusal`, :func:`charge_refusal`), real
vouchers (:class:`VoucherIssuer` signs, :class:`VoucherBook` checks) and the
settlement policy (:func:`client_action`, :func:`worker_action`). What is
modelled: the network (:mod:`.latency`), the gossipsub mesh (:mod:`.gossip`),
Kademlia (:mod:`.kademlia`), workers as single FIFO servers that admit up to
``capacity`` jobs, churn, adversaries, TEE attestation (:mod:`.tee`: which
workers are attested, which clients require it, what evidence costs), and wrong
results with the clients' spot checks, bans and fraud proofs (:mod:`.cheating`).
Announcements are delivered without their signatures (verifying the same bytes
at every receiver changes no decision).

The parts: :class:`ModelSim` (here) builds the peers and runs churn and
sampling; :mod:`.announcing` carries announcements and DHT records,
:mod:`.jobflow` the jobs, :mod:`.settling` the payments, all over the shared
:class:`~.world.World`.
"""

from __future__ import annotations

import gc
import math
import random
from collections.abc import Callable

from nacl.signing import SigningKey

from cocoon_p2p.core.identity import Identity
from cocoon_p2p.jobs.routing import Router
from cocoon_p2p.overlay.directory import WorkerDirectory
from cocoon_p2p.payments.settlement import SettlementPolicy

from .announcing import Announcing
from .cheating import Cheating
from .cheating import assign_roles as assign_cheaters
from .events import EventQueue
from .gossip import Mesh
from .jobflow import JobFlow
from .kademlia import Kademlia
from .latency import Latency
from .results import COVERAGE_AT_S, Results
from .scenario import Scenario
from .settling import Settlement
from .tee import Attestation, assign_roles
from .world import EPOCH_MS, SimClient, SimWorker, World, model_id_of

__all__ = ["EPOCH_MS", "ModelSim", "model_id_of"]


class ModelSim:
    """One run of a scenario in virtual time. ``run()`` returns its :class:`Results`."""

    def __init__(self, sc: Scenario, *, progress: Callable[[float], None] | None = None) -> None:
        self.sc = sc
        self.progress = progress
        rng = random.Random(sc.seed)
        events = EventQueue()
        latency = Latency(sc.network, random.Random(rng.getrandbits(64)))
        policy = SettlementPolicy(
            deposit_nanoton=sc.settlement.deposit_nanoton,
            reserve_fraction=sc.settlement.reserve_fraction,
            settle_above_nanoton=sc.settlement.settle_above_nanoton or None,
            idle_close_s=sc.settlement.idle_close_s,
        )
        self.world = self._build(rng, events, latency, policy)
        self.announcing = Announcing(self.world)
        self.settlement = Settlement(self.world)
        self.attestation = Attestation(self.world)
        self.cheating = Cheating(self.world, self.settlement)
        self.jobs = JobFlow(self.world, self.announcing, self.settlement, self.attestation, self.cheating)

    @property
    def results(self) -> Results:
        return self.world.results

    # ---- set-up ---------------------------------------------------------------------

    def _build(self, rng: random.Random, events: EventQueue, latency: Latency, policy: SettlementPolicy) -> World:
        sc = self.sc
        n = sc.peers
        online = [True] * n
        mesh = Mesh(n, sc.gossip, random.Random(rng.getrandbits(64)), latency, online)
        kad = Kademlia(n, sc.dht, random.Random(rng.getrandbits(64)), latency, events, online)
        behaviours = self._behaviours(rng)
        workers: list[SimWorker] = []
        idx = 0
        for g in sc.workers:
            for _ in range(g.count):
                mid = model_id_of(g.model)
                ident = Identity(rng.getrandbits(256).to_bytes(32, "big"))
                w = SimWorker(idx, g, ident, mid, int.from_bytes(mid[:8], "big") >> (64 - sc.dht.id_bits))
                w.behaviour = behaviours[idx]
                workers.append(w)
                idx += 1
        capacity_per_model: dict[str, float] = {}
        for w in workers:
            capacity_per_model[w.group.model] = (
                capacity_per_model.get(w.group.model, 0.0) + w.group.speed / w.group.job_s
            )
        clients: list[SimClient] = []
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
                clients.append(SimClient(idx, cg, key, mid, dht_key, WorkerDirectory(), router))
                idx += 1
        assign_roles(sc.tee, sc.seed, workers, clients)
        assign_cheaters(sc.cheat, sc.seed, workers, clients)
        by_peer = {w.ident.peer_id: w for w in workers}
        for p in range(idx):  # workers and clients join when the run starts; relays are already there
            online[p] = False
            kad.set_online(p, False)
        mesh.build()
        self.churning = {p for p in range(idx) if rng.random() < sc.churn.fraction}
        results = Results(sc)
        per_model: dict[bytes, int] = {}
        for w in workers:
            per_model[w.model_id] = per_model.get(w.model_id, 0) + 1
        sampled = sc.scale.sampled(max(per_model.values(), default=0))
        results.extra["view"] = "sampled" if sampled else "full"
        mesh.graph_per_epoch = sampled
        if sampled:
            mesh.epoch_s = sc.scale.epoch_s
        kad.provider_cap = sc.dht.k if sampled else None  # k a key in an answer, as libp2p's stores keep
        return World(sc, rng, events, latency, policy, results, online, mesh, kad, workers, clients, by_peer, sampled)

    def _router_args(self) -> dict[str, int]:
        return {"choices": self.sc.routing.choices} if self.sc.routing.choices > 0 else {}

    def _behaviours(self, rng: random.Random) -> list[str]:
        total = sum(g.count for g in self.sc.workers)
        a = self.sc.adversaries
        order = list(range(total))
        rng.shuffle(order)
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
        return self.world.now_ms()

    # ---- running ----------------------------------------------------------------------

    def run(self) -> Results:
        """Run the scenario to its end; the results, with every job accounted for."""
        sc, world = self.sc, self.world
        ev, rng = world.events, world.rng
        for w in world.workers:
            ev.at(rng.uniform(0, 1.0), self._worker_up, w)
            if w.behaviour == "stale":  # vanishes for good, its records live on
                ev.at(rng.uniform(sc.warmup_s, sc.duration_s / 2), self._worker_down, w, True)
        for c in world.clients:
            ev.at(rng.uniform(0, 1.0), self._client_up, c)
        for p in self.churning:
            ev.at(rng.expovariate(1 / sc.churn.session_mean_s), self._churn_down, p)
        ev.at(sc.sample_s, self._sample)
        # The peers built above live for the whole run: frozen, the collector stops scanning them,
        # and it runs less often (at 100,000 peers it took a tenth of the run and more).
        gc.collect()
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(100_000, 50, 1000)
        try:
            ev.run_until(sc.duration_s, self.progress, every_s=max(1.0, sc.duration_s / 50))
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
        self._finish()
        return world.results

    def _finish(self) -> None:
        """Jobs still running at the end are counted as unfinished; money is summed up."""
        world = self.world
        self.jobs.end_of_run()
        r = world.results
        r.mesh_recomputes = world.mesh.recomputes
        vis = sorted(self.announcing.visible)
        r.extra["announce_visible_s_p50"] = vis[len(vis) // 2] if vis else math.nan
        r.events = world.events.processed
        r.attestation_ask_s = self.attestation.ask_s
        if self.cheating.in_use:
            r.cheat = self.cheating.summary()
        r.money = {
            "vouchers_paid_nanoton": self.settlement.paid_total,
            "earned_settled_nanoton": sum(w.earned for w in world.workers),
            "held_in_open_channels_nanoton": self.settlement.held_total(),
        }
        r.workers = [
            {"idx": w.idx, "gpu": w.group.gpu, "speed": w.group.speed, "behaviour": w.behaviour, "jobs": w.jobs_done,
             "busy_s": w.busy_s, "earned_nanoton": w.earned + self.settlement.held_for(w), "attested": w.attested,
             "cheats": w.cheats}
            for w in world.workers
        ]  # fmt: skip

    # ---- churn ---------------------------------------------------------------------------

    def _churn_down(self, p: int) -> None:
        world = self.world
        if p < len(world.workers):
            self._worker_down(world.workers[p], False)
        else:
            self._client_down(world.client_at(p))
        world.events.after(world.rng.expovariate(1 / self.sc.churn.offline_mean_s), self._churn_up, p)

    def _churn_up(self, p: int) -> None:
        world = self.world
        if p < len(world.workers):
            if world.workers[p].behaviour != "stale" or world.events.now < self.sc.warmup_s:
                self._worker_up(world.workers[p])
        else:
            self._client_up(world.client_at(p))
        world.events.after(world.rng.expovariate(1 / self.sc.churn.session_mean_s), self._churn_down, p)

    def _peer_up(self, p: int) -> None:
        self.world.online[p] = True
        self.world.kad.set_online(p, True)
        # Its first peers (the bootstrap's) take its messages at once (gossipsub's fanout), as the mesh.
        self._graft(p, 5)

    def _graft(self, p: int, tries: int) -> None:
        """Join the mesh; a peer that found too few partners tries again at later heartbeats."""
        world = self.world
        world.mesh.graft(p)
        if world.online[p] and len(world.mesh.adj[p]) < self.sc.gossip.D_lo and tries > 1:
            world.events.after(self.sc.gossip.heartbeat_s, self._graft, p, tries - 1)

    def _peer_down(self, p: int) -> None:
        world = self.world
        world.online[p] = False
        world.kad.set_online(p, False)
        for q in world.mesh.leave(p):
            world.events.after(world.rng.uniform(0, self.sc.gossip.heartbeat_s), world.mesh.heartbeat, q)

    def _worker_up(self, w: SimWorker) -> None:
        world = self.world
        if world.online[w.idx]:
            return
        w.session += 1
        self._peer_up(w.idx)
        # It announces as soon as it is up, then periodically (and on load changes).
        gossip = self.sc.gossip
        world.events.after(
            gossip.hop_delay_ms / 1000, self.announcing.first_announcement, w, w.session, world.events.now
        )
        world.events.after(gossip.heartbeat_s, self.announcing.publish, w, w.session)
        world.events.after(self.sc.settlement.watch_s, self.settlement.watch, w, w.session)

    def _worker_down(self, w: SimWorker, forever: bool) -> None:
        if not self.world.online[w.idx]:
            return
        w.session += 1
        self._peer_down(w.idx)
        self.jobs.worker_lost(w)

    def _client_up(self, c: SimClient) -> None:
        world = self.world
        c.session += 1
        c.joined_at = world.events.now
        self._peer_up(c.idx)
        if self.sc.dht.lookup_on_join:  # measure the DHT: every (re)joining client looks its model up
            world.events.after(self.sc.gossip.heartbeat_s, self.announcing.join_lookup, c, c.session)
        world.events.after(world.rng.expovariate(c.group.rate_per_s), self.jobs.arrival, c, c.session)

    def _client_down(self, c: SimClient) -> None:
        c.session += 1
        self._peer_down(c.idx)
        self.jobs.client_left(c)

    # ---- sampling ---------------------------------------------------------------------------------

    def _sample(self) -> None:
        world = self.world
        now = world.events.now
        online_workers = sum(1 for w in world.workers if world.online[w.idx])
        running = sum(w.running for w in world.workers)
        coverage = None
        sources = [w for w in world.workers if world.online[w.idx]]
        if sources:
            src, mesh = world.rng.choice(sources).idx, world.mesh
            # The sampled view delivers a worker's announcements along its proxy's row: measure that.
            row = (
                mesh.proxy_row(src, now, self.sc.scale.delay_sources)
                if world.sampled
                else mesh.delays_from([src], now)[src]
            )
            coverage = mesh.coverage(row, COVERAGE_AT_S)
        world.results.add_sample(now, online_workers, running, coverage)
        world.events.after(self.sc.sample_s, self._sample)
