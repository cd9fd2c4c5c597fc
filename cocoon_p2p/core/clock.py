"""Wall-clock time as the protocols use it: integer milliseconds since the Unix epoch.

Every pure state machine takes ``now_ms`` as an argument; only the trio
services read the clock, and they read it here, so a simulator (or a test)
feeds the same machines its own virtual time.
"""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the Unix epoch (signed records, expiry, deadlines)."""
    return int(time.time() * 1000)
