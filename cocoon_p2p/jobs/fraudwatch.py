"""Fraud proofs on gossip (the trio side): publish ours, judge everyone else's.

Proofs (:mod:`.fraudproof`) travel on :data:`FRAUD_TOPIC`. A topic validator screens
each one inside pubsub, before it is delivered or forwarded, with the pure
:class:`~.fraudproof.ProofScreen` (its reporter's rate first, then decoding and
signatures, then that the gossip origin is the reporter, that it is new and that it
accuses anything): a refused proof goes no further through the mesh, and its origin
(and a relay that forwarded it, as :class:`~cocoon_p2p.overlay.peerscore.PeerScores`
rules for relays) is scored down. A proof that does not match its receipt was forged
by its reporter, who signed it.

Proofs that pass are judged one at a time, in :meth:`FraudWatch.run`, by policy:

* this node can re-run the job (``rerun`` returns outputs): it judges the accused's
  outputs against its own run. A mismatch confirms the fraud: the accused is scored
  down with :class:`~.spotcheck.WrongResult`. No mismatch refutes it: the reporter
  accused an honest worker (with a made-up reference, or fooled by a lying one) and
  is scored down with :class:`~.fraudproof.FalseAccusation`;
* it cannot (no ``rerun``, or it returns None, fails or runs out of time): it acts
  only on the word of ``trusted_reporters``; any other proof is recorded, unverified.

Every outcome is counted (:meth:`FraudWatch.metrics`) and kept in
:attr:`FraudWatch.received` (bounded), for the node to turn into events.

Cancellation: ``run`` stops with the node and takes its validator with it; a proof
whose re-run is cancelled is forgotten, held against nobody. A cancelled ``report``
has handed the proof to pubsub or not at all (see :meth:`.Gossip.publish`).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pb import rpc_pb2

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import CocoonError, ExpiredMessage, LocalProtocolError, ProtocolError, RateLimited
from cocoon_p2p.core.identity import Identity, peer_id_to_str
from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.metrics import Metric, metric
from cocoon_p2p.execution.tensors import Tensor
from cocoon_p2p.overlay.events import EventQueue, FraudJudged
from cocoon_p2p.overlay.gossip import Gossip, Subscription
from cocoon_p2p.overlay.guard import PeerGuard
from cocoon_p2p.overlay.peerscore import Blame, gossip_blame

from .checks import CaughtCheating
from .fraudproof import (
    MAX_PROOF_BYTES,
    FalseAccusation,
    FraudProof,
    FraudRecord,
    ProofOutcome,
    ProofScreen,
    judge,
)
from .spotcheck import WrongResult

log = logging.getLogger(__name__)

FRAUD_TOPIC = "/cocoon/fraud/1"
PENDING_PROOFS = 64  # proofs waiting for a re-run; beyond this they are forwarded, not judged here
MAX_RECORDS = 256
# pubsub refuses RPCs over 1 MiB (py-libp2p's default), and a message's envelope
# (origin, seqno, key, signature, topic) and the RPC around it take some of that.
GOSSIP_ENVELOPE_BYTES = 4096
MAX_GOSSIP_PROOF_BYTES = MAX_PROOF_BYTES - GOSSIP_ENVELOPE_BYTES
DEFAULT_RERUN_TIMEOUT_S = 120.0

RerunResult = tuple[tuple[Tensor, ...], tuple[int, ...]]
# How this node re-runs a proof's request (outputs, streamed token ids); None: it cannot
# (it does not serve that model). Raise a CocoonError when the run fails.
Rerun = Callable[[FraudProof], Awaitable[RerunResult | None]]


@dataclass
class FraudStats:
    """Proofs this node published, and those it received by outcome."""

    sent: int = 0
    received: dict[ProofOutcome, int] = field(default_factory=lambda: dict.fromkeys(ProofOutcome, 0))


class FraudWatch:
    """Publishes this node's fraud proofs and judges those it receives (see the module docstring).

    ``events`` is the node's queue, where fraud events go once
    :mod:`cocoon_p2p.overlay.events` defines them; until then :attr:`received` holds them.
    """

    def __init__(
        self,
        identity: Identity,
        gossip: Gossip,
        guard: PeerGuard,
        events: EventQueue,
        *,
        rerun: Rerun | None = None,
        trusted_reporters: frozenset[bytes] = frozenset(),
        cosine_min: float,
        rate_per_min: int = 10,
        rerun_timeout_s: float = DEFAULT_RERUN_TIMEOUT_S,
    ) -> None:
        self.identity = identity
        self.gossip = gossip
        self.guard = guard
        self.events = events
        self.rerun = rerun
        self.trusted_reporters = trusted_reporters
        self.cosine_min = cosine_min
        self.rerun_timeout_s = rerun_timeout_s
        self.screen = ProofScreen(rate_per_min=rate_per_min, cosine_min=cosine_min)
        self.stats = FraudStats()
        self.received: deque[FraudRecord] = deque(maxlen=MAX_RECORDS)
        self._send, self._recv = trio.open_memory_channel[FraudProof](PENDING_PROOFS)

    # ---- ours ---------------------------------------------------------------------

    async def caught(self, cheat: CaughtCheating) -> None:
        """A spot check of ours found a wrong result (the ``CheatReport`` port): publish it
        as a fraud proof. A cheat without a receipt cannot be proven to others; a proof too
        large for gossip is kept to ourselves (logged)."""
        receipt = cheat.wrong.receipt
        if receipt is None:
            return
        req = cheat.request
        try:
            proof = FraudProof.create(
                self.identity,
                receipt=receipt,
                inputs=req.inputs,
                texts=req.texts,
                max_tokens=req.max_tokens,
                outputs=cheat.wrong.result.outputs,
                token_ids=cheat.wrong.tokens,
                reference_outputs=cheat.reference.result.outputs,
                reference_tokens=cheat.reference.tokens,
                now_ms=now_ms(),
            )
            await self.report(proof)
        except LocalProtocolError as exc:
            log.warning("fraud proof not published: %s", exc, extra=fields(peer=receipt.worker, job=receipt.job_id))

    async def report(self, proof: FraudProof) -> None:
        """Publish our own ``proof``. LocalProtocolError if another peer signed it (receivers
        would refuse it and blame us) or if it is too large for gossip."""
        if proof.reporter != self.identity.peer_id:
            raise LocalProtocolError("a fraud proof is gossiped by its reporter")
        data = proof.encode()
        if len(data) > MAX_GOSSIP_PROOF_BYTES:
            raise LocalProtocolError(
                f"fraud proof of {len(data)} bytes exceeds gossip's {MAX_GOSSIP_PROOF_BYTES}", code="too-large"
            )
        await self.gossip.publish(FRAUD_TOPIC, data)
        self.stats.sent += 1
        log.warning("reported a wrong result", extra=fields(peer=proof.accused, job=proof.receipt.job_id))

    # ---- everyone else's ----------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Screen and judge gossiped proofs (start with ``nursery.start``: ready once subscribed)."""
        pubsub = self.gossip.pubsub
        pubsub.set_topic_validator(FRAUD_TOPIC, self._validate, False)
        try:
            async with trio.open_nursery() as nursery:
                sub = await self.gossip.subscribe(FRAUD_TOPIC, nursery, queue_size=PENDING_PROOFS)
                nursery.start_soon(self._drain, sub)
                task_status.started()
                async for proof in self._recv:
                    await self._judge(proof)
        finally:
            pubsub.remove_topic_validator(FRAUD_TOPIC)

    @staticmethod
    async def _drain(sub: Subscription) -> None:
        # The validator already took each proof in; the delivered copies are not needed.
        async for _ in sub:
            pass

    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        sender = forwarder.to_bytes()
        if sender == self.identity.peer_id:  # our own, being published
            return True
        origin, now = bytes(msg.from_id), now_ms()
        try:
            proof = self.screen.screen(bytes(msg.data), origin=origin, now_ms=now)
        except ProtocolError as err:
            outcome = ProofOutcome.RATE_LIMITED if isinstance(err, RateLimited) else ProofOutcome.MALFORMED
            log.info("refused a fraud proof: %s", err, extra=fields(peer=origin))
            self._blame(sender, origin, err)
            self._record(FraudRecord(outcome=outcome, reporter=origin, detail=f"{err.code}: {err}", at_ms=now))
            return False
        if proof is None:
            self.stats.received[ProofOutcome.DUPLICATE] += 1
            return False
        try:
            self._send.send_nowait(proof)
        except trio.WouldBlock:  # still valid: forward it to nodes with time to judge it
            self._record(self._about(proof, ProofOutcome.RATE_LIMITED, "too many proofs waiting to be judged", now))
        except (trio.BrokenResourceError, trio.ClosedResourceError):  # run() is over: nobody judges here
            pass
        return True

    def _blame(self, sender: bytes, origin: bytes, err: ProtocolError) -> None:
        """pubsub checked the origin's signature over these bytes: whatever is wrong in
        them is the origin's doing, except age, which a slow relay may add. A relay
        answers as :class:`~cocoon_p2p.overlay.peerscore.PeerScores` rules for relays. A
        proof merely stale (expired, or one already seen replayed by the mesh's cache, as
        gossipsub does to every new subscriber) is dropped against nobody."""
        if gossip_blame(err.code, sender=sender, origin=origin) is None:
            return
        if sender != origin:
            self.guard.misbehaved(sender, err, blame=Blame.RELAY)
            if isinstance(err, ExpiredMessage):
                return
        self.guard.misbehaved(origin, err, blame=Blame.ORIGIN)

    async def _judge(self, proof: FraudProof) -> None:
        rerun = await self._rerun(proof)
        reporter, accused = peer_id_to_str(proof.reporter), peer_id_to_str(proof.accused)
        if rerun is not None:
            mismatch = judge(proof, *rerun, cosine_min=self.cosine_min)
            if mismatch is not None:
                detail = f"{mismatch.reason}: {mismatch.detail}"
                log.warning(
                    "fraud confirmed by our re-run (%s)",
                    detail,
                    extra=fields(peer=proof.accused, job=proof.receipt.job_id),
                )
                self._penalize(proof.accused, WrongResult(f"fraud proof by {reporter}, confirmed: {detail}"))
                outcome = ProofOutcome.CONFIRMED
            else:
                detail = "our re-run agrees with the accused's outputs"
                log.warning(  # the reporter is the one penalized
                    "fraud proof against %s refuted",
                    accused,
                    extra=fields(peer=proof.reporter, job=proof.receipt.job_id),
                )
                self._penalize(proof.reporter, FalseAccusation(f"accused {accused} of a right result"))
                outcome = ProofOutcome.REFUTED
        elif proof.reporter in self.trusted_reporters:
            detail = "reported by a trusted reporter"
            self._penalize(proof.accused, WrongResult(f"fraud proof by the trusted {reporter}"))
            outcome = ProofOutcome.TRUSTED
        else:
            detail, outcome = "no re-run here; the reporter is not trusted", ProofOutcome.UNVERIFIED
        self._record(self._about(proof, outcome, detail, now_ms()))

    async def _rerun(self, proof: FraudProof) -> RerunResult | None:
        if self.rerun is None:
            return None
        with trio.move_on_after(self.rerun_timeout_s):
            try:
                return await self.rerun(proof)
            except CocoonError as exc:  # our run failed: no verdict, nobody blamed
                log.info("re-run failed: %s", exc, extra=fields(peer=proof.accused, job=proof.receipt.job_id))
                return None
        log.info("re-run timed out", extra=fields(peer=proof.accused, job=proof.receipt.job_id))
        return None

    def _penalize(self, peer: bytes, err: ProtocolError) -> None:
        if peer != self.identity.peer_id:  # a proof against us is for others to act on
            self.guard.misbehaved(peer, err)

    @staticmethod
    def _about(proof: FraudProof, outcome: ProofOutcome, detail: str, at_ms: int) -> FraudRecord:
        r = proof.receipt
        return FraudRecord(
            outcome=outcome,
            reporter=proof.reporter,
            accused=proof.accused,
            job_id=r.job_id,
            model_id=r.model_id,
            detail=detail,
            at_ms=at_ms,
        )

    def _record(self, record: FraudRecord) -> None:
        self.stats.received[record.outcome] += 1
        self.received.append(record)
        self.events.emit(
            FraudJudged(record.reporter, record.accused, record.outcome.value, record.job_id, record.detail)
        )

    def metrics(self) -> list[Metric]:
        received = tuple(({"outcome": o.value}, float(n)) for o, n in self.stats.received.items())
        return [
            metric("cocoon_fraud_proofs_sent_total", "counter", "Fraud proofs this node published", self.stats.sent),
            Metric(
                "cocoon_fraud_proofs_received_total",
                "counter",
                "Gossiped fraud proofs, by what this node made of them",
                received,
            ),
        ]
