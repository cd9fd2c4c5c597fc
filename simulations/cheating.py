"""Wrong results in the model (issue 18): cheating workers, the clients' spot checks, bans and fraud proofs.

What the node does, modelled: a cheating worker (``cheat.share`` of the workers) returns a
wrong result on a share ``cheat.rate`` of its jobs, spot-check runs included (a re-run looks
like any job; a verify job it answers with the cheapest lie, the claimed tokens echoed).
After a result arrives, and before it is paid, the client draws whether to check it with the
library's own :class:`~cocoon_p2p.jobs.spotcheck.SpotChecker` (``cheat.check_rate``, drawn
after the fact, so a worker cannot tell). Each run of a check goes to a worker picked at
random among the client's other offers, is queued and served there like any job, at
``cheat.verify_cost`` of the job's compute, and is paid like any job. Who is found wrong is
decided by :func:`.spotchecks.decide`: a re-run with a tie-breaker (``verify_cost`` 1, tensors)
or a verify job confirmed by a second verifier (``verify_cost`` < 1, generation).

A worker found wrong is not paid for that run, is banned by that client (never routed to or
checked with again), its channel with that client is closed, and a fraud proof goes out over
the gossip mesh: every client that acts on proofs (``cheat.proof_trust_share``) bans it when
the proof reaches it (the mesh's shortest path from the reporter; a client offline then misses
it, as gossipsub replays nothing). Unchecked results are paid. A check of a right result finds
it wrong with chance ``cheat.honest_false_alarm`` (float noise beyond the tolerance).

Not modelled: a lie's compute (a wrong result takes as long as a right one, so a cheater does not
look faster to the router), proofs judged by re-running (nodes that cannot re-run and do not
trust the reporter ignore them: ``1 - proof_trust_share``), refuted proofs and the reporter's
penalty, collusion (two cheaters never return the same wrong result), and bans lifted later.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.jobs.spotcheck import SpotChecker, SpotCheckPolicy
from cocoon_p2p.overlay.directory import WorkerOffer

from .scenario import Cheat
from .spotchecks import Check, Flow, Run, Verdict, decide

if TYPE_CHECKING:
    from .settling import Settlement
    from .world import Attempt, SimClient, SimJob, SimWorker, World


def assign_roles(cheat: Cheat, seed: int, workers: list[SimWorker], clients: list[SimClient]) -> None:
    """Mark ``round(share x workers)`` workers cheating (among those with no other adversarial
    behaviour) and ``round(proof_trust_share x clients)`` clients acting on fraud proofs.

    Drawn from a random stream of their own, so a scenario without cheating runs exactly as
    before, and a larger share cheats with a superset of a smaller one's workers."""
    rng = random.Random(f"cocoon-sim/cheat/{seed}")
    order = list(range(len(workers)))
    rng.shuffle(order)
    eligible = [i for i in order if workers[i].behaviour == "honest"]
    for i in eligible[: round(cheat.share * len(workers))]:
        workers[i].cheats = True
    order = list(range(len(clients)))
    rng.shuffle(order)
    for i in order[: round(cheat.proof_trust_share * len(clients))]:
        clients[i].trusts_proofs = True


class CheckRunner(Protocol):
    """What the checks need from the job flow (:class:`~.jobflow.JobFlow`)."""

    def offers(self, c: SimClient) -> list[WorkerOffer]: ...

    def run_check(self, check: Check, w: SimWorker) -> None: ...

    def complete(self, job: SimJob, w: SimWorker, cost: int, *, pay: bool, verdict: Verdict, wrong: bool) -> None: ...


@dataclass
class Tally:
    """Counts over the run (the summary's ``cheat`` block)."""

    jobs_by_cheaters: int = 0  # callers' jobs a cheater returned a result for
    wrong_results: int = 0  # ... of which wrong
    wrong_delivered: int = 0  # wrong results the caller took as right (unchecked, skipped, or passed)
    wrong_caught: int = 0  # wrong results of callers' jobs found wrong
    lies_in_checks: int = 0  # check runs answered wrongly
    lying_checkers_caught: int = 0  # ... found wrong
    false_alarms: int = 0  # right results found wrong by noise (cheat.honest_false_alarm)
    honest_condemned_by_lies: int = 0  # right results found wrong because a cheater lied in the check
    paid_to_cheaters: int = 0
    paid_for_wrong: int = 0  # for callers' wrong results (unchecked, or not caught)
    paid_for_lying_checks: int = 0  # for check runs that lied (a verifier's echo, a skipped re-run)
    paid_for_checks: int = 0
    checks: int = 0
    check_runs: int = 0  # references, verifiers, tie-breakers and second verifiers asked
    checks_skipped: int = 0
    checks_found_wrong: int = 0  # checks that found the caller's result wrong
    proofs: int = 0
    job_compute_s: float = 0.0  # compute of callers' jobs (every worker)
    check_compute_s: float = 0.0  # compute of check runs


class Cheating:
    """Cheaters' answers, every client's checks and bans, and the proofs between clients."""

    def __init__(self, world: World, settlement: Settlement) -> None:
        self.world = world
        self.settlement = settlement
        self.cfg = world.sc.cheat
        self.in_use = self.cfg.in_use
        self.flow = Flow.VERIFY if self.cfg.verify_cost < 1 else Flow.RERUN
        seed = world.sc.seed
        self.rng = random.Random(f"cocoon-sim/cheat/{seed}/draws")  # lies and false alarms
        policy = SpotCheckPolicy(rate=self.cfg.check_rate)
        self.checkers = {  # the library's draw, one seeded stream per client (it also picks the check's worker)
            c.idx: SpotChecker(policy, random.Random(f"cocoon-sim/cheat/{seed}/client/{c.idx}"))
            for c in (world.clients if self.in_use else [])
        }
        self.tally = Tally()
        self.served: dict[int, int] = {}  # cheater idx -> callers' jobs it returned a result for
        self.first_lie: dict[int, int] = {}  # cheater idx -> its first wrong caller's result: the how-many-th job
        self.detected: dict[int, tuple[int, float]] = {}  # cheater idx -> (its jobs until then, when)
        self.bans: dict[int, dict[int, float]] = {}  # worker idx -> client idx -> when it banned it
        self._wrong_ids = itertools.count(1)
        self._jobs: CheckRunner | None = None

    def bind(self, jobs: CheckRunner) -> None:
        """The job flow that runs the checks (it is built after this object)."""
        self._jobs = jobs

    @property
    def jobs(self) -> CheckRunner:
        assert self._jobs is not None, "bind() the job flow first"
        return self._jobs

    # ---- at the worker ------------------------------------------------------------------------

    def answer(self, w: SimWorker) -> int:
        """What ``w`` returns for the run it just served: 0 (the right result) or a new wrong one."""
        if w.cheats and self.rng.random() < self.cfg.rate:
            return next(self._wrong_ids)
        return 0

    def compute_s(self, att: Attempt, t: float) -> float:
        """The compute ``att`` takes on its worker: a check run costs ``verify_cost`` of the job's."""
        if not self.in_use:
            return t
        if att.job.check is not None:
            t *= self.cfg.verify_cost
            self.tally.check_compute_s += t
        else:
            self.tally.job_compute_s += t
        return t

    # ---- at the client --------------------------------------------------------------------------

    def unbanned(self, c: SimClient, offers: list[WorkerOffer]) -> list[WorkerOffer]:
        """``offers`` without the workers ``c`` has banned."""
        if not c.banned:
            return offers
        return [o for o in offers if o.peer_id not in c.banned]

    def result(self, att: Attempt, cost: int) -> bool:
        """A caller's result arrived from ``att`` (its price and charge right). False: not drawn
        for a check, the caller pays and takes it now; True: a check holds it and ends the job."""
        if not self.in_use:
            return False
        w, c, t = att.worker, att.job.client, self.tally
        lie = att.answer != 0
        nth = 0
        if w.cheats:
            nth = self.served[w.idx] = self.served.get(w.idx, 0) + 1
            t.jobs_by_cheaters += 1
            t.wrong_results += lie
            if lie:
                self.first_lie.setdefault(w.idx, nth)
        first = Run(w, att.answer, cost, lie, nth)
        if not self.checkers[c.idx].chosen():
            self._account(first, check_run=False)
            t.wrong_delivered += lie
            return False
        t.checks += 1
        check = Check(att.job, first, {w.ident.peer_id})
        if not lie and self.cfg.honest_false_alarm > 0 and self.rng.random() < self.cfg.honest_false_alarm:
            first.answer, check.noise = next(self._wrong_ids), True
        att.job.held = True
        self._next_run(check)
        return True

    def run_answered(self, att: Attempt, cost: int) -> None:
        """A check run's result reached its client."""
        assert att.job.check is not None
        lie = att.answer != 0
        self.tally.lies_in_checks += lie
        self._step(att.job.check, Run(att.worker, att.answer, cost, lie))

    def run_failed(self, check: Check) -> None:
        """A run of ``check`` did not run (busy, lost, a wrong bill, its deadline): as if there were no worker."""
        self._step(check, None)

    def _next_run(self, check: Check) -> None:
        """Ask one more worker, at random among the client's other offers in its price (as
        ``ResultChecks._run_elsewhere``); none left: the step goes on without it."""
        c = check.job.client
        cap = c.group.max_price_nanoton
        others = [o for o in self.jobs.offers(c) if o.peer_id not in check.exclude and o.price_nanoton <= cap]
        if not others:
            return self._step(check, None)
        w = self.world.by_peer[self.checkers[c.idx].rng.choice(others).peer_id]
        check.exclude.add(w.ident.peer_id)
        self.tally.check_runs += 1
        self.jobs.run_check(check, w)

    def _step(self, check: Check, run: Run | None) -> None:
        if check.job.done:  # the caller left meanwhile: nothing more is judged or paid
            return
        decided = decide(self.flow, check, run)
        if decided is None:
            assert run is not None
            check.runs.append(run)
            return self._next_run(check)
        for r in decided.pay:
            self._pay(check, r)
        self._end(check, decided.verdict, wrong=decided.wrong, keep=decided.keep)

    def _pay(self, check: Check, run: Run) -> None:
        """A check run found right, or needed to judge, is paid like any job."""
        self.settlement.pay(check.job.client, run.worker, run.cost)
        self._account(run, check_run=True)

    def _account(self, run: Run, *, check_run: bool) -> None:
        t = self.tally
        if run.lie and check_run:
            t.paid_for_lying_checks += run.cost
        elif run.lie:
            t.paid_for_wrong += run.cost
        if run.worker.cheats:
            t.paid_to_cheaters += run.cost
        if check_run:
            t.paid_for_checks += run.cost

    def _end(self, check: Check, verdict: Verdict, *, wrong: Run | None = None, keep: Run | None = None) -> None:
        """The check is over: condemn ``wrong``; the caller gets ``keep``'s result (the first's
        by default), paid here unless it is the wrong one or a check run (paid already)."""
        first, t = check.first, self.tally
        keep = keep or first
        if wrong is not None:
            self._condemn(check, wrong)
        t.checks_skipped += verdict is Verdict.SKIPPED
        t.checks_found_wrong += wrong is first
        pay = keep is first and wrong is not first
        if pay:
            self._account(first, check_run=False)
        delivered_wrong = pay and first.lie
        t.wrong_delivered += delivered_wrong
        cost = first.cost if pay else (0 if keep is first else keep.cost)
        self.jobs.complete(check.job, keep.worker, cost, pay=pay, verdict=verdict, wrong=delivered_wrong)

    # ---- bans and proofs ------------------------------------------------------------------------

    def _condemn(self, check: Check, run: Run) -> None:
        """``run``'s worker was found wrong by the checking client: it bans it, closes their
        channel and gossips a fraud proof."""
        world, t, now = self.world, self.tally, self.world.events.now
        c, w = check.job.client, run.worker
        if run.lie:
            if run is check.first:
                t.wrong_caught += 1
            else:
                t.lying_checkers_caught += 1
        elif run is check.first and check.noise:
            t.false_alarms += 1
        else:
            t.honest_condemned_by_lies += 1
        if w.cheats and w.idx not in self.detected:
            self.detected[w.idx] = (run.nth or self.served.get(w.idx, 0), now)
        self._ban(c, w, now)
        if w.idx in c.channels:  # settled: what it earned so far is paid out, nothing more goes there
            self.settlement.close(c, w, cooperative=world.online[w.idx])
        t.proofs += 1
        trusting = [d for d in world.clients if d.trusts_proofs and d is not c and world.online[d.idx]]
        if trusting:
            delays = world.mesh.delays_from([c.idx], now)[c.idx]
            for d in trusting:
                if math.isfinite(delays[d.idx]):
                    world.events.at(now + float(delays[d.idx]), self._proof_arrived, d, w)

    def _proof_arrived(self, d: SimClient, w: SimWorker) -> None:
        if self.world.online[d.idx]:  # a client that left meanwhile never hears it
            self._ban(d, w, self.world.events.now)

    def _ban(self, c: SimClient, w: SimWorker, now: float) -> None:
        if w.ident.peer_id not in c.banned:
            c.banned.add(w.ident.peer_id)
            self.bans.setdefault(w.idx, {})[c.idx] = now

    # ---- figures ----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The run's figures on wrong results, checks and bans (None where there is nothing to measure)."""
        world, t = self.world, self.tally
        cheaters = [w for w in world.workers if w.cheats]
        until = [self.detected[w.idx][0] if w.idx in self.detected else math.inf for w in cheaters]
        # Jobs each cheater served while it could still be caught: until caught, or to the end.
        exposure = sum(self.detected[w.idx][0] if w.idx in self.detected else self.served.get(w.idx, 0)
                       for w in cheaters)  # fmt: skip
        hazard = len(self.detected) / exposure if exposure else None
        must = {d.idx for d in world.clients if d.trusts_proofs}
        ban_s: list[float] = []
        incomplete = 0
        for w in cheaters:
            if w.idx not in self.detected or not must:
                continue
            bans = self.bans.get(w.idx, {})
            if must <= set(bans):
                ban_s.append(max(0.0, max(bans[i] for i in must) - self.detected[w.idx][1]))
            else:
                incomplete += 1
        paid = self.settlement.paid_total
        return {
            "cheaters": len(cheaters),
            "cheaters_detected": len(self.detected),
            "cheaters_never_detected": len(cheaters) - len(self.detected),
            "jobs_by_cheaters": t.jobs_by_cheaters,
            "wrong_results": t.wrong_results,
            "wrong_delivered": t.wrong_delivered,
            "wrong_caught": t.wrong_caught,
            "lies_in_checks": t.lies_in_checks,
            "lying_checkers_caught": t.lying_checkers_caught,
            "paid_total_nanoton": paid,
            "paid_to_cheaters_nanoton": t.paid_to_cheaters,
            "paid_for_wrong_nanoton": t.paid_for_wrong,
            "paid_for_checks_nanoton": t.paid_for_checks,
            "paid_for_lying_checks_nanoton": t.paid_for_lying_checks,
            "wrong_paid_share": t.paid_for_wrong / paid if paid else None,
            "jobs_to_detection": [None if math.isinf(n) else n for n in until],  # per cheater (None: never)
            "cheater_jobs": [self.served.get(w.idx, 0) for w in cheaters],  # per cheater, by the end
            "jobs_to_detection_p50": _finite(percentile(until, 50)),
            "jobs_to_detection_p90": _finite(percentile(until, 90)),
            "jobs_by_undetected_min": min(
                (self.served.get(w.idx, 0) for w in cheaters if w.idx not in self.detected), default=None
            ),
            "detection_per_job": hazard,  # detections / cheaters' jobs until detected (or the end)
            "detection_exposure_jobs": exposure,
            "clients_trusting_proofs": len(must),
            "network_ban_s_p50": _finite(percentile(ban_s, 50)),
            "network_ban_s_max": max(ban_s, default=None),
            "network_bans_incomplete": incomplete,
            "checks": t.checks,
            "check_runs": t.check_runs,
            "checks_skipped": t.checks_skipped,
            "checks_found_wrong": t.checks_found_wrong,
            "added_compute_share": t.check_compute_s / t.job_compute_s if t.job_compute_s else None,
            "false_alarms": t.false_alarms,
            "honest_condemned_by_lies": t.honest_condemned_by_lies,
            "proofs": t.proofs,
            "flow": self.flow.value,
        }


def _finite(v: float) -> float | None:
    return None if math.isnan(v) or math.isinf(v) else v
