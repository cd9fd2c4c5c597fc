"""A client's side of attestation (the trio side): ask, verify, remember, and filter offers.

:class:`AttestationGate` implements the job layer's ``TeeGate`` port. Given the
offers for a model, it keeps those whose worker is attested under the client's
:class:`~.policy.TeePolicy`: a worker that claims a TEE and has no standing
verdict is asked for its evidence on ``/cocoon/attest/1`` (once; concurrent jobs
wait for the same answer), the quote is verified with dcap-qvl against
collateral (the worker's copy, the cache, an offline bundle, or a PCCS), and its
REPORTDATA must be the binding of the peer on this very connection, whose key
Noise authenticated. Verdicts stand as :class:`~.book.VerdictBook` says.

A forged quote (bad signatures, or bound to another key) is a protocol
violation: the guard bans the peer at once. A platform or image the policy does
not accept only keeps the peer out of TEE jobs for a while. Both are events and
metrics (``cocoon_attestation_*``).

Cancellation: a cancelled ask leaves no verdict; the next job asks again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from cocoon_p2p.core.errors import ProtocolError
from cocoon_p2p.core.identity import peer_id_to_str
from cocoon_p2p.core.metrics import Histogram, Metric, metric
from cocoon_p2p.overlay.directory import WorkerOffer
from cocoon_p2p.overlay.events import AttestationRefused, EventQueue, PeerAttested
from cocoon_p2p.overlay.guard import PeerGuard
from cocoon_p2p.transport.host import unblock_peer

from . import evidence as ev
from .binding import report_data_for_peer
from .book import REFUSED_FOR_S, TeeStanding, VerdictBook
from .collateral import Collateral, CollateralCache
from .errors import FORGERY, AttestationError, ForgedEvidence, RefusalReason
from .pccs import fetch_collateral
from .policy import DEFAULT_POLICY, TeePolicy
from .verifier import Verdict, quote_fmspc, verify_quote

log = logging.getLogger(__name__)
VERIFY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0)


@dataclass(frozen=True, kw_only=True)
class ClientAttestation:
    """How a client judges workers that claim a TEE."""

    policy: TeePolicy = DEFAULT_POLICY
    collateral_files: tuple[Path, ...] = ()  # offline bundle: dcap-qvl collateral JSON, one per file
    pccs_url: str | None = None  # fetch collateral here when nothing else has it
    trust_peer_collateral: bool = True  # Intel signs it; dcap-qvl checks it like any other
    ask_timeout_s: float = 10.0
    refused_for_s: float = REFUSED_FOR_S


@dataclass
class GateStats:
    asks: int = 0
    ask_failures: int = 0  # no answer, or an empty one
    verify_s: Histogram = field(default_factory=lambda: Histogram(VERIFY_BUCKETS_S))
    ask_s: Histogram = field(default_factory=Histogram)  # ask + verify, end to end


class AttestationGate:
    """Attestation for a client; implements the job layer's ``TeeGate``."""

    def __init__(self, host: Any, config: ClientAttestation, *, guard: PeerGuard, events: EventQueue) -> None:
        self.host = host
        self.config = config
        self.policy = config.policy
        self.guard = guard
        self.events = events
        self.book = VerdictBook(verdict_ttl_s=config.policy.verdict_ttl_s, refused_for_s=config.refused_for_s)
        self.collateral = CollateralCache()
        self.stats = GateStats()
        self._asking: dict[bytes, trio.Event] = {}
        self._epoch = time.time()
        for path in config.collateral_files:
            self.collateral.put(Collateral.from_json(path.read_text()))
        if self.policy.insecure:
            log.warning("attestation policy %s has test-only relaxations: not for production", self.policy.source)

    def _verify_time(self) -> int:
        """When collateral is judged: now, or the test-only fixed time (moving on from it)."""
        fixed = self.policy.insecure_fixed_time_for_tests
        return int(time.time()) if fixed is None else fixed + int(time.time() - self._epoch)

    def standing(self, peer: bytes) -> TeeStanding:
        return self.book.standing(peer, time.time())

    async def attested(self, offers: list[WorkerOffer]) -> list[WorkerOffer]:
        """The offers whose worker is attested now, asking the ones never asked (concurrently).
        Workers that claim no TEE are not asked."""
        now = time.time()
        claiming = [o for o in offers if o.tee is not None and o.tee.valid(int(now * 1000))]
        unknown = [o for o in claiming if self.book.standing(o.peer_id, now) is TeeStanding.UNKNOWN]
        if unknown:
            async with trio.open_nursery() as nursery:
                for offer in unknown:
                    nursery.start_soon(self.check, offer.peer_id, offer.addrs)
        now = time.time()
        return [o for o in claiming if self.book.standing(o.peer_id, now) is TeeStanding.ATTESTED]

    async def check(self, peer: bytes, addrs: tuple[str, ...] = ()) -> Verdict:
        """Ask ``peer`` for its evidence and judge it (or wait for the ask under way)."""
        while (pending := self._asking.get(peer)) is not None:
            await pending.wait()
        standing = self.book.verdict(peer, time.time())
        if standing is not None:
            return standing
        done = self._asking[peer] = trio.Event()
        try:
            return await self._ask_and_judge(peer, addrs)
        finally:
            del self._asking[peer]
            done.set()

    async def _ask_and_judge(self, peer: bytes, addrs: tuple[str, ...]) -> Verdict:
        t0 = time.perf_counter()
        self.stats.asks += 1
        evidence: ev.Evidence | None = None
        verdict: Verdict
        try:
            with trio.fail_after(self.config.ask_timeout_s):
                evidence = await self._ask(peer, addrs)
            if evidence is None:
                verdict = Verdict(RefusalReason.UNAVAILABLE, "the worker has no evidence now", self._verify_time())
            else:
                verdict = await self._judge(peer, evidence)
        except Exception as exc:  # no answer (libp2p's errors, a timeout, bad bytes): not a verdict on the quote
            self.stats.ask_failures += 1
            if isinstance(exc, ProtocolError):
                self.guard.misbehaved(peer, exc)
            verdict = Verdict(RefusalReason.UNAVAILABLE, f"no evidence: {exc!r}", self._verify_time())
        now = time.time()
        expires = evidence.expires_at_ms / 1000 if evidence is not None else None
        self.book.record(peer, verdict, now, evidence_expires_s=expires)
        self.stats.ask_s.observe(time.perf_counter() - t0)
        who = peer_id_to_str(peer)
        if verdict.accepted:
            measurement = verdict.measurement.hex() if verdict.measurement else ""
            self.events.emit(PeerAttested(peer, verdict.tee or "", measurement, verdict.image or ""))
            log.info("attestation: %s attested (%s, %s)", who, verdict.status, measurement[:16])
        else:
            assert verdict.reason is not None
            self.events.emit(AttestationRefused(peer, verdict.reason.value, verdict.message))
            log.warning("attestation: %s refused: %s", who, verdict.message)
            if verdict.reason in FORGERY:
                self.guard.misbehaved(peer, ForgedEvidence(verdict.message))
        return verdict

    async def _ask(self, peer: bytes, addrs: tuple[str, ...]) -> ev.Evidence | None:
        if addrs:
            self.host.get_peerstore().add_addrs(ID(peer), [Multiaddr(a) for a in addrs], 3600)
            unblock_peer(self.host, peer)
        stream = await self.host.new_stream(ID(peer), [TProtocol(ev.PROTOCOL)])
        try:
            remote = getattr(getattr(stream, "muxed_conn", None), "peer_id", None)
            if remote is not None and remote.to_bytes() != peer:  # the binding is to this session's key
                raise ForgedEvidence("the attest stream is not with the peer asked")
            await stream.write(ev.encode_request())
            data = b""
            while len(data) <= ev.MAX_EVIDENCE_BYTES:
                try:
                    chunk = await stream.read(ev.MAX_EVIDENCE_BYTES + 1 - len(data))
                except StreamEOF:  # the worker's FIN: the whole answer is in
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            await stream.close()
        return ev.decode_evidence(data) if data else None

    async def _judge(self, peer: bytes, evidence: ev.Evidence) -> Verdict:
        at = self._verify_time()
        age_s = time.time() - evidence.produced_at_ms / 1000
        if age_s > self.policy.max_evidence_age_s:
            return Verdict(
                RefusalReason.TOO_OLD, f"evidence {age_s:.0f} s old (at most {self.policy.max_evidence_age_s:g})", at
            )
        try:
            collateral = await self._collateral_for(evidence, at)
        except AttestationError as exc:
            return Verdict(exc.reason, str(exc), at)
        t0 = time.perf_counter()
        verdict = verify_quote(
            evidence.quote, collateral, self.policy, now_s=at, expected_report_data=report_data_for_peer(peer)
        )
        self.stats.verify_s.observe(time.perf_counter() - t0)
        return verdict

    async def _collateral_for(self, evidence: ev.Evidence, at: int) -> Collateral:
        fmspc = quote_fmspc(evidence.quote)
        cached = self.collateral.get(fmspc, at)
        if cached is not None:
            return cached
        if evidence.collateral is not None and self.config.trust_peer_collateral:
            sent = Collateral.from_json(evidence.collateral)
            if sent.fmspc == fmspc and sent.fresh(at):
                self.collateral.put(sent)
                return sent
        if self.config.pccs_url is not None:
            fetched = await trio.to_thread.run_sync(fetch_collateral, self.config.pccs_url, evidence.quote)
            self.collateral.put(fetched)
            return fetched
        raise AttestationError(RefusalReason.NO_COLLATERAL, f"no fresh collateral for platform {fmspc}")

    def metrics(self) -> list[Metric]:
        refused = self.book.refused_total
        return [
            metric("cocoon_attestation_asks_total", "counter", "Evidence asked of workers", self.stats.asks),
            metric(
                "cocoon_attestation_ask_failures_total",
                "counter",
                "Asks with no evidence back",
                self.stats.ask_failures,
            ),
            metric("cocoon_attestation_accepted_total", "counter", "Verdicts that accepted", self.book.accepted_total),
            Metric(
                "cocoon_attestation_refused_total",
                "counter",
                "Verdicts that refused, by reason",
                tuple(({"reason": r.value}, float(refused[r])) for r in RefusalReason),
            ),
            metric(
                "cocoon_attestation_attested_peers",
                "gauge",
                "Peers attested now",
                self.book.attested_count(time.time()),
            ),
            metric(
                "cocoon_attestation_collateral_hits_total", "counter", "Collateral cache hits", self.collateral.hits
            ),
            metric(
                "cocoon_attestation_collateral_misses_total",
                "counter",
                "Collateral cache misses",
                self.collateral.misses,
            ),
            metric("cocoon_attestation_verify_seconds", "histogram", "Quote verification time", self.stats.verify_s),
            metric("cocoon_attestation_ask_seconds", "histogram", "Ask + verify, end to end", self.stats.ask_s),
        ]
