"""A write-ahead log for vouchers: durable before acknowledged, group-committed.

A worker must never acknowledge a voucher (and so a job's payment) that a crash
could lose. :meth:`VoucherLog.append` writes a batch of records and fsyncs once:
an fsync costs a fraction of a millisecond, so one per voucher would cap a
worker at a few thousand vouchers a second, while a batch of everything that
arrived meanwhile keeps the same guarantee at a fraction of the cost.

Record: 4-byte big-endian length, 4-byte CRC32 of the payload, the payload (a
voucher's :meth:`~.vouchers.SignedSemiChannel.to_record`). On open, the log is
replayed; a torn last record (the crash came mid-write, so it was never
acknowledged) is cut off, while a bad record followed by good ones means the
file was damaged and is refused.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from cocoon_p2p.core.durable import fsync_dir
from cocoon_p2p.core.errors import CocoonError

HEADER = 8
MAX_RECORD = 64 * 1024


class LogCorrupted(CocoonError):
    """A record in the middle of the log fails its checksum: the file was damaged."""


class RecordTooLarge(CocoonError):
    """A record over :data:`MAX_RECORD` bytes was given to :meth:`VoucherLog.append`."""


class VoucherLog:
    """An append-only file of records; ``records`` holds what was durable at open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records, good_end = self._replay(path) if not created else ([], 0)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, good_end)  # drop a torn tail, never acknowledged
        os.lseek(self._fd, good_end, os.SEEK_SET)
        if created:
            os.fsync(self._fd)
            fsync_dir(path.parent)  # the file itself must survive a crash too
        self.fsyncs = 0

    @staticmethod
    def _replay(path: Path) -> tuple[list[bytes], int]:
        data = path.read_bytes()
        records, pos = [], 0
        while pos + HEADER <= len(data):
            size = int.from_bytes(data[pos : pos + 4], "big")
            crc = int.from_bytes(data[pos + 4 : pos + 8], "big")
            end = pos + HEADER + size
            if size > MAX_RECORD or end > len(data) or zlib.crc32(data[pos + HEADER : end]) != crc:
                if end < len(data) and size <= MAX_RECORD:
                    raise LogCorrupted(f"{path}: damaged record at byte {pos}, with records after it")
                break  # the torn last record of a crash
            records.append(data[pos + HEADER : end])
            pos = end
        return records, pos

    def append(self, payloads: list[bytes]) -> None:
        """Write ``payloads`` and make them durable (one fsync). Only then acknowledge them.
        RecordTooLarge (nothing written) if one exceeds :data:`MAX_RECORD`."""
        if not payloads:
            return
        blob = bytearray()
        for p in payloads:
            if len(p) > MAX_RECORD:
                raise RecordTooLarge(f"record of {len(p)} bytes exceeds {MAX_RECORD}")
            blob += len(p).to_bytes(4, "big") + zlib.crc32(p).to_bytes(4, "big") + p
        view = memoryview(blob)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.fsyncs += 1

    def close(self) -> None:
        """Close the file (the log is unusable after)."""
        os.close(self._fd)
