"""Fetching collateral from a PCCS or Intel's PCS (an adapter: blocking network I/O).

dcap-qvl's fetcher is asyncio code; it runs here on a private event loop, so
callers (trio services) call :func:`fetch_collateral` in a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dcap_qvl

from .collateral import Collateral
from .errors import AttestationError, RefusalReason

INTEL_PCS_URL = str(dcap_qvl.INTEL_PCS_URL)


def fetch_collateral(pccs_url: str, quote: bytes, *, timeout_s: float = 20.0) -> Collateral:
    """The collateral for ``quote``'s platform from ``pccs_url`` (a PCCS, or Intel's PCS).
    AttestationError(NO_COLLATERAL) when it cannot be had."""

    async def fetch() -> Any:
        return await asyncio.wait_for(dcap_qvl.get_collateral(pccs_url, quote), timeout_s)

    try:
        got = asyncio.run(fetch())
        return Collateral.from_json(got.to_json())
    except AttestationError:
        raise
    except Exception as exc:  # the fetcher raises whatever its HTTP stack does
        raise AttestationError(RefusalReason.NO_COLLATERAL, f"no collateral from {pccs_url}: {exc}") from exc
