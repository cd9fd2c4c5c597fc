"""The latency model: lognormal round trips, bandwidth, loss (all from the scenario's seed)."""

from __future__ import annotations

import math
import random

from .scenario import Network


class Latency:
    def __init__(self, net: Network, rng: random.Random) -> None:
        self.net = net
        self.rng = rng
        self._pair: dict[tuple[int, int], float] = {}

    def rtt(self) -> float:
        """A fresh round-trip sample, seconds (a message between two arbitrary peers)."""
        return self.net.rtt_ms_median * math.exp(self.rng.gauss(0.0, self.net.rtt_sigma)) / 1000.0

    def pair_rtt(self, a: int, b: int) -> float:
        """The round trip of one link, fixed for the run (a connection's path)."""
        key = (a, b) if a < b else (b, a)
        v = self._pair.get(key)
        if v is None:
            v = self._pair[key] = self.rtt()
        return v

    def transfer(self, nbytes: int) -> float:
        return nbytes * 8 / (self.net.bandwidth_mbps * 1e6)

    def lost(self) -> bool:
        return self.net.loss > 0 and self.rng.random() < self.net.loss

    def one_way(self, a: int, b: int, nbytes: int = 0) -> float:
        """A message from a to b on their connection: half the link's RTT, the bytes, and a
        retransmission timeout for each loss (TCP recovers)."""
        t = self.pair_rtt(a, b) / 2 + self.transfer(nbytes)
        while self.lost():
            t += self.net.rto_s
        return t
