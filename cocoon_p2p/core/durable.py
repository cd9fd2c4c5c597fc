"""Crash-safe file writes (a file is either its old or its new self, never half of each), and
reading state files back with a named error when they are damaged."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CocoonError


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created or renamed file) survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to a temporary file (``mode``), fsync it, rename it over ``path``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


RESTORE_ADVICE = "Restore it from a backup; do not delete it: the node would start over and forget what it records."


class StateFileDamaged(CocoonError):
    """A state file is truncated, corrupt or missing where others show it existed.

    The message names the file, what is wrong and what to do. The code never
    starts over with a fresh, empty state instead: where money is involved, that
    would forget it (a channel's deposit, a wallet's mnemonic).
    """

    code = "state-file-damaged"

    def __init__(self, path: Path, problem: str, advice: str = "") -> None:
        super().__init__(f"{path} is damaged ({problem}). {advice or RESTORE_ADVICE}")
        self.path = path


def read_json(path: Path, *, advice: str = "") -> Any:
    """The JSON value stored at ``path``; StateFileDamaged (naming the file) if it is not JSON.
    OSError (missing, unreadable) is left to the caller."""
    data = path.read_bytes()
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        problem = "empty" if not data.strip() else f"not JSON: {exc}"
        raise StateFileDamaged(path, problem, advice) from exc
