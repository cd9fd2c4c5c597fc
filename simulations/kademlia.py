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


@dataclass
class _Table:
    """A peer's routing table: when built, bucket -> its contacts in the order they were
    drawn, and the non-empty buckets in ascending order."""

    built: float
    buckets: dict[int, list[int]]
    order: list[int]


@dataclass
class _Providers:
    """The provider records one peer stores under one key; ``order`` lists the providers as
    first stored (the dict's own order), so a random share is drawn without copying them all."""

    records: dict[int, tuple[float, Any]] = field(default_factory=dict)  # provider -> (expires, record)
    order: list[int] = field(default_factory=list)


class Kademlia:
    def __init__(self, n: int, cfg: Dht, rng: random.Random, latency: Latency, events: EventQueue,
                 online: list[bool]) -> None:  # fmt: skip
        self.cfg = cfg
        self.rng = rng
        self.latency = latency
        self.events = events
        self.online = online
        self.ids = [rng.getrandbits(cfg.id_bits) for _ in range(n)]
        self._tables: dict[int, _Table] = {}
        pairs = sorted((self.ids[p], p) for p in range(n) if online[p])
        self._ids_sorted = [i for i, _ in pairs]  # the online peers, by id (kept up to date)
        self._peers_sorted = [p for _, p in pairs]
        self.stores: dict[int, dict[int, _Providers]] = {}  # node -> key -> the providers it stores
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
        t = self._table(node)
        return [p for b in t.order for p in t.buckets[b]]

    def _table(self, node: int) -> _Table:
        held = self._tables.get(node)
        if held is not None and self.events.now - held.built < self.cfg.refresh_s:
            return held
        ids, peers = self._ids_sorted, self._peers_sorted
        me, k, buckets = self.ids[node], self.cfg.k, {}
        for b in range(self._lowest_bucket(me), self.cfg.id_bits):
            base = ((me >> (b + 1)) << (b + 1)) | ((((me >> b) & 1) ^ 1) << b)
            lo, hi = bisect.bisect_left(ids, base), bisect.bisect_left(ids, base + (1 << b))
            if hi - lo <= k:
                if hi > lo:
                    buckets[b] = peers[lo:hi]
            else:
                buckets[b] = [peers[i] for i in self.rng.sample(range(lo, hi), k)]
        table = self._tables[node] = _Table(self.events.now, buckets, sorted(buckets))
        return table

    def _lowest_bucket(self, me: int) -> int:
        """No bucket below this one holds a peer: the closest peer by XOR is a neighbour of
        ``me`` in id order, and it decides the lowest bucket (the scan starts there, with the
        same draws as from bucket 0)."""
        ids = self._ids_sorted
        i = bisect.bisect_left(ids, me)
        near = [ids[j] for j in (i - 1, i, i + 1) if 0 <= j < len(ids) and ids[j] != me]
        return min(((me ^ x).bit_length() - 1 for x in near), default=self.cfg.id_bits)

    def forget(self, node: int) -> None:
        """A node restarts: empty table and store."""
        self._tables.pop(node, None)
        self.stores.pop(node, None)

    def closest(self, node: int, target: int, n: int) -> list[int]:
        """The ``n`` contacts of ``node``'s table closest to ``target``, closest first.

        XOR distance orders whole buckets: with b* the highest bit where ``node`` and
        ``target`` differ, bucket b*'s contacts are closer than any other's, then those of
        all buckets below b* (one range of distances), then buckets b*+1, b*+2, ... So only
        the buckets that fill the answer are sorted (distinct ids: the order is unique)."""
        table, ids = self._table(node), self.ids
        buckets, order = table.buckets, table.order
        top = (ids[node] ^ target).bit_length() - 1  # -1: the target is the node itself

        def by_distance(group: list[int]) -> list[int]:
            return sorted(group, key=lambda p: ids[p] ^ target)

        out: list[int] = []
        at = bisect.bisect_left(order, top)  # order[at:] are the buckets from b* up
        if at < len(order) and order[at] == top:
            out = by_distance(buckets[top])
            at += 1
        if len(out) < n and order and order[0] < top:
            out += by_distance([p for b in order if b < top for p in buckets[b]])
        for b in order[at:]:
            if len(out) >= n:
                break
            out += by_distance(buckets[b])
        return out[:n]

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
            held = self.stores.get(p, {}).get(lk.key)
            if held is not None:
                store, cap = held.records, self.provider_cap
                if cap is not None and len(store) > cap:  # a random share of them: O(cap), not O(providers)
                    for provider in self.rng.sample(held.order, cap):
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
            held = self.stores.setdefault(p, {}).get(key)
            if held is None:
                held = self.stores[p][key] = _Providers()
            if provider not in held.records:
                held.order.append(provider)
            held.records[provider] = (expires_at, record)
