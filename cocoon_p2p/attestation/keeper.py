"""A confidential worker's evidence (the trio side): made, kept fresh, claimed, served.

:class:`EvidenceKeeper` asks its :class:`~.sources.QuoteSource` for a quote whose
REPORTDATA binds it to this node's key (:mod:`.binding`), in a worker thread (a
quote takes the TEE from milliseconds to seconds); keeps it until
:class:`~.refresh.EvidenceSchedule` says to remake it; puts the small claim into
the node's announcements and records (through the advertiser); and answers
``/cocoon/attest/1`` with the quote and, when it has it, its collateral.

Cancellation: :meth:`run` stops with the node, once a quote being made in its
thread has finished (it is then dropped). Nothing is written to disk.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from cocoon_p2p.core.errors import ProtocolError
from cocoon_p2p.core.identity import Identity
from cocoon_p2p.core.metrics import Metric, metric
from cocoon_p2p.overlay.advertiser import Advertiser
from cocoon_p2p.overlay.teeclaim import TeeClaim, TeeKind

from . import evidence as ev
from .binding import report_data_for_peer
from .collateral import Collateral
from .errors import AttestationError, EvidenceUnavailable
from .pccs import fetch_collateral
from .refresh import EvidenceSchedule, RefreshPolicy
from .sources import QuoteSource
from .verifier import Verdict, quote_registers, quote_report_data

log = logging.getLogger(__name__)
READ_TIMEOUT_S = 5.0


@dataclass(frozen=True, kw_only=True)
class WorkerAttestation:
    """What a confidential worker needs: where its quotes come from, and collateral to send along."""

    source: QuoteSource
    refresh: RefreshPolicy = RefreshPolicy()
    collateral_file: Path | None = None  # Intel's collateral for this platform (dcap-qvl JSON)
    pccs_url: str | None = None  # or fetch it from here once per evidence
    gpu_claim: str | None = None  # NVIDIA GPU CC evidence, JSON (a separate claim)
    # Serve a quote made for another key (the real sample quotes, in tests): every client
    # with a real policy refuses it as forged and bans this worker. Never in production.
    insecure_serve_unbound_for_tests: bool = False


class EvidenceKeeper:
    """Makes and serves this node's evidence; sets the advertiser's TEE claim."""

    def __init__(self, identity: Identity, config: WorkerAttestation, *, advertiser: Advertiser) -> None:
        self.identity = identity
        self.config = config
        self.advertiser = advertiser
        self.schedule = EvidenceSchedule(config.refresh)
        self.evidence: ev.Evidence | None = None
        self._encoded = b""  # the evidence as served, encoded (and checked) once per quote
        self.claim: TeeClaim | None = None
        self.made = 0
        self.failures = 0
        self.served = 0
        self.last_error: str | None = None
        self._ready = trio.Event()

    async def run(self) -> None:
        """Make evidence now and again before it runs out (run in the node's nursery)."""
        while True:
            now = time.time()
            if self.schedule.due(now):
                await self.refresh_once()
            await trio.sleep(max(0.05, self.schedule.wait_s(time.time())))

    async def wait_ready(self) -> None:
        """Return once the first attempt (successful or not) has finished."""
        await self._ready.wait()

    async def refresh_once(self) -> None:
        """One attempt at new evidence; on failure the old evidence stays while it is valid."""
        started = time.time()
        try:
            self.evidence, self._encoded, self.claim = await trio.to_thread.run_sync(self._make)
            self.schedule.produced(started)
            self.made += 1
            self.last_error = None
            self.advertiser.set_tee_claim(self.claim)
        except (EvidenceUnavailable, AttestationError) as exc:
            self.failures += 1
            self.last_error = str(exc)
            self.schedule.failed(started)
            log.warning("attestation: no evidence (%s); retry in %.0f s", exc, self.schedule.wait_s(time.time()))
            if not self.schedule.valid(time.time()):
                self.evidence = self.claim = None
                self._encoded = b""
                self.advertiser.set_tee_claim(None)
        finally:
            self._ready.set()

    def _make(self) -> tuple[ev.Evidence, bytes, TeeClaim]:
        """Blocking: a bound quote, its collateral, and the claim that names it."""
        cfg = self.config
        binding = report_data_for_peer(self.identity.peer_id)
        quote = cfg.source.quote(binding)
        unbound = quote_report_data(quote) != binding
        if unbound and not cfg.insecure_serve_unbound_for_tests:  # a file made for another key, or a broken source
            raise EvidenceUnavailable(f"the {cfg.source.name} quote does not carry this peer's binding")
        measurement = Verdict(None, "", 0, registers=quote_registers(quote)).measurement
        assert measurement is not None
        collateral: str | None = None
        if cfg.collateral_file is not None:
            try:
                text = cfg.collateral_file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise EvidenceUnavailable(f"cannot read the collateral {cfg.collateral_file}: {exc}") from exc
            collateral = Collateral.from_json(text).text
        elif cfg.pccs_url is not None:
            collateral = fetch_collateral(cfg.pccs_url, quote).text
        produced = int(time.time() * 1000)
        expires = produced + int(cfg.refresh.lifetime_s * 1000)
        evidence = ev.Evidence(
            tee=cfg.source.tee,
            source=cfg.source.name,
            quote=quote,
            collateral=collateral,
            produced_at_ms=produced,
            expires_at_ms=expires,
            gpu=cfg.gpu_claim,
        )
        try:
            encoded = evidence.encode()  # within the wire's limits, or refused here rather than at a client
        except ProtocolError as exc:
            raise EvidenceUnavailable(f"the evidence cannot be served: {exc}") from exc
        claim = TeeClaim(TeeKind(cfg.source.tee), measurement, expires, gpu_cc=cfg.gpu_claim is not None)
        return evidence, encoded, claim

    async def handle(self, stream: Any) -> None:
        """``/cocoon/attest/1``: our evidence, or an empty answer while we have none."""
        try:
            with trio.move_on_after(READ_TIMEOUT_S):
                ev.decode_request(await stream.read(ev.MAX_REQUEST_BYTES + 1))
                current = self._encoded if self.schedule.valid(time.time()) else b""
                await stream.write(current)
                self.served += bool(current)
        except ProtocolError:
            pass  # a bad request gets no answer
        finally:
            await stream.close()

    def metrics(self) -> list[Metric]:
        state = self.schedule.state(time.time()).value
        return [
            metric("cocoon_attestation_evidence_made_total", "counter", "Quotes made by this worker", self.made),
            metric(
                "cocoon_attestation_evidence_failures_total", "counter", "Failed attempts at a quote", self.failures
            ),
            metric("cocoon_attestation_evidence_served_total", "counter", "Evidence sent to clients", self.served),
            metric("cocoon_attestation_evidence_state", "gauge", "This worker's evidence, by state", 1, state=state),
        ]
