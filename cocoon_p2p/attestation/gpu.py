"""An optional second claim: the worker's NVIDIA GPU runs in confidential-computing mode.

Separate from the TDX quote and weaker: the GPU's evidence is checked here, on
the worker, by NVIDIA's local verifier (``nv-attestation-sdk``, which also
fetches NVIDIA's reference measurements and revocation status over the
network), and a client sees only the outcome the worker reports. So a client
may prefer workers that claim a CC-mode GPU, but must not treat the claim as
proved the way a verified TDX quote is. Everything here is optional: without
the SDK (it brings ``nvidia-ml-py``), without an NVIDIA GPU, or with CC mode
off, :func:`collect_gpu_claim` returns None and logs why.

An adapter (NVML, the SDK); BLOCKING, run it in a thread.
"""

from __future__ import annotations

import enum
import importlib
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core.errors import MalformedMessage

log = logging.getLogger(__name__)
MAX_DETAIL_CHARS = 512  # keeps the JSON well under the evidence's 4 KiB for the GPU claim


class GpuCcMode(enum.Enum):
    """The GPU's confidential-computing mode, as NVML reports it."""

    ON = "on"  # CC on: bus encryption, no debugging or profiling
    DEVTOOLS = "devtools"  # CC on with debugging and profiling allowed: not confidential
    OFF = "off"


@dataclass(frozen=True, kw_only=True)
class GpuCcClaim:
    """What the worker says about its GPU: a self-reported claim, not a proof."""

    model: str  # e.g. "NVIDIA H100 80GB HBM3"
    cc_mode: GpuCcMode
    driver_version: str
    verified: bool  # NVIDIA's local verifier accepted the GPU's evidence on this machine
    detail: str  # why (not) verified, for logs and operators

    def to_json(self) -> str:
        """The claim as the evidence's ``gpu`` field carries it: compact JSON, sorted keys."""
        return json.dumps(
            {
                "model": self.model[:MAX_DETAIL_CHARS],
                "cc_mode": self.cc_mode.value,
                "driver_version": self.driver_version[:MAX_DETAIL_CHARS],
                "verified": self.verified,
                "detail": self.detail[:MAX_DETAIL_CHARS],
            },
            separators=(",", ":"),
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> GpuCcClaim:
        """Parse a peer's claim; MalformedMessage if it is not one."""
        try:
            obj = json.loads(text)
            fields = {k: obj[k] for k in ("model", "driver_version", "detail", "verified", "cc_mode")}
            mode = GpuCcMode(fields.pop("cc_mode"))
        except (ValueError, TypeError, KeyError) as e:
            raise MalformedMessage(f"not a GPU CC claim: {e}") from None
        if not isinstance(fields["verified"], bool) or not all(
            isinstance(fields[k], str) for k in ("model", "driver_version", "detail")
        ):
            raise MalformedMessage("not a GPU CC claim: a field has the wrong type")
        return cls(cc_mode=mode, **fields)


def _import(name: str) -> Any:
    # By name: optional dependencies, typed as Any whether installed or not.
    return importlib.import_module(name)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _read_nvml() -> tuple[str, str, GpuCcMode] | None:
    """(model of GPU 0, driver version, CC mode), or None (logged) without a usable NVIDIA GPU."""
    try:
        nvml = _import("pynvml")
    except ImportError:
        log.info("no GPU CC claim: nvidia-ml-py is not installed")
        return None
    try:
        nvml.nvmlInit()
    except Exception as e:  # NVMLError: no driver, no library
        log.info("no GPU CC claim: NVML unavailable (%s)", e)
        return None
    try:
        if nvml.nvmlDeviceGetCount() == 0:
            log.info("no GPU CC claim: no NVIDIA GPU")
            return None
        model = _text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(0)))
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        try:
            state = nvml.nvmlSystemGetConfComputeState()
        except Exception as e:  # NVMLError_NotSupported on GPUs and drivers without CC
            log.info("no GPU CC claim: %s reports no confidential-computing state (%s)", model, e)
            return None
        if state.ccFeature != nvml.NVML_CC_SYSTEM_FEATURE_ENABLED:
            mode = GpuCcMode.OFF
        elif state.devToolsMode == nvml.NVML_CC_SYSTEM_DEVTOOLS_MODE_ON:
            mode = GpuCcMode.DEVTOOLS
        else:
            mode = GpuCcMode.ON
        return model, driver, mode
    except Exception as e:
        log.info("no GPU CC claim: NVML query failed (%s)", e)
        return None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # shutting down is best effort
            pass


def _attest_locally(sdk: Any) -> tuple[bool, str]:
    """Run NVIDIA's local GPU verifier: (accepted, detail)."""
    client = sdk.Attestation()
    client.clear_verifiers()  # Attestation is a process-wide singleton: drop verifiers of earlier calls
    client.set_name("cocoon-worker")
    client.set_nonce(secrets.token_hex(32))
    client.add_verifier(sdk.Devices.GPU, sdk.Environment.LOCAL, "", "")
    evidence = client.get_evidence()
    if not evidence:
        return False, "the SDK collected no GPU evidence"
    if client.attest(evidence):
        return True, "NVIDIA local verifier accepted the GPU evidence"
    return False, "NVIDIA local verifier refused the GPU evidence"


def collect_gpu_claim() -> GpuCcClaim | None:
    """The GPU's CC claim, or None (with the reason logged) without the SDK or a CC-mode GPU.

    BLOCKING: the SDK talks to the GPU and to NVIDIA's services (seconds).
    A GPU in CC mode whose evidence fails still yields a claim, with
    ``verified=False`` and the reason in ``detail``.
    """
    try:
        sdk = _import("nv_attestation_sdk.attestation")
    except ImportError:
        log.info("no GPU CC claim: nv-attestation-sdk is not installed (pip install nv-attestation-sdk)")
        return None
    except Exception as e:  # the SDK configures logging and reads files on import
        log.info("no GPU CC claim: nv-attestation-sdk failed to load (%s)", e)
        return None
    found = _read_nvml()
    if found is None:
        return None
    model, driver, mode = found
    if mode is GpuCcMode.OFF:
        log.info("no GPU CC claim: confidential computing is off on %s", model)
        return None
    try:
        verified, detail = _attest_locally(sdk)
    except Exception as e:  # the SDK raises whatever its verifier raises
        verified, detail = False, f"GPU attestation failed: {type(e).__name__}: {e}"
    if mode is GpuCcMode.DEVTOOLS:
        detail += "; devtools mode: GPU memory is open to debugging"
    return GpuCcClaim(model=model, cc_mode=mode, driver_version=driver, verified=verified, detail=detail)
