"""Judging a quote: dcap-qvl checks Intel's signatures; the policy decides the rest (pure).

Order of checks, each refusing with its :class:`~.errors.RefusalReason`:

1. the quote parses (MALFORMED) and its collateral is for its platform;
2. dcap-qvl verifies the quote against the collateral at ``now``: the PCK
   certificate chain to Intel's pinned root, the CRLs, the QE report, the quote
   signature, and the platform's TCB level (INVALID; "no matching TCB level", an
   unknown platform, is TCB_STATUS);
3. the TEE is the policy's (WRONG_TEE), its TCB status and every advisory are
   accepted (TCB_STATUS, ADVISORY), it is not a debug TD (DEBUG);
4. its measurements are an approved image's (MEASUREMENT);
5. REPORTDATA is the binding of the peer on this connection (NOT_BOUND).

Certificate chains are never walked here: that is dcap-qvl's job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from cocoon_p2p.overlay.teeclaim import MEASUREMENT_REGISTERS, measurement_digest

from .collateral import Collateral, qvl
from .errors import AttestationError, RefusalReason
from .policy import TeePolicy

MAX_QUOTE_BYTES = 16 * 1024
_TD_DEBUG = 0x01  # TDATTRIBUTES bit 0 (byte 0, little-endian): the TD is debuggable
_SGX_DEBUG = 0x02  # SGX ATTRIBUTES.FLAGS bit 1


@dataclass(frozen=True)
class Verdict:
    """What a verification found. ``reason`` is None when the policy accepted the quote;
    the other fields are filled as far as the checks got."""

    reason: RefusalReason | None
    message: str
    verified_at: int
    tee: str | None = None  # "tdx" or "sgx"
    status: str | None = None  # the TCB status (UpToDate, ...)
    advisories: tuple[str, ...] = ()
    registers: dict[str, bytes] = field(default_factory=dict)  # mr_td, rt_mr0..3 (TDX)
    report_data: bytes | None = None
    debug: bool | None = None
    image: str | None = None  # the policy's image name ("" when it names none)
    fmspc: str | None = None
    collateral_next_update: int | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None

    @property
    def measurement(self) -> bytes | None:
        """The image's digest, as claims carry it (:func:`~cocoon_p2p.overlay.teeclaim.measurement_digest`)."""
        if all(r in self.registers for r in MEASUREMENT_REGISTERS):
            return measurement_digest(self.registers)
        return None

    def raise_if_refused(self) -> Verdict:
        if self.reason is not None:
            raise AttestationError(self.reason, self.message)
        return self

    def to_json(self) -> dict[str, Any]:
        m = self.measurement
        return {
            "accepted": self.accepted,
            "reason": self.reason.value if self.reason else None,
            "message": self.message,
            "verified_at": self.verified_at,
            "tee": self.tee,
            "status": self.status,
            "advisories": list(self.advisories),
            "debug": self.debug,
            "image": self.image,
            "measurement": m.hex() if m else None,
            "registers": {k: v.hex() for k, v in self.registers.items()},
            "report_data": self.report_data.hex() if self.report_data is not None else None,
            "fmspc": self.fmspc,
            "collateral_next_update": self.collateral_next_update,
        }


def quote_fmspc(quote: bytes) -> str:
    """The platform family of a quote (to find its collateral). AttestationError(MALFORMED)."""
    try:
        return str(_parse(quote).fmspc()).upper()
    except (ValueError, RuntimeError) as exc:  # e.g. no PCK certificate chain to read it from
        raise AttestationError(RefusalReason.MALFORMED, f"no platform in the quote: {exc}") from exc


def quote_registers(quote: bytes) -> dict[str, bytes]:
    """MRTD and RTMR0-3 of a TDX quote, read without verifying it (a worker naming its own
    image). AttestationError(MALFORMED) for anything else."""
    report = _parse(quote).report
    try:
        return {r: bytes(getattr(report, r)) for r in MEASUREMENT_REGISTERS}
    except AttributeError as exc:
        raise AttestationError(RefusalReason.MALFORMED, "not a TDX quote (no TD report)") from exc


def quote_report_data(quote: bytes) -> bytes:
    """REPORTDATA of a TDX quote, read without verifying it. AttestationError(MALFORMED)."""
    try:
        return bytes(_parse(quote).report.report_data)
    except AttributeError as exc:
        raise AttestationError(RefusalReason.MALFORMED, "a quote without REPORTDATA") from exc


def _parse(quote: bytes) -> Any:
    if not isinstance(quote, bytes) or not 48 <= len(quote) <= MAX_QUOTE_BYTES:
        raise AttestationError(RefusalReason.MALFORMED, f"a quote has 48 to {MAX_QUOTE_BYTES} bytes")
    try:
        return qvl().parse_quote(quote)
    except (ValueError, RuntimeError) as exc:
        raise AttestationError(RefusalReason.MALFORMED, f"not a DCAP quote: {exc}") from exc


def verify_quote(
    quote: bytes,
    collateral: Collateral,
    policy: TeePolicy,
    *,
    now_s: int | None = None,
    expected_report_data: bytes | None,
) -> Verdict:
    """Verify ``quote`` and judge it by ``policy`` at ``now_s`` (default: now, or the policy's
    test-only fixed time). ``expected_report_data`` is the binding of the peer on the
    connection (:func:`~.binding.report_data_for_peer`); None only where no peer is
    involved (an operator checking a file), and then the binding is reported, not judged."""
    if now_s is None:
        now_s = policy.insecure_fixed_time_for_tests or int(time.time())
    t = now_s

    def refuse(reason: RefusalReason, message: str, **found: Any) -> Verdict:
        return Verdict(reason, message, t, **found)

    try:
        fmspc = quote_fmspc(quote)
    except AttestationError as exc:
        return refuse(exc.reason, str(exc))
    if fmspc != collateral.fmspc:
        return refuse(RefusalReason.NO_COLLATERAL, f"collateral for FMSPC {collateral.fmspc}, quote is {fmspc}")
    try:
        report = json.loads(qvl().verify(quote, collateral.for_qvl, now_s).to_json())
    except (ValueError, RuntimeError) as exc:
        text = str(exc)
        reason = RefusalReason.TCB_STATUS if "TCB level" in text else RefusalReason.INVALID
        return refuse(reason, f"dcap-qvl refused the quote: {text}", fmspc=fmspc)
    return judge_report(
        report, policy, now_s=t, expected_report_data=expected_report_data, fmspc=fmspc, collateral=collateral
    )


def judge_report(
    report: dict[str, Any],
    policy: TeePolicy,
    *,
    now_s: int,
    expected_report_data: bytes | None,
    fmspc: str | None = None,
    collateral: Collateral | None = None,
) -> Verdict:
    """Steps 3-5 on a report dcap-qvl has verified (its ``to_json()`` as a dict): the
    policy's part, separate so each rule can be tested on real report contents."""
    t = now_s

    def refuse(reason: RefusalReason, message: str, **found: Any) -> Verdict:
        return Verdict(reason, message, t, **found)

    found: dict[str, Any] = {
        "status": report["status"],
        "advisories": tuple(report.get("advisory_ids", ())),
        "fmspc": fmspc,
        "collateral_next_update": collateral.next_update if collateral is not None else None,
    }
    body = report["report"]
    if "TD10" in body or "TD15" in body:
        td = body.get("TD10") or body["TD15"]
        found["tee"] = "tdx"
        found["registers"] = {r: bytes.fromhex(td[r]) for r in MEASUREMENT_REGISTERS}
        found["report_data"] = bytes.fromhex(td["report_data"])
        found["debug"] = bool(bytes.fromhex(td["td_attributes"])[0] & _TD_DEBUG)
    else:
        enclave = body.get("SgxEnclave", {})
        found["tee"] = "sgx"
        found["report_data"] = bytes.fromhex(enclave["report_data"]) if "report_data" in enclave else None
        found["debug"] = bool(bytes.fromhex(enclave.get("attributes", "00"))[0] & _SGX_DEBUG)
    if found["tee"] != policy.tee:
        return refuse(RefusalReason.WRONG_TEE, f"a {found['tee']} quote where the policy wants {policy.tee}", **found)
    if found["status"] not in policy.accepted_status:
        accepted = ", ".join(sorted(policy.accepted_status))
        return refuse(RefusalReason.TCB_STATUS, f"TCB status {found['status']} (accepted: {accepted})", **found)
    unlisted = [a for a in found["advisories"] if a not in policy.accepted_advisories]
    if unlisted:
        return refuse(RefusalReason.ADVISORY, f"advisories not accepted: {', '.join(unlisted)}", **found)
    if found["debug"] and not policy.allow_debug:
        return refuse(RefusalReason.DEBUG, "a debug TD: the host can read its memory", **found)
    image = policy.image_for(found.get("registers", {}))
    found["image"] = image
    if image is None:
        digest = Verdict(None, "", t, registers=found.get("registers", {})).measurement
        shown = digest.hex()[:16] if digest else "?"
        return refuse(RefusalReason.MEASUREMENT, f"measurements {shown}... match no image of the policy", **found)
    if expected_report_data is not None and found["report_data"] != expected_report_data:
        if not policy.insecure_skip_binding_for_tests:
            return refuse(RefusalReason.NOT_BOUND, "REPORTDATA is not bound to this peer's key", **found)
    return Verdict(None, "accepted", t, **found)
