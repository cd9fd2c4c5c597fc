"""How workers become known in the model: load snapshots carried by gossip, and DHT records.

A worker's announcements are snapshots of its load, taken periodically and on
change; a client's :class:`WorkerDirectory` (the library's, unchanged) takes in
the newest one that has reached it over the mesh whenever it routes a job.
DHT records are real :class:`CapabilityRecord` objects in the modelled Kademlia.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from cocoon_p2p.overlay.announcement import Announcement, Offer
from cocoon_p2p.overlay.capability import CapabilityRecord

from .kademlia import LookupResult
from .world import EPOCH_MS, SimClient, SimWorker, World


class Announcing:
    """Gossiped announcements and DHT records, between the workers and the clients' directories."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._delay_cache: dict[bytes, tuple[Any, list[int], dict[int, Any], float]] = {}
        self.visible: list[float] = []  # a new worker: from its start until half the clients know it
        self.announcers: dict[bytes, list[SimWorker]] = {}  # model -> workers that ever announced it

    def snapshot(self, w: SimWorker, *, force: bool = False) -> None:
        """The worker announces its load (periodically, and on change at most every 0.5 s)."""
        now = self.world.events.now
        if force or now - w.last_snapshot >= self.world.sc.gossip.load_announce_gap_s:
            if w.last_snapshot < 0:
                self.announcers.setdefault(w.model_id, []).append(w)
            w.snapshots.append([now, w.running, None])
            w.last_snapshot = now

    def first_announcement(self, w: SimWorker, session: int, joined: float) -> None:
        """A worker that just came up announces itself, then every announce interval."""
        world = self.world
        if session != w.session:
            return
        self.snapshot(w, force=True)
        world.events.after(world.sc.gossip.announce_interval_s, self._announce_tick, w, session)
        if world.events.now >= world.sc.warmup_s / 2 or joined < 1.0:  # sampled: a Dijkstra per join
            if len(self.visible) < 200:
                if world.sampled:  # the delays its messages take (a Dijkstra a join is too dear at 100,000 peers)
                    d = world.mesh.proxy_row(w.idx, world.events.now, world.sc.scale.delay_sources)
                else:
                    d = world.mesh.delays_from([w.idx], world.events.now)[w.idx]
                reach = sorted(d[c.idx] for c in world.clients if world.online[c.idx] and c.model_id == w.model_id)
                if reach and math.isfinite(reach[len(reach) // 2]):
                    self.visible.append(float(world.events.now - joined + reach[len(reach) // 2]))

    def _announce_tick(self, w: SimWorker, session: int) -> None:
        if session != w.session:
            return
        self.snapshot(w, force=True)
        self.world.events.after(self.world.sc.gossip.announce_interval_s, self._announce_tick, w, session)

    def publish(self, w: SimWorker, session: int) -> None:
        """The worker (re)publishes its DHT record, every refresh interval while it is up."""
        world = self.world
        if session != w.session:
            return
        now_ms, ttl = world.now_ms(), int(world.sc.dht.record_ttl_s * 1000)
        g = w.group
        rec = CapabilityRecord.create(
            w.ident, ttl_ms=ttl, now_ms=now_ms, model_id=w.model_id, backend="tensorrt", gpu=g.gpu,
            gpu_memory_mb=80_000, max_batch=8, price_nanoton=g.price_nanoton, unit="item", capacity=g.capacity,
            addrs=(f"/sim/{w.idx}",),
        )  # fmt: skip
        expires = world.events.now + world.sc.dht.record_ttl_s
        world.kad.publish(w.idx, w.key, rec, expires, lambda n: None)
        world.events.after(world.sc.dht.refresh_s, self.publish, w, session)

    def deliver(self, c: SimClient) -> None:
        """Feed the client's directory the newest announcement of each worker that has reached it."""
        world = self.world
        now = world.events.now
        sources, delays = self._delays_for(c.model_id, now)
        ttl_ms = int(world.sc.gossip.announce_ttl_s * 1000)
        now_ms = world.now_ms()
        col = c.idx
        for w_idx in sources:
            d = delays[w_idx][col]
            if d != math.inf:
                self.deliver_one(c, world.workers[w_idx], float(d), now, now_ms, ttl_ms)

    def deliver_one(self, c: SimClient, w: SimWorker, d: float, now: float, now_ms: int, ttl_ms: int) -> None:
        """Feed ``c``'s directory ``w``'s newest announcement that reached it (``d``: its delay)."""
        held = c.directory.announcement_of(w.ident.peer_id)
        for snap in reversed(w.snapshots):
            issued = snap[0]
            if issued + d > now:
                continue
            if issued < c.joined_at:  # gossipsub does not replay: it was in flight before the client joined
                break
            issued_ms = EPOCH_MS + int(issued * 1000)
            if (held is not None and held.issued_at_ms >= issued_ms) or issued_ms + ttl_ms <= now_ms:
                break
            if snap[2] is None:  # one announcement object per message, shared by its receivers
                g = w.group
                free = max(0, g.capacity - snap[1])
                offer = Offer(model_id=w.model_id, backend="tensorrt", gpu=g.gpu, price_nanoton=g.price_nanoton,
                              unit="item", capacity=g.capacity, free_capacity=free)  # fmt: skip
                snap[2] = Announcement(peer_id=w.ident.peer_id, addrs=(f"/sim/{w.idx}",), offers=(offer,),
                                       running_jobs=snap[1], issued_at_ms=issued_ms,
                                       expires_at_ms=issued_ms + ttl_ms)  # fmt: skip
            try:
                c.directory.accept(snap[2], origin=w.ident.peer_id, now_ms=int(EPOCH_MS + (issued + d) * 1000))
            except Exception:
                pass  # rate-limited or replayed: as a node would, keep what is held
            break

    def _delays_for(self, model_id: bytes, now: float) -> tuple[list[int], dict[int, Any]]:
        """The announcing workers of a model and their mesh delays (cached per mesh epoch)."""
        world = self.world
        key = (model_id, world.mesh.version)
        held = self._delay_cache.get(model_id)
        if held is None or held[0] != key or held[3] < now - world.sc.gossip.heartbeat_s:
            sources = [w.idx for w in world.workers if w.model_id == model_id and w.snapshots]
            delays = world.mesh.delays_from(sources, now)
            held = self._delay_cache[model_id] = (key, sources, delays, now)
        return held[1], held[2]

    def join_lookup(self, c: SimClient, session: int) -> None:
        """A (re)joining client looks its model up in the DHT (when the scenario measures the DHT)."""
        if session == c.session:
            self.lookup(c)

    def lookup(self, c: SimClient, then: Callable[[], None] | None = None) -> None:
        """Look the client's model up in the DHT; its records go to the directory, then ``then()``."""
        c.looked_up_at = self.world.events.now
        self.world.kad.lookup(c.idx, c.dht_key, lambda res: self._lookup_done(c, res, then), key=c.dht_key)

    def _lookup_done(self, c: SimClient, res: LookupResult, then: Callable[[], None] | None) -> None:
        world = self.world
        world.results.add_lookup(res, world.sc.peers)
        if world.sampled:  # a sample of what it found (the router samples two): memory stays O(clients)
            recs = list(res.records.values())
            keep = world.sc.scale.lookup_records
            if len(recs) > keep:
                recs = c.router.rng.sample(recs, keep)
            for rec in recs:
                held = c.records.get(rec.peer_id)
                if held is None or rec.issued_at_ms > held.issued_at_ms:
                    c.records[rec.peer_id] = rec
            now_ms = world.now_ms()
            if len(c.records) > 2 * keep:  # expired ones go first
                c.records = {p: r for p, r in c.records.items() if r.expires_at_ms > now_ms}
        else:
            for rec in res.records.values():
                c.directory.add_record(rec)
        if then is not None:
            then()
