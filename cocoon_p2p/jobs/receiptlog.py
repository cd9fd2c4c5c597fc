"""The receipts of the jobs a client paid for, on disk and bounded.

Each receipt is a record: a 2-byte big-endian length, then :meth:`Receipt.encode`.
The file grows to ``max_bytes``, then becomes ``<name>.1`` (replacing the previous
one) and a new file starts: at most twice ``max_bytes`` on disk, the newest
receipts kept. Receipts are evidence, not money: they are flushed, not fsynced, and
a torn last record (a crash mid-write) is skipped when read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from cocoon_p2p.core.errors import ProtocolError

from .receipts import MAX_RECEIPT_BYTES, Receipt, decode_receipt

DEFAULT_MAX_BYTES = 16 * 1024 * 1024  # about 70,000 receipts per file


class ReceiptLog:
    """Append-only, rotating file of verified receipts."""

    def __init__(self, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "ab")  # noqa: SIM115 - kept open for the node's life
        self.written = 0

    def append(self, receipt: Receipt) -> None:
        data = receipt.encode()
        self._file.write(len(data).to_bytes(2, "big") + data)
        self._file.flush()
        self.written += 1
        if self._file.tell() >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        self._file = open(self.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        self._file.close()

    def __iter__(self) -> Iterator[Receipt]:
        """Every readable receipt, oldest first (the rotated file, then the current one)."""
        for path in (self.path.with_name(self.path.name + ".1"), self.path):
            yield from read_receipts(path)


def read_receipts(path: Path) -> Iterator[Receipt]:
    """The receipts in one file; a torn or damaged record ends the file there."""
    if not path.is_file():
        return
    data = path.read_bytes()
    at = 0
    while at + 2 <= len(data):
        size = int.from_bytes(data[at : at + 2], "big")
        if size > MAX_RECEIPT_BYTES or at + 2 + size > len(data):
            return
        try:
            yield decode_receipt(data[at + 2 : at + 2 + size])
        except ProtocolError:
            return
        at += 2 + size
