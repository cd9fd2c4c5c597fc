"""The sampled view: routing in a large network without scanning every worker for every job.

In the full view (:meth:`.announcing.Announcing.deliver`) each job first feeds its
client's directory the newest announcement of *every* worker of the model, then the
library's :class:`Router` filters them all and samples two: O(workers) per job, so a
run costs O(N^2). The sampled view draws the router's candidates first and looks at
only those:

* a candidate is drawn uniformly among the workers that ever announced the model and
  kept if the client may route to it (in its price, not tried by this job, not cooling
  down, not banned, attested when required) and it is in the client's view (an
  announcement of it reached the client, fed to the client's own directory exactly as
  the full view does, or a DHT record the client holds), then accepted with odds
  ``weight / weight bound``, the weight being the router's (1 / learned job time).
  These are the router's own odds (draws in proportion to the weight, without
  replacement among the eligible offers), computed by rejection instead of a scan;
* the library's :meth:`JobAttempts.choose` then decides between the candidates (cost,
  price, ties at random), and learns from the job as in the full view;
* when fewer candidates than the router samples turn up after ``MAX_TRIES`` draws (a
  client that knows little yet, a small eligible pool), it falls back to the full
  view's scan, so a small pool is routed exactly as the library would.

Same odds, other random draws: a sampled run is not the full run of the same seed,
it is another run of the same model (see simulations/EXPERIMENTS.md, "Scale").
"""

from __future__ import annotations

from dataclasses import replace

from cocoon_p2p.jobs.routing import DEFAULT_JOB_S
from cocoon_p2p.overlay.capability import CapabilityRecord
from cocoon_p2p.overlay.directory import WorkerOffer

from .announcing import Announcing
from .world import SimClient, SimJob, SimWorker, World

MAX_TRIES = 64  # draws per candidate before falling back to the scan
_GOSSIP, _DHT, _BOTH = frozenset({"gossip"}), frozenset({"dht"}), frozenset({"gossip", "dht"})


def offer_of(c: SimClient, w: SimWorker, now_ms: int) -> WorkerOffer | None:
    """``w``'s offer in ``c``'s view: one row of ``WorkerDirectory.workers_for`` (gossip and
    DHT merged; the fresher source gives the terms, gossip alone the load), or None."""
    ann = c.directory.announcement_of(w.ident.peer_id)
    have = None
    if ann is not None and ann.expires_at_ms > now_ms:
        for o in ann.offers:
            if o.model_id == c.model_id:
                have = WorkerOffer(
                    peer_id=ann.peer_id, model_id=o.model_id, addrs=ann.addrs, backend=o.backend, gpu=o.gpu,
                    price_nanoton=o.price_nanoton, unit=o.unit, capacity=o.capacity, free_capacity=o.free_capacity,
                    running_jobs=ann.running_jobs, issued_at_ms=ann.issued_at_ms, expires_at_ms=ann.expires_at_ms,
                    sources=_GOSSIP, limits=o.limits, tee=ann.tee, catalog=o.catalog,
                    completion_price_nanoton=o.completion_price_nanoton,
                )  # fmt: skip
    rec = c.records.get(w.ident.peer_id)
    if rec is None or rec.expires_at_ms <= now_ms or rec.model_id != c.model_id:
        return have
    base: WorkerOffer | CapabilityRecord = have if have is not None and have.issued_at_ms >= rec.issued_at_ms else rec
    return WorkerOffer(
        peer_id=rec.peer_id, model_id=rec.model_id, addrs=base.addrs, backend=base.backend, gpu=base.gpu,
        price_nanoton=base.price_nanoton, unit=base.unit, capacity=base.capacity,
        free_capacity=have.free_capacity if have else None, running_jobs=have.running_jobs if have else None,
        issued_at_ms=base.issued_at_ms, expires_at_ms=base.expires_at_ms, sources=_BOTH if have else _DHT,
        gpu_memory_mb=rec.gpu_memory_mb, max_batch=rec.max_batch, limits=have.limits if have else None,
        tee=base.tee, catalog=have.catalog if have else None, completion_price_nanoton=base.completion_price_nanoton,
    )  # fmt: skip


def with_reported_load(world: World, c: SimClient, offers: list[WorkerOffer]) -> list[WorkerOffer]:
    """With ``routing.job_path_load``: each offer with the queue length of the worker's last
    JobAccepted to ``c`` where that is newer than the announcement the offer comes from."""
    if not world.sc.routing.job_path_load or not c.load_reports:
        return offers
    out = []
    for o in offers:
        r = c.load_reports.get(o.peer_id)
        out.append(replace(o, running_jobs=r[1]) if r is not None and r[0] > o.issued_at_ms else o)
    return out


class SampledView:
    """Draws a job's candidate workers in proportion to the router's weights, by rejection."""

    def __init__(self, world: World, announcing: Announcing) -> None:
        self.world = world
        self.announcing = announcing
        self.weight_bound: dict[int, float] = {}  # client -> no weight of its router is above this
        self.draws = 0
        self.fallbacks = 0

    def learned(self, c: SimClient, peer_id: bytes) -> None:
        """``c``'s router learnt a new job time for ``peer_id``: keep the bound above its weight."""
        s = c.router.estimates.get(peer_id)
        if s is not None and s.avg_job_s > 0:
            bound = self.weight_bound.get(c.idx, 1.0 / DEFAULT_JOB_S)
            self.weight_bound[c.idx] = max(bound, 1.0 / s.avg_job_s)

    def offer(self, c: SimClient, w: SimWorker) -> WorkerOffer | None:
        """``w``'s offer as ``c`` sees it now, after the newest announcement that reached it."""
        world = self.world
        now, now_ms = world.events.now, world.now_ms()
        d = world.mesh.delay(w.idx, c.idx, now, world.sc.scale.delay_sources)
        self.announcing.deliver_one(c, w, d, now, now_ms, int(world.sc.gossip.announce_ttl_s * 1000))
        return offer_of(c, w, now_ms)

    def candidates(self, c: SimClient, job: SimJob, *, weighted: bool) -> list[WorkerOffer] | None:
        """The router's sample for ``job``: ``choices`` offers (1 when not ``weighted``: a
        uniform pick), or None when the draws could not fill it (scan instead)."""
        world = self.world
        pool = self.announcing.announcers.get(c.model_id)
        if not pool:
            return None
        router, now = c.router, world.events.now
        rng, est, exclude, cap = router.rng, router.estimates, job.attempts.exclude, c.group.max_price_nanoton
        bound = self.weight_bound.get(c.idx, 1.0 / DEFAULT_JOB_S)
        want = router.choices if weighted else 1
        picked: list[WorkerOffer] = []
        seen: set[int] = set()
        for _ in range(want):
            for _ in range(MAX_TRIES):
                self.draws += 1
                w = pool[rng.randrange(len(pool))]
                peer = w.ident.peer_id
                if w.idx in seen or w.group.price_nanoton > cap or peer in exclude or peer in c.banned:
                    continue
                if c.requires_tee and not w.attested:
                    continue
                s = est.get(peer)
                if s is not None and s.avoid_until > now:
                    continue
                if weighted and rng.random() * bound > 1.0 / (s.avg_job_s if s is not None else DEFAULT_JOB_S):
                    continue
                o = self.offer(c, w)
                if o is None or o.price.highest > cap:
                    continue
                seen.add(w.idx)
                picked.append(o)
                break
            else:
                self.fallbacks += 1
                return None
        return picked

    def full(self, c: SimClient) -> list[WorkerOffer]:
        """Every offer in ``c``'s view (the fallback scan), freshest first as the directory's."""
        offers = []
        for w in self.announcing.announcers.get(c.model_id, ()):
            o = self.offer(c, w)
            if o is not None:
                offers.append(o)
        offers.sort(key=lambda o: (-o.issued_at_ms, o.peer_id))
        return offers
