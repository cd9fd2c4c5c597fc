"""Client-side choice of a worker for a job (pure; randomness passed in).

The COCOON proxy rule: among the workers that serve the model at no more than
the client's price cap, prefer the one with the least expected wait, i.e. the
lowest (jobs running + 1) x average job time. A client does not see other
clients' jobs except through gossiped load, so many clients applying the rule
to the same view would all pick the same worker; *power of two choices* breaks
the herd: sample two eligible workers and take the better of those. The sample
is drawn in proportion to each worker's learned speed, so slow GPUs are asked
less often (simulations/EXPERIMENTS.md, experiment (a), compares the rule with
random choice and central oracles).

The router learns from its own jobs: running count and an exponentially
weighted average of each worker's compute time per job (reported in its
results). A worker that refused or failed is avoided for a short cool-down; one
that let a job run into its deadline, for longer, doubling with each timeout in a
row until it brings a result again: a worker that swallows jobs (accepts the
stream, never answers) costs each client one job's timeout now and then, not every
job (issue 15).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.overlay.directory import WorkerOffer

DEFAULT_JOB_S = 0.05  # assumed job time for a worker we have no figures for
EWMA_ALPHA = 0.2
COOLDOWN_S = 5.0
TIMEOUT_COOLDOWN_S = 30.0  # after a job's deadline ran out on a worker; doubles per timeout in a row
MAX_TIMEOUT_COOLDOWN_S = 600.0
# Above this many offers the sample is drawn by rejection, looking at a few offers rather than
# weighing them all (4.5 ms a job at 3,000 workers); same odds, other random numbers.
DRAW_ABOVE = 100
MAX_DRAWS = 64  # per sampled worker, before falling back to weighing them all


@dataclass
class WorkerEstimate:
    """What one client has learnt of one worker from its own jobs: the figures of its choice."""

    running: int = 0
    avg_job_s: float = DEFAULT_JOB_S
    jobs_ok: int = 0
    jobs_failed: int = 0
    avoid_until: float = 0.0
    timeouts: int = 0  # jobs in a row whose deadline ran out there (0 after any result)


class Router:
    """Chooses workers and keeps the per-worker figures the choice needs."""

    def __init__(self, *, rng: random.Random, choices: int = 2) -> None:
        if choices < 1:
            raise ConfigError(f"a router samples at least one worker, not {choices}")
        self.rng = rng
        self.choices = choices
        self.estimates: dict[bytes, WorkerEstimate] = {}
        self._weight_bound = 1.0 / DEFAULT_JOB_S  # no worker's sampling weight is above this

    def cost(self, offer: WorkerOffer) -> float:
        """Expected wait for one more job on this worker, in seconds."""
        s = self.estimates.get(offer.peer_id)
        running, avg_job_s = (s.running, s.avg_job_s) if s is not None else (0, DEFAULT_JOB_S)
        if offer.running_jobs is not None:  # gossiped load includes other clients' jobs
            running = max(running, offer.running_jobs)
        return (running + 1) * avg_job_s

    def eligible(
        self, offers: Iterable[WorkerOffer], *, max_price: int, now: float, exclude: frozenset[bytes] = frozenset()
    ) -> list[WorkerOffer]:
        """The offers at most ``max_price``, not excluded and not cooling down, in order."""
        out = []
        for o in offers:
            s = self.estimates.get(o.peer_id)
            if o.price.highest > max_price or o.peer_id in exclude:
                continue
            if s is not None and s.avoid_until > now:
                continue
            out.append(o)
        return out

    def choose(
        self, offers: Iterable[WorkerOffer], *, max_price: int, now: float, exclude: frozenset[bytes] = frozenset()
    ) -> WorkerOffer | None:
        """The worker for the next job, or None when no offer is eligible."""
        if isinstance(offers, Sequence) and len(offers) > DRAW_ABOVE:
            drawn = self._draw(offers, max_price=max_price, now=now, exclude=exclude)
            if drawn is not None:
                return min(drawn, key=lambda o: (self.cost(o), o.price.highest))
        pool = self.eligible(offers, max_price=max_price, now=now, exclude=exclude)
        if not pool:
            # Every worker is cooling down: better a recently failed one than none.
            pool = [o for o in offers if o.price.highest <= max_price and o.peer_id not in exclude]
            if not pool:
                return None
        if len(pool) == 1:  # nothing to choose from (a client's usual case: one worker it knows)
            return pool[0]
        sample = self._sample(pool)
        return min(sample, key=lambda o: (self.cost(o), o.price.highest))

    def _sample(self, pool: list[WorkerOffer]) -> list[WorkerOffer]:
        """``choices`` distinct workers, each drawn with odds in proportion to its learned speed
        (1 / job time): a slow GPU is asked less often, never starved (random order breaks ties)."""
        if len(pool) <= self.choices:
            return self.rng.sample(pool, len(pool))
        pool = list(pool)
        known = self.estimates
        weights = [1.0 / (known[o.peer_id].avg_job_s if o.peer_id in known else DEFAULT_JOB_S) for o in pool]
        picked: list[WorkerOffer] = []
        for _ in range(self.choices):
            i = self.rng.choices(range(len(pool)), weights=weights)[0]
            picked.append(pool.pop(i))
            weights.pop(i)
        return picked

    def _draw(
        self, offers: Sequence[WorkerOffer], *, max_price: int, now: float, exclude: frozenset[bytes]
    ) -> list[WorkerOffer] | None:
        """:meth:`_sample`'s odds over the eligible offers, by rejection: an offer drawn
        uniformly is kept if eligible, with probability its weight over a bound on every
        weight. None when ``MAX_DRAWS`` draws did not find one (few eligible): weigh them all."""
        picked: list[WorkerOffer] = []
        seen: set[bytes] = set()
        known, rng, n = self.estimates, self.rng, len(offers)
        for _ in range(self.choices):
            for _ in range(MAX_DRAWS):
                o = offers[rng.randrange(n)]
                if o.peer_id in seen or o.price.highest > max_price or o.peer_id in exclude:
                    continue
                s = known.get(o.peer_id)
                if s is not None and s.avoid_until > now:
                    continue
                if rng.random() * self._weight_bound > 1.0 / (s.avg_job_s if s is not None else DEFAULT_JOB_S):
                    continue
                seen.add(o.peer_id)
                picked.append(o)
                break
            else:
                return None
        return picked

    # ---- feedback from the client's own jobs -------------------------------------

    def _estimate_of(self, peer_id: bytes) -> WorkerEstimate:
        s = self.estimates.get(peer_id)
        if s is None:  # not setdefault(peer_id, WorkerEstimate()): that builds one on every job
            s = self.estimates[peer_id] = WorkerEstimate()
        return s

    def started(self, peer_id: bytes) -> None:
        """A job was sent to ``peer_id``."""
        self._estimate_of(peer_id).running += 1

    def finished(self, peer_id: bytes, elapsed_s: float, *, service_s: float | None = None) -> None:
        """A job ended well after ``elapsed_s``; ``service_s``: the worker's own compute time
        for it (JobResult.compute_us), which is what one more job in its queue costs. Without
        it the elapsed time stands in, queueing included, and a busy fast worker looks slow."""
        s = self._estimate_of(peer_id)
        s.running = max(0, s.running - 1)
        s.jobs_ok += 1
        s.timeouts = 0
        sample = service_s if service_s is not None and service_s > 0 else elapsed_s
        s.avg_job_s += EWMA_ALPHA * (sample - s.avg_job_s)
        if s.avg_job_s > 0:
            self._weight_bound = max(self._weight_bound, 1.0 / s.avg_job_s)

    def failed(self, peer_id: bytes, now: float, *, cooldown_s: float = COOLDOWN_S) -> None:
        """A job on ``peer_id`` ended without a result: avoid it for ``cooldown_s``."""
        s = self._estimate_of(peer_id)
        s.running = max(0, s.running - 1)
        s.jobs_failed += 1
        s.avoid_until = now + cooldown_s

    def timed_out(self, peer_id: bytes, now: float) -> float:
        """A job's deadline ran out while ``peer_id`` had it: avoid it for
        TIMEOUT_COOLDOWN_S, doubled for each timeout in a row (at most
        MAX_TIMEOUT_COOLDOWN_S). The cool-down, in seconds."""
        s = self._estimate_of(peer_id)
        s.timeouts += 1
        cooldown = min(MAX_TIMEOUT_COOLDOWN_S, TIMEOUT_COOLDOWN_S * float(1 << min(s.timeouts - 1, 16)))
        self.failed(peer_id, now, cooldown_s=cooldown)
        return cooldown
