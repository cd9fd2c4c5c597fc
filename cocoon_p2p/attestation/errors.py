"""Why evidence was refused: one exception type, one reason enum a metric can count."""

from __future__ import annotations

import enum

from cocoon_p2p.core.errors import CocoonError, RemoteProtocolError


class RefusalReason(enum.Enum):
    """Why a verifier refused a piece of evidence (the values are metric labels)."""

    MALFORMED = "malformed"  # not a quote, or not one this verifier reads
    INVALID = "invalid"  # a signature, certificate, CRL or collateral check failed (dcap-qvl)
    WRONG_TEE = "wrong-tee"  # e.g. an SGX enclave quote where the policy wants a TDX guest
    TCB_STATUS = "tcb-status"  # the platform's TCB status is not one the policy accepts
    ADVISORY = "advisory"  # an advisory the policy does not accept applies
    DEBUG = "debug"  # a debuggable TD: its memory is open to the host
    MEASUREMENT = "measurement"  # not an image the policy names
    NOT_BOUND = "not-bound"  # REPORTDATA is not this peer's binding
    TOO_OLD = "too-old"  # evidence older than the policy's maximum age
    NO_COLLATERAL = "no-collateral"  # nothing to verify the quote against
    UNAVAILABLE = "unavailable"  # the peer gave no evidence (or none in time)


class AttestationError(CocoonError):
    """Evidence or its collateral was refused; ``reason`` says why."""

    def __init__(self, reason: RefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class EvidenceUnavailable(CocoonError):
    """This machine cannot produce evidence (no TEE, no interface, or the interface failed)."""


class ForgedEvidence(RemoteProtocolError):
    """A peer presented evidence that fails Intel's signatures or is bound to another
    key: not a weak platform but a lie, so the peer is banned at once."""

    code = "forged-evidence"


# Refusals that mean the peer lied (the rest mean its platform or image is not one we accept).
FORGERY = frozenset({RefusalReason.MALFORMED, RefusalReason.INVALID, RefusalReason.NOT_BOUND})
