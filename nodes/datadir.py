"""One node per data directory: a lock held for the node's life.

Two nodes on one folder would share a PeerId and write the same voucher logs, channel
store and bills: each would overwrite the other's records of money. The lock is an
``flock`` on ``<data-dir>/lock`` (released by the kernel when the process dies, even by
SIGKILL, so a crash never leaves a stale lock), and the file names the holder's pid for
the error message. ``cocoon-node status`` takes no lock: it only reads.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cocoon_p2p.core.errors import ConfigError

LOCK_FILE = "lock"


class DataDirInUse(ConfigError):
    """Another running node holds this data directory."""


@contextmanager
def locked(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir`` (created if need be) for the ``with`` block; DataDirInUse, naming
    the holder's pid, when another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataDirInUse(
                f"{data_dir} is in use by another node (pid {holder}): give each node a data directory of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
