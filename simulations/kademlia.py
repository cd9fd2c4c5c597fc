"""Kademlia at message level: XOR routing tables of k-buckets, iterative lookups with
alpha queries in flight, RPC timeouts for peers that are gone, provider records.

Routing tables are sampled from the peers online when a table is (re)built, up to
k per bucket, and rebuilt every ``refresh_s``: between rebuilds they go stale as
peers leave, as real tables do. A lookup ends when the k closest peers it knows
have all answered; it reports its time, messages and depth (sequential hops).
Capability records ride with provider records here; the real client fetches
them in one more parallel round, so one round trip is added when any are found.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .events import EventQueue
from .latency import Latency
from .scenario import Dht


@dataclass
class LookupResult:
    target: int
    started: float
    time_s: float
    messages: int
    hops: int  # the depth at which the closest peer found was reached
    timeouts: int
    records: dict[int, Any]  # provider (peer index) -> its record
    closest: list[int]  # the peers closest to the target that answered, closest first


@dataclass
class _Lookup:
    start: int
    target: int
    key: int | None  # collect records stored under this key
    done: Callable[[LookupResult], None]
    t0: float
    best: list[tuple[int, int]] = field(default_factory=list)  # (distance, peer), closest first
    depth: dict[int, int] = field(default_factory=dict)
    queried: set[int] = field(default_factory=set)
    answered: set[int] = field(default_factory=set)
    pending: int = 0
    messages: int = 0
    timeouts: int = 0
    records: dict[int, Any] = field(default_factory=dict)
    finished: bool = False
    known: set[int] = field(default_factory=set)  # the peers in best (kept with it: a set per answer costs)


class Kademlia:
    def __init__(self, n: int, cfg: Dht, rng: random.Random, latency: Latency, events: EventQueue,
                 online: list[bool]) -> None:  # fmt: skip
        self.cfg = cfg
        self.rng = rng
        self.latency = latency
        self.events = events
        self.online = online
        self.ids = [rng.getrandbits(cfg.id_bits) for _ in range(n)]
        # node -> (built at, contacts, their ids): ids as an array, so the closest are found in C
        self._tables: dict[int, tuple[float, list[int], np.ndarray, np.ndarray]] = {}
        pairs = sorted((self.ids[p], p) for p in range(n) if online[p])
        self._ids_sorted = [i for i, _ in pairs]  # the online peers, by id (kept up to date)
        self._peers_sorted = [p for _, p in pairs]
        self.stores: dict[int, dict[int, dict[int, tuple[float, Any]]]] = {}  # node -> key -> provider -> (exp, rec)
        # At most this many providers a key in one answer (None: all). A lookup of a model that
        # 3,000 workers provide would otherwise copy 3,000 records from each of the k closest.
        self.provider_cap: int | None = None

    # ---- routing tables -----------------------------------------------------------

    def set_online(self, p: int, online: bool) -> None:
        """Keep the sorted index of online peers in step with churn (tables are rebuilt from it)."""
        i = bisect.bisect_left(self._ids_sorted, self.ids[p])
        present = i < len(self._ids_sorted) and self._peers_sorted[i] == p
        if online and not present:
            self._ids_sorted.insert(i, self.ids[p])
            self._peers_sorted.insert(i, p)
        elif not online and present:
            del self._ids_sorted[i], self._peers_sorted[i]
        if not online:
            self.forget(p)

    def table(self, node: int) -> list[int]:
        """Up to k contacts per bucket, sampled when built; rebuilt after ``refresh_s``."""
        return self._table(node)[1]

    def _table(self, node: int) -> tuple[float, list[int], np.ndarray, np.ndarray]:
        held = self._tables.get(node)
        if held is not None and self.events.now - held[0] < self.cfg.refresh_s:
            return held
        ids, peers = self._ids_sorted, self._peers_sorted
        me, k, contacts = self.ids[node], self.cfg.k, []
        for b in range(self.cfg.id_bits):
            base = ((me >> (b + 1)) << (b + 1)) | ((((me >> b) & 1) ^ 1) << b)
            lo, hi = bisect.bisect_left(ids, base), bisect.bisect_left(ids, base + (1 << b))
            if hi - lo <= k:
                contacts.extend(peers[lo:hi])
            else:
                contacts.extend(peers[i] for i in self.rng.sample(range(lo, hi), k))
        held = (self.events.now, contacts, np.array([self.ids[p] for p in contacts], dtype=np.uint64),
                np.array(contacts, dtype=np.int64))  # fmt: skip
        self._tables[node] = held
        return held

    def forget(self, node: int) -> None:
        """A node restarts: empty table and store."""
        self._tables.pop(node, None)
        self.stores.pop(node, None)

    def closest(self, node: int, target: int, n: int) -> list[int]:
        _, contacts, ids, peers = self._table(node)
        d = ids ^ np.uint64(target)  # distinct ids, distinct distances: the order a full sort gives
        if len(contacts) > n:
            near = np.argpartition(d, n)[:n]
            order = near[np.argsort(d[near])]
        else:
            order = np.argsort(d)
        out: list[int] = peers[order].tolist()
        return out

    # ---- lookups ------------------------------------------------------------------------

    def lookup(self, start: int, target: int, done: Callable[[LookupResult], None], *, key: int | None = None) -> None:
        """Find the k peers closest to ``target`` from ``start`` (and records under ``key``)."""
        lk = _Lookup(start, target, key, done, self.events.now)
        for p in self.closest(start, target, self.cfg.k):
            lk.best.append((self.ids[p] ^ target, p))
            lk.known.add(p)
            lk.depth[p] = 1
        self._step(lk)

    def _step(self, lk: _Lookup) -> None:
        if lk.finished:
            return
        waiting = [p for _, p in lk.best[: self.cfg.k] if p not in lk.queried]
        if not waiting and lk.pending == 0:
            lk.finished = True
            closest = [p for _, p in lk.best if p in lk.answered]
            hops = lk.depth.get(closest[0], 0) if closest else 0
            extra = self.latency.rtt() + self.cfg.rpc_overhead_ms / 1000 if lk.records else 0.0  # fetch them
            elapsed = self.events.now - lk.t0 + extra
            res = LookupResult(lk.target, lk.t0, elapsed, lk.messages, hops, lk.timeouts, lk.records, closest)
            self.events.after(extra, lk.done, res)
            return
        for p in waiting[: self.cfg.alpha - lk.pending]:
            lk.queried.add(p)
            lk.pending += 1
            lk.messages += 1
            if not self.online[p] or self.latency.lost() or self.latency.lost():
                lk.timeouts += 1
                self.events.after(self.cfg.rpc_timeout_s, self._failed, lk, p)
            else:
                rpc_s = self.latency.pair_rtt(lk.start, p) + self.cfg.rpc_overhead_ms / 1000
                self.events.after(rpc_s, self._answered, lk, p)

    def _answered(self, lk: _Lookup, p: int) -> None:
        lk.pending -= 1
        if not self.online[p]:  # left while the query was in flight
            return self._failed(lk, p, counted=True)
        lk.answered.add(p)
        if lk.key is not None:
            now = self.events.now
            store = self.stores.get(p, {}).get(lk.key, {})
            cap = self.provider_cap
            if cap is not None and len(store) > cap:  # a random share of them: O(cap), not O(providers)
                for provider in self.rng.sample(list(store), cap):
                    exp, rec = store[provider]
                    if exp > now:
                        lk.records[provider] = rec
            else:
                for provider, (exp, rec) in store.items():
                    if exp > now:
                        lk.records[provider] = rec
        known = lk.known
        depth = lk.depth[p] + 1
        for q in self.closest(p, lk.target, self.cfg.k):
            if q not in known and q != lk.start:
                lk.best.append((self.ids[q] ^ lk.target, q))
                known.add(q)
                lk.depth[q] = depth
        lk.best.sort()
        for _, q in lk.best[self.cfg.k * 2 :]:
            known.discard(q)
        del lk.best[self.cfg.k * 2 :]
        self._step(lk)

    def _failed(self, lk: _Lookup, p: int, counted: bool = False) -> None:
        if not counted:
            lk.pending -= 1
        lk.best = [(d, q) for d, q in lk.best if q != p]
        lk.known.discard(p)
        self._step(lk)

    # ---- records ------------------------------------------------------------------------

    def publish(self, node: int, key: int, record: Any, expires_at: float, done: Callable[[int], None]) -> None:
        """Store ``record`` under ``key`` at the k closest peers found (one STORE each)."""

        def stored(res: LookupResult) -> None:
            targets = res.closest[: self.cfg.k]
            for p in targets:
                self.events.after(self.latency.pair_rtt(node, p) / 2, self._store, p, key, node, expires_at, record)
            done(len(targets))

        self.lookup(node, key, stored)

    def _store(self, p: int, key: int, provider: int, expires_at: float, record: Any) -> None:
        if self.online[p]:
            self.stores.setdefault(p, {}).setdefault(key, {})[provider] = (expires_at, record)
