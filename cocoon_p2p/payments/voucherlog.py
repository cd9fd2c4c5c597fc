"""A write-ahead log for vouchers: durable before acknowledged, group-committed.

A worker must never acknowledge a voucher (and so a job's payment) that a crash
could lose. :meth:`VoucherLog.append` writes a batch of records and fsyncs once:
an fsync costs a fraction of a millisecond, so one per voucher would cap a
worker at a few thousand vouchers a second, while a batch of everything that
arrived meanwhile keeps the same guarantee at a fraction of the cost.

Record: 4-byte big-endian length, 4-byte CRC32 of the payload, the payload (a
voucher's :meth:`~.vouchers.SignedSemiChannel.to_record`). On open, the log is
replayed; a bad record followed by good ones means the file was damaged and is
refused (:class:`LogCorrupted`). A torn last record is reported (``torn``, and a
warning naming the file) and cut off; the last complete voucher is kept.

Whether the torn voucher matters: after a crash mid-write it was never
acknowledged, nor sent (the client logs before it sends), so nothing is lost.
If the file was cut after the fact, a voucher that counted is gone. Vouchers
are cumulative, so nobody pays twice for it: a worker (``vouchers.log``) holds
the previous total until the client's next voucher, which carries the lost
amount with it (only a close before that next voucher loses it); a client
(``issued.log``) continues from the previous voucher, so its next one reuses
the lost seqno (refused as replayed) and pays a total short by the lost
amount: the worker counts it as owed, against the client's credit limit.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from cocoon_p2p.core.durable import fsync_dir
from cocoon_p2p.core.errors import CocoonError

log = logging.getLogger(__name__)
HEADER = 8
MAX_RECORD = 64 * 1024


class LogCorrupted(CocoonError):
    """A record in the middle of the log fails its checksum: the file was damaged."""

    code = "log-corrupted"


class RecordTooLarge(CocoonError):
    """A record over :data:`MAX_RECORD` bytes was given to :meth:`VoucherLog.append`."""


class OpenedReadOnly(CocoonError):
    """A write to a log (or a channel store) opened ``read_only``."""


@dataclass(frozen=True)
class TornTail:
    """An incomplete last record: where it starts and how many bytes of it are there."""

    offset: int
    length: int

    def describe(self, path: Path, kept: int) -> str:
        return (
            f"{path}: torn last record ({self.length} bytes at byte {self.offset}: a crash mid-write, or a cut "
            f"file), not counted; the {kept} complete record(s) before it are"
        )


class VoucherLog:
    """An append-only file of records; ``records`` holds what was durable at open.

    ``read_only``: look without changing the file (a torn tail is reported, not cut),
    as ``cocoon-node status`` does beside a running node; :meth:`append` then raises.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        created = not path.exists()
        self.torn: TornTail | None = None
        if read_only:
            self.records, _ = self._replay(path) if not created else ([], 0)
            self._fd = -1
            self.fsyncs = 0
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records, good_end = self._replay(path) if not created else ([], 0)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, good_end)  # drop a torn tail, never acknowledged
        os.lseek(self._fd, good_end, os.SEEK_SET)
        if created:
            os.fsync(self._fd)
            fsync_dir(path.parent)  # the file itself must survive a crash too
        self.fsyncs = 0

    def _replay(self, path: Path) -> tuple[list[bytes], int]:
        data = path.read_bytes()
        records, pos = [], 0
        while pos + HEADER <= len(data):
            size = int.from_bytes(data[pos : pos + 4], "big")
            crc = int.from_bytes(data[pos + 4 : pos + 8], "big")
            end = pos + HEADER + size
            if size > MAX_RECORD or end > len(data) or zlib.crc32(data[pos + HEADER : end]) != crc:
                if end < len(data) and size <= MAX_RECORD:
                    raise LogCorrupted(
                        f"{path}: damaged record at byte {pos}, with records after it. Keep the file as it is "
                        "(it holds signed vouchers) and restore it from a backup: a node cannot tell which "
                        "of its vouchers still count"
                    )
                break  # the torn last record of a crash
            records.append(data[pos + HEADER : end])
            pos = end
        if pos < len(data):
            self.torn = TornTail(pos, len(data) - pos)
            log.warning("%s", self.torn.describe(path, len(records)))
        return records, pos

    def append(self, payloads: list[bytes]) -> None:
        """Write ``payloads`` and make them durable (one fsync). Only then acknowledge them.
        RecordTooLarge (nothing written) if one exceeds :data:`MAX_RECORD`."""
        if self.read_only:
            raise OpenedReadOnly(f"{self.path} was opened read-only")
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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
