"""TEE attestation in the model (issue 17): attested workers, requiring clients, evidence asks.

What the node does, modelled: a client that requires attestation routes only among workers
whose offers carry an attestation claim (the offers are filtered first, then the library's own
:class:`~cocoon_p2p.jobs.routing.Router` chooses among what is left); when the filter leaves
nothing the job fails with :data:`NO_ATTESTED_WORKERS`. Before its first job to a worker the
client asks for the evidence (one request/response round trip on their link, the evidence's
bytes on the way back, losses as for any message) and verifies it (``tee.verify_ms``); the
verdict then stands for ``tee.verdict_ttl_s``. Jobs for a worker whose evidence is still on
its way wait for that ask instead of asking again. Clients that do not require attestation
neither filter nor ask.

Not modelled: refused evidence (a stale TCB or another image; to the router such a worker is
one without a claim), fetching Intel's collateral (the client's cache is warm), and the
worker's cost of making a quote (once at start, off the job path).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cocoon_p2p.overlay.directory import WorkerOffer

from .scenario import Tee

if TYPE_CHECKING:
    from .world import SimClient, SimWorker, World

NO_ATTESTED_WORKERS = "no-attested-workers"  # the job failure code the node uses for the same case
ASK_BYTES = 200  # the evidence request: a fresh stream, a nonce and framing


def assign_roles(tee: Tee, seed: int, workers: list[SimWorker], clients: list[SimClient]) -> None:
    """Mark ``round(share x n)`` workers attested and clients requiring.

    Drawn from a random stream of their own, so a scenario without TEE runs exactly
    as before it existed, and a larger share attests a superset of a smaller one
    (a sweep over the share changes one thing at a time)."""
    rng = random.Random(f"cocoon-sim/tee/{seed}")
    order = list(range(len(workers)))
    rng.shuffle(order)
    for i in order[: round(tee.attested_share * len(workers))]:
        workers[i].attested = True
    order = list(range(len(clients)))
    rng.shuffle(order)
    for i in order[: round(tee.require_share * len(clients))]:
        clients[i].requires_tee = True


@dataclass
class Verdict:
    """A client's judgement of one worker's evidence."""

    ready_at: float  # when the client has checked it (jobs to that worker wait until then)
    expires_at: float


class Attestation:
    """Every client's evidence asks and cached verdicts, over the shared world."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.verdicts: dict[tuple[int, int], Verdict] = {}  # (client idx, worker idx) -> verdict
        self.asks: dict[tuple[int, int], list[float]] = {}  # (client idx, worker idx) -> when it asked
        self.ask_s: list[float] = []  # each ask's cost to the job that waited for it: ask, evidence, check

    def gate(self, c: SimClient, offers: list[WorkerOffer]) -> list[WorkerOffer]:
        """The offers ``c`` may route among: the attested ones if it requires attestation, else all."""
        if not c.requires_tee:
            return offers
        by_peer = self.world.by_peer
        return [o for o in offers if by_peer[o.peer_id].attested]

    def ready_at(self, c: SimClient, w: SimWorker) -> float:
        """When ``c`` may send a job to ``w``: now if it needs no verdict or holds a fresh
        one; after the pending ask if one is in flight; else after a new ask (counted)."""
        world = self.world
        now = world.events.now
        if not c.requires_tee:
            return now
        key = (c.idx, w.idx)
        held = self.verdicts.get(key)
        if held is not None and now < held.expires_at:
            return max(now, held.ready_at)
        self.asks.setdefault(key, []).append(now)
        tee, lat = world.sc.tee, world.latency
        ready = now + lat.one_way(c.idx, w.idx, ASK_BYTES)
        ready += lat.one_way(w.idx, c.idx, int(tee.evidence_kb * 1000)) + tee.verify_ms / 1000
        self.ask_s.append(ready - now)
        if world.online[w.idx]:  # a departed worker sends no evidence: the job finds it gone, nothing is cached
            self.verdicts[key] = Verdict(ready, ready + tee.verdict_ttl_s)
        return ready

    @property
    def ask_count(self) -> int:
        """Evidence asks in the whole run."""
        return len(self.ask_s)
