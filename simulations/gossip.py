"""The gossipsub mesh: D-regular-ish, repaired at heartbeats, and how fast a message spreads.

Each online peer keeps between D_lo and D_hi mesh links (grafting up to D at a
heartbeat when below D_lo, never accepting links beyond D_hi). A message is
forwarded to the mesh on first receipt, so its arrival time at each peer is the
shortest path over mesh links (link latency plus a per-hop validation delay).
Those delays are computed for every announcing peer at once (scipy's Dijkstra,
in C) and kept for an epoch; joins and leaves start a new epoch lazily.
Lazy gossip (IHAVE/IWANT) and flood-publishing are not modelled: they only add
paths, so the model's spread is an upper bound on delay.

The sparse graph is rebuilt only when links changed since it was last built. In a
large network (the sampled view, :mod:`.views`) a Dijkstra from every announcing
peer each epoch is out of reach (~0.1 s each at 100,000 peers): :meth:`Mesh.delay`
answers from ``sources`` exact rows computed from random online peers each epoch,
a publisher taking the row of its proxy (``publisher % sources``). Every receiver
keeps its own exact distances from those proxies, so the spread of delays, and a
far peer's lateness, are kept; what a publisher's own position adds is not.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from .latency import Latency
from .scenario import Gossip


class Mesh:
    def __init__(self, n: int, cfg: Gossip, rng: random.Random, latency: Latency, online: list[bool]) -> None:
        self.n = n
        self.cfg = cfg
        self.rng = rng
        self.latency = latency
        self.online = online
        self.adj: list[dict[int, float]] = [{} for _ in range(n)]  # neighbour -> one-way seconds
        self._delays: dict[int, np.ndarray] = {}  # source -> arrival delay at every peer (inf: never)
        self.epoch_started = 0.0
        self.epoch_s = cfg.epoch_s  # the sampled view's may be longer (Scale.epoch_s)
        self.dirty = True  # links changed since the delays were computed
        self.recomputes = 0
        self.version = 0  # bumped when the delays are recomputed
        self.links_version = 0  # bumped when a link is added or dropped
        self._graph: csr_matrix | None = None
        self._graph_version = -1
        self._graph_epoch = -1
        # The sampled view's Dijkstras within an epoch share the graph of its first one (a rebuild
        # is ~0.3 s at 100,000 peers); joins since still reach the cached rows through graft().
        self.graph_per_epoch = False
        self._proxies: list[int] = []  # the sampled view's sources this epoch (see delay())
        self._proxy_version = -1

    def build(self) -> None:
        order = [p for p in range(self.n) if self.online[p]]
        self.rng.shuffle(order)
        for p in order:
            self.graft(p)

    def graft(self, p: int) -> None:
        """Add mesh links until ``p`` has D (peers with D_hi links refuse)."""
        if not self.online[p]:
            return
        tries, before = 0, len(self.adj[p])
        while len(self.adj[p]) < self.cfg.D and tries < 8 * self.cfg.D:
            tries += 1
            q = self.rng.randrange(self.n)
            if q == p or q in self.adj[p] or not self.online[q] or len(self.adj[q]) >= self.cfg.D_hi:
                continue
            d = self.latency.pair_rtt(p, q) / 2 + self.cfg.hop_delay_ms / 1000
            self.adj[p][q] = self.adj[q][p] = d
        if len(self.adj[p]) != before:
            self.links_version += 1
        self.dirty = True
        self._delays.pop(p, None)  # a peer that just joined gets its own delays at once
        # ...and is reachable from the cached sources through its new links at once (exact for p; paths
        # *through* p to others wait for the next epoch, which only makes those delays an upper bound).
        links = self.adj[p]
        if links:
            for row in self._delays.values():
                row[p] = min(row[p], min(row[q] + d for q, d in links.items()))

    def heartbeat(self, p: int) -> None:
        if self.online[p] and len(self.adj[p]) < self.cfg.D_lo:
            self.graft(p)

    def leave(self, p: int) -> list[int]:
        """Drop ``p``'s links; returns the neighbours that lost one (they repair at a heartbeat)."""
        lost = list(self.adj[p])
        for q in lost:
            del self.adj[q][p]
        self.adj[p].clear()
        if lost:
            self.links_version += 1
        self.dirty = True
        return lost

    def degree_stats(self) -> tuple[float, int, int]:
        degs = [len(self.adj[p]) for p in range(self.n) if self.online[p]]
        return (sum(degs) / len(degs) if degs else 0.0), min(degs, default=0), max(degs, default=0)

    def delays_from(self, sources: list[int], now: float) -> dict[int, np.ndarray]:
        """Arrival delay (seconds) at every peer of a message published by each source
        (recomputed when links changed and an epoch has passed, or for a new source)."""
        self._roll(now)
        missing = [s for s in sources if s not in self._delays]
        if missing:
            dist = dijkstra(self.graph(), directed=True, indices=missing)
            for i, s in enumerate(missing):
                self._delays[s] = dist[i]
            self.recomputes += 1
        return {s: self._delays[s] for s in sources}

    def _roll(self, now: float) -> None:
        """A new epoch when links changed and the last one is over: cached delays go."""
        if self.dirty and now - self.epoch_started >= self.epoch_s:
            self._delays.clear()
            self.epoch_started, self.dirty = now, False
            self.version += 1

    def graph(self) -> csr_matrix:
        """The mesh as a sparse matrix of one-way delays (rebuilt only after links changed)."""
        if self._graph is None or (
            self._graph_version != self.links_version
            and not (self.graph_per_epoch and self._graph_epoch == self.version)
        ):
            degrees = np.fromiter((len(a) for a in self.adj), dtype=np.int64, count=self.n)
            indptr = np.zeros(self.n + 1, dtype=np.int64)
            np.cumsum(degrees, out=indptr[1:])
            total = int(indptr[-1])
            cols = np.fromiter(itertools.chain.from_iterable(self.adj), dtype=np.int64, count=total)
            vals = np.fromiter(itertools.chain.from_iterable(a.values() for a in self.adj), dtype=float, count=total)
            self._graph = csr_matrix((vals, cols, indptr), shape=(self.n, self.n))
            self._graph_version, self._graph_epoch = self.links_version, self.version
        return self._graph

    def delay(self, publisher: int, receiver: int, now: float, sources: int) -> float:
        """The sampled view's arrival delay at ``receiver`` of a message from ``publisher``:
        the exact delay from the publisher's proxy, one of ``sources`` online peers drawn
        each epoch (their rows follow joins as every cached row does)."""
        return float(self.proxy_row(publisher, now, sources)[receiver])

    def proxy_row(self, publisher: int, now: float, sources: int) -> np.ndarray:
        """The delays at every peer that :meth:`delay` gives ``publisher``'s messages."""
        self._roll(now)
        if self._proxy_version != self.version or not self._proxies:
            online = [p for p in range(self.n) if self.online[p]] or [0]
            pick = random.Random(self.version * 7919 + self.n)  # its own stream: grafting draws stay as they were
            self._proxies = pick.sample(online, min(sources, len(online)))
            self._proxy_version = self.version
            self.delays_from(self._proxies, now)  # all at once: one multi-source Dijkstra
        proxy = self._proxies[publisher % len(self._proxies)]
        row = self._delays.get(proxy)
        if row is None:
            row = self.delays_from([proxy], now)[proxy]
        return row

    def coverage(self, delays: np.ndarray, within: Sequence[float]) -> list[float]:
        """Share of online peers a message with arrival ``delays`` (a row of
        :meth:`delays_from` or :meth:`proxy_row`) reaches within each of ``within`` seconds."""
        online = np.fromiter(self.online, dtype=bool, count=self.n)
        alive = max(1, int(np.count_nonzero(online)))
        reach = delays[online]
        return [int(np.count_nonzero(reach <= t)) / alive for t in within]
