"""Jobs in the model: arrivals, the client's attempts, worker queues and the protocol's frames.

Each job runs the library's retry policy (:class:`~cocoon_p2p.jobs.attempts.JobAttempts`,
the object :meth:`JobClient.infer` drives) with the client's own :class:`Router`;
the frames between client and worker go through real :class:`JobConnection`
objects at both ends, and the client checks price and charge as the library
does. Workers are single FIFO servers that admit up to ``capacity`` jobs.
Spot checks (:mod:`.cheating`) hold an accepted result before it is paid; their
runs go through the same links, queues and frames as callers' jobs.
"""

from __future__ import annotations

from cocoon_p2p.core.errors import LocalProtocolError
from cocoon_p2p.jobs.attempts import JobAttempts
from cocoon_p2p.jobs.connection import JobConnection, Role
from cocoon_p2p.jobs.frames import (
    BUSY,
    DEADLINE,
    NO_WORKERS,
    PRICE,
    WORKER_LOST,
    JobAccepted,
    JobCancel,
    JobError,
    JobRequest,
    JobResult,
    charge_refusal,
    price_refusal,
)
from cocoon_p2p.overlay.directory import WorkerOffer

from .announcing import Announcing
from .cheating import Cheating
from .results import JobRecord
from .settling import Settlement
from .spotchecks import Check, Verdict
from .tee import NO_ATTESTED_WORKERS, Attestation
from .views import SampledView, with_reported_load
from .world import DEAD_DETECT_S, EPOCH_MS, Attempt, JobLink, SimClient, SimJob, SimWorker, World


class JobFlow:
    """Every job from its arrival at a client to its result, failure or deadline."""

    def __init__(
        self, world: World, announcing: Announcing, settlement: Settlement, attestation: Attestation, cheating: Cheating
    ) -> None:
        self.world = world
        self.announcing = announcing
        self.settlement = settlement
        self.attestation = attestation
        self.cheating = cheating
        cheating.bind(self)
        self.open_jobs: dict[SimJob, None] = {}  # insertion-ordered: runs must not depend on addresses
        self.open_by_client: dict[int, dict[SimJob, None]] = {}  # the same, per client (who leaves ends its own)
        self.view = SampledView(world, announcing) if world.sampled else None

    # ---- clients ------------------------------------------------------------------------------

    def arrival(self, c: SimClient, session: int) -> None:
        """A job arrives at ``c`` (Poisson arrivals while the client's session lasts)."""
        world = self.world
        if session != c.session:
            return
        world.events.after(world.rng.expovariate(c.group.rate_per_s), self.arrival, c, session)
        now = world.events.now
        rec = JobRecord(issued=now, client=c.idx, counted=now >= world.sc.warmup_s, tee=c.requires_tee)
        deadline = now + world.sc.routing.timeout_s
        attempts = JobAttempts(
            c.router, max_price=c.group.max_price_nanoton, max_attempts=world.sc.routing.attempts, deadline=deadline
        )
        job = SimJob(rec, c, deadline, attempts)
        self.open_jobs[job] = None
        self.open_by_client.setdefault(c.idx, {})[job] = None
        world.events.at(job.deadline, self._deadline, job)
        self._try(job)

    def _offers(self, c: SimClient) -> list[WorkerOffer]:
        if self.view is not None:  # every offer in view: the sampled view's scan
            return self.cheating.unbanned(c, self.view.full(c))
        self.announcing.deliver(c)
        return self.cheating.unbanned(c, c.directory.workers_for(c.model_id, now_ms=self.world.now_ms()))

    def offers(self, c: SimClient) -> list[WorkerOffer]:
        """The offers a spot check of ``c`` picks from: what it may route to (not banned; attested
        when it requires a TEE, as the node's check asks the TEE gate too)."""
        return self.attestation.gate(c, self._offers(c))

    def _try(self, job: SimJob) -> None:
        if job.done:
            return
        world = self.world
        c, now = job.client, world.events.now
        if (why := job.attempts.stop(now)) is not None:
            return self._fail(job, why)
        if self.view is not None and self._try_sampled(job):
            return
        offers = self._offers(c)
        if not offers and now - c.looked_up_at > 5.0:  # nothing heard yet: ask the DHT
            self.announcing.lookup(c, lambda: self._try(job))
            return
        allowed = self.attestation.gate(c, offers)  # before the routing rule, as the node's TEE gate
        w = self._choose(c, allowed, job)
        if w is None:
            return self._fail(job, NO_ATTESTED_WORKERS if self._gated_out(c, offers, allowed) else NO_WORKERS)
        job.attempts.started(w.ident.peer_id)
        job.record.attempts = job.attempts.count
        self._dispatch(job, w)

    def _try_sampled(self, job: SimJob) -> bool:
        """Route ``job`` from the router's sample alone (:mod:`.views`); False: the sample could
        not be drawn, route from the whole view instead."""
        assert self.view is not None
        c, rule = job.client, self.world.sc.routing.rule
        if rule not in ("cocoon", "random"):
            return False
        c.directory.expire(self.world.now_ms())  # the view is rebuilt per job: keep only the live
        candidates = self.view.candidates(c, job, weighted=rule == "cocoon")
        if candidates is None:
            return False
        if rule == "random":
            chosen: WorkerOffer | None = candidates[0]
        else:
            chosen = job.attempts.choose(with_reported_load(self.world, c, candidates), self.world.events.now)
        if chosen is None:
            return False
        w = self.world.by_peer[chosen.peer_id]
        job.attempts.started(w.ident.peer_id)
        job.record.attempts = job.attempts.count
        self._dispatch(job, w)
        return True

    def run_check(self, check: Check, w: SimWorker) -> None:
        """A run of ``check`` on ``w``: one attempt with a deadline of its own (the client's
        ``run_on``: no retry, the router learns nothing from it)."""
        c, now = check.job.client, self.world.events.now
        timeout = self.world.sc.routing.timeout_s
        rec = JobRecord(issued=now, client=c.idx, counted=False)
        attempts = JobAttempts(c.router, max_price=c.group.max_price_nanoton, max_attempts=1, deadline=now + timeout)
        job = SimJob(rec, c, now + timeout, attempts, check=check)
        self.world.events.at(job.deadline, self._deadline, job)
        self._dispatch(job, w)

    def _dispatch(self, job: SimJob, w: SimWorker) -> None:
        """An attempt of ``job`` on ``w``: on their link (reconnected if need be), after the TEE gate's ask."""
        world = self.world
        c, now = job.client, world.events.now
        link = c.links.get(w.idx)
        if link is None or link.session != w.session:  # (re)connect: a fresh stream, fresh state
            link = c.links[w.idx] = JobLink(JobConnection(Role.CLIENT), JobConnection(Role.WORKER), w.session)
        c.next_job_id += 1
        att = Attempt(job, w, now, c.session, link, c.next_job_id)
        job.current = att
        ready = self.attestation.ready_at(c, w)  # a first contact asks for and checks the evidence
        if ready > now:
            return world.events.at(ready, self._send, att)
        self._send(att)

    def _send(self, att: Attempt) -> None:
        """The attempt's request goes out on its link."""
        world = self.world
        job, w, c, link = att.job, att.worker, att.job.client, att.link
        if job.done or att.client_session != c.session:  # ended while the client checked the evidence
            return
        now = att.sent_at = world.events.now
        deadline_ms, cap = EPOCH_MS + int(job.deadline * 1000), c.group.max_price_nanoton
        request = JobRequest(job_id=att.job_id, model_id=c.model_id, texts=("x",) * c.group.units,
                             deadline_ms=deadline_ms, max_price_nanoton=cap)  # fmt: skip
        try:
            att.wire = link.client.send(request)
        except LocalProtocolError:  # too many jobs left open on this connection (a worker that never answers)
            return world.events.after(0.0, self._attempt_failed, att, BUSY)
        w.assigned += 1
        link.to_worker_at = max(now + world.latency.one_way(c.idx, w.idx, c.group.request_bytes), link.to_worker_at)
        world.events.at(link.to_worker_at, self._at_worker, att)

    def _gated_out(self, c: SimClient, offers: list[WorkerOffer], allowed: list[WorkerOffer]) -> bool:
        """Whether the attestation requirement, not a lack of workers, left ``c`` without one."""
        if not c.requires_tee:
            return False
        if self.world.sc.routing.rule in ("oracle", "oracle-wait"):  # the oracle sees every worker, not offers
            return not any(w.attested for w in self._oracle_pool(c, frozenset(), tee=False))
        return bool(offers) and not allowed

    def _choose(self, c: SimClient, offers: list[WorkerOffer], job: SimJob) -> SimWorker | None:
        world = self.world
        rule, now = world.sc.routing.rule, world.events.now
        if rule in ("oracle", "oracle-wait"):  # a central scheduler that sees every queue exactly
            pool = self._oracle_pool(c, job.attempts.exclude, tee=c.requires_tee)
            if not pool:
                return None
            if rule == "oracle":  # join the shortest queue (jobs there and on their way)
                cost = {w.idx: float(w.running + w.assigned) for w in pool}
            else:  # join the shortest expected wait: the queue weighed by the GPU's speed
                cost = {w.idx: (w.running + w.assigned + 1) / w.group.speed for w in pool}
            best = min(cost.values())
            return world.rng.choice([w for w in pool if cost[w.idx] == best])
        cap = c.group.max_price_nanoton
        if rule == "random":
            pool_offers = c.router.eligible(offers, max_price=cap, now=now, exclude=job.attempts.exclude)
            return world.by_peer[world.rng.choice(pool_offers).peer_id] if pool_offers else None
        chosen = job.attempts.choose(with_reported_load(self.world, c, offers), now)  # the library's rule
        return world.by_peer[chosen.peer_id] if chosen is not None else None

    def _oracle_pool(self, c: SimClient, exclude: frozenset[bytes], *, tee: bool) -> list[SimWorker]:
        """What a central scheduler may give ``c``'s job: every live honest worker of its model in
        its price, not in ``exclude``; with ``tee``, attested ones only."""
        world, cap = self.world, c.group.max_price_nanoton
        return [
            w for w in world.workers
            if w.model_id == c.model_id and world.online[w.idx] and w.behaviour == "honest"
            and w.group.price_nanoton <= cap and w.ident.peer_id not in exclude and (w.attested or not tee)
            and w.ident.peer_id not in c.banned
        ]  # fmt: skip

    # ---- workers ------------------------------------------------------------------------------

    def _at_worker(self, att: Attempt) -> None:
        world = self.world
        w, c = att.worker, att.job.client
        w.assigned -= 1
        back = world.latency.one_way(w.idx, c.idx)
        if not world.online[w.idx] or att.link.session != w.session:  # gone, or restarted: the stream died
            return world.events.after(back + DEAD_DETECT_S, self._attempt_failed, att, WORKER_LOST)
        att.link.worker.receive_data(att.wire)
        request = att.link.worker.next_event()
        assert isinstance(request, JobRequest) and request.job_id == att.job_id
        if w.running >= w.group.capacity or self._wait_too_long(w, c.group.units):
            refusal = att.link.worker.send(JobError(job_id=att.job_id, code=BUSY, message="at capacity"))
            return self._to_client(att, back, refusal)
        if w.behaviour == "drop":
            return  # accepted, never answered: the client waits for its deadline
        w.queue.append(att)
        self.announcing.snapshot(w)
        if w.serving is None:
            self._serve_next(w)

    @staticmethod
    def _wait_too_long(w: SimWorker, units: int) -> bool:
        """``workers.max_wait_s``: one more job would finish later than that (an idle worker
        always admits one, so a slow GPU still serves when nothing else is free)."""
        g = w.group
        return g.max_wait_s > 0 and w.running > 0 and (w.running + 1) * g.job_s * units / g.speed > g.max_wait_s

    def _service_s(self, w: SimWorker, units: int) -> float:
        mean = w.group.job_s * units / w.group.speed
        cv = w.group.service_cv
        if cv <= 0:
            return mean
        shape = 1 / (cv * cv)
        return self.world.rng.gammavariate(shape, mean / shape)

    def _serve_next(self, w: SimWorker) -> None:
        if not w.queue:
            return
        att = w.queue.popleft()
        w.serving = att
        t = self.cheating.compute_s(att, self._service_s(w, att.job.client.group.units))
        w.busy_s += t
        att.service_s = t
        self.world.events.after(t, self._served, w, att, w.session)

    def _served(self, w: SimWorker, att: Attempt, session: int) -> None:
        if session != w.session or w.serving is not att:
            return
        w.serving = None
        w.jobs_done += 1
        self.announcing.snapshot(w)
        self._serve_next(w)
        c = att.job.client
        units, price = c.group.units, w.group.price_nanoton
        cost = units * price * (2 if w.behaviour == "overcharge" else 1)
        att.answer = self.cheating.answer(w)
        att.queue_at_accept = (self.world.now_ms(), w.running)  # what a JobAccepted with a queue length says
        # As the worker does for a quick job: JobAccepted goes out with the result, in one write.
        data = att.link.worker.send(JobAccepted(job_id=att.job_id, price_nanoton=price, unit="item"))
        data += att.link.worker.send(JobResult(job_id=att.job_id, usage_units=units, cost_nanoton=cost,
                                               compute_us=int(att.service_s * 1e6)))  # fmt: skip
        self._to_client(att, self.world.latency.one_way(w.idx, c.idx, c.group.result_bytes), data)

    def worker_lost(self, w: SimWorker) -> None:
        """``w`` went down: its queued and running jobs are lost; their clients see the connection die."""
        lost = list(w.queue) + ([w.serving] if w.serving else [])
        w.queue.clear()
        w.serving = None
        for att in lost:
            delay = self.world.latency.pair_rtt(att.job.client.idx, w.idx) + DEAD_DETECT_S / 2
            self.world.events.after(delay, self._attempt_failed, att, WORKER_LOST)

    # ---- back at the client ------------------------------------------------------------------------

    def _to_client(self, att: Attempt, delay: float, data: bytes) -> None:
        link = att.link
        link.to_client_at = max(self.world.events.now + delay, link.to_client_at)
        self.world.events.at(link.to_client_at, self._reply, att, data)

    def _reply(self, att: Attempt, data: bytes) -> None:
        """The worker's frames reach the client's end of the connection."""
        job, w, c = att.job, att.worker, att.job.client
        if att.client_session != c.session:
            return
        att.link.client.receive_data(data)
        first = att.link.client.next_event()
        if isinstance(first, JobError):
            return self._attempt_failed(att, first.code)
        assert isinstance(first, JobAccepted)
        result = att.link.client.next_event()
        assert isinstance(result, JobResult)
        if att.queue_at_accept is not None and self.world.sc.routing.job_path_load:
            c.load_reports[w.ident.peer_id] = att.queue_at_accept
        if job.done:
            return
        price = first.price
        if price_refusal(price.highest, c.group.max_price_nanoton) or charge_refusal(price, result):
            return self._attempt_failed(att, PRICE)  # the client does not pay a wrong bill
        cost = result.cost_nanoton
        if job.check is not None:
            job.done = True
            return self.cheating.run_answered(att, cost)
        job.attempts.succeeded(w.ident.peer_id, self.world.events.now - att.sent_at, compute_us=result.compute_us)
        if self.view is not None:
            self.view.learned(c, w.ident.peer_id)
        if self.cheating.result(att, cost):  # drawn for a spot check: it ends the job
            return
        self.complete(job, w, cost, pay=True, verdict=Verdict.UNCHECKED, wrong=att.answer != 0)

    def complete(self, job: SimJob, w: SimWorker, cost: int, *, pay: bool, verdict: Verdict, wrong: bool) -> None:
        """``job`` ends with ``w``'s result (paid ``cost`` now when ``pay``); ``wrong``: a wrong
        result the caller takes as right."""
        if job.done:
            return
        if pay:
            self.settlement.pay(job.client, w, cost)
        job.done = True
        self._close(job)
        r = job.record
        r.ok, r.latency_s, r.worker, r.cost = True, self.world.events.now - r.issued, w.idx, cost
        r.verdict, r.wrong = verdict, wrong
        self.world.results.add_job(r)

    def _attempt_failed(self, att: Attempt, code: str) -> None:
        job, c = att.job, att.job.client
        if job.done or att.client_session != c.session:
            return
        if job.check is not None:  # a check run failed: no verdict from it, nobody scored down
            job.done = True
            return self.cheating.run_failed(job.check)
        after = job.attempts.failed(att.worker.ident.peer_id, code, self.world.events.now)
        if after.forget_worker:  # as the node's PeerFeedback.worker_lost: until it announces again
            c.directory.forget(att.worker.ident.peer_id)
            c.records.pop(att.worker.ident.peer_id, None)
        job.record.code = code
        if not after.retry:
            return self._fail(job, code)
        if after.wait_s:
            self.world.events.after(after.wait_s, self._try, job)
        else:
            self._try(job)

    def _deadline(self, job: SimJob) -> None:
        if job.done or job.held:  # a result under check is owed, past the deadline if need be
            return
        att = job.current
        if att is not None and att.job_id in att.link.client.jobs:  # tell the worker to stop
            if job.check is None:
                job.attempts.timed_out(att.worker.ident.peer_id, self.world.events.now)  # cooled down, as JobClient
            cancel = att.link.client.send(JobCancel(job_id=att.job_id))
            if self.world.online[att.worker.idx] and att.link.session == att.worker.session:
                att.link.worker.receive_data(cancel)
                att.link.worker.next_event()
        if job.check is not None:
            job.done = True
            return self.cheating.run_failed(job.check)
        self._fail(job, DEADLINE)

    def _fail(self, job: SimJob, code: str) -> None:
        if job.done:
            return
        job.done = True
        self._close(job)
        job.record.code = code
        self.world.results.add_job(job.record)

    def client_left(self, c: SimClient) -> None:
        """``c`` went down: its open jobs end, counted as abandoned."""
        for job in list(self.open_by_client.pop(c.idx, {})):  # in the order they arrived, as open_jobs
            job.done = True
            job.record.code = "client-left"
            self.open_jobs.pop(job, None)
            self.world.results.add_job(job.record)

    def _close(self, job: SimJob) -> None:
        self.open_jobs.pop(job, None)
        mine = self.open_by_client.get(job.client.idx)
        if mine is not None:
            mine.pop(job, None)

    def end_of_run(self) -> None:
        """Jobs still open when the run ends are counted as unfinished."""
        for job in list(self.open_jobs):
            job.done = True
            job.record.code = "unfinished"
            self.world.results.add_job(job.record)
        self.open_jobs.clear()
        self.open_by_client.clear()
