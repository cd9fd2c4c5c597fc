"""The voucher write-ahead log: durable records survive reopen; a torn tail is cut; damage is refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cocoon_p2p.payments.voucherlog import LogCorrupted, OpenedReadOnly, TornTail, VoucherLog


def test_records_survive_reopen_and_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "ch" / "vouchers.log"
    log = VoucherLog(path)
    log.append([b"one", b"two"])
    log.append([b"three"])
    log.append([])
    assert log.fsyncs == 2
    log.close()
    again = VoucherLog(path)
    assert again.records == [b"one", b"two", b"three"]
    again.append([b"four"])
    again.close()
    assert VoucherLog(path).records == [b"one", b"two", b"three", b"four"]
    assert os.stat(path).st_mode & 0o077 == 0


def test_a_torn_last_record_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "v.log"
    log = VoucherLog(path)
    log.append([b"kept", b"also kept"])
    log.close()
    with path.open("ab") as f:  # a crash in the middle of the next append
        f.write((100).to_bytes(4, "big") + b"\x00\x00\x00\x00part")
    log = VoucherLog(path)
    assert log.records == [b"kept", b"also kept"]
    assert log.torn == TornTail(offset=2 * 8 + len(b"kept") + len(b"also kept"), length=12)  # reported
    log.append([b"next"])
    log.close()
    assert VoucherLog(path).records == [b"kept", b"also kept", b"next"]


def test_a_read_only_log_reports_a_torn_tail_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "v.log"
    log = VoucherLog(path)
    log.append([b"kept"])
    log.close()
    with path.open("ab") as f:  # an append in progress, seen by `cocoon-node status`
        f.write((100).to_bytes(4, "big") + b"\x00\x00\x00\x00part")
    before = path.read_bytes()
    peek = VoucherLog(path, read_only=True)
    assert peek.records == [b"kept"] and peek.torn == TornTail(offset=12, length=12)
    with pytest.raises(OpenedReadOnly):
        peek.append([b"x"])
    peek.close()
    assert path.read_bytes() == before
    assert VoucherLog(tmp_path / "absent.log", read_only=True).records == []
    assert not (tmp_path / "absent.log").exists()


def test_damage_before_good_records_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.log"
    log = VoucherLog(path)
    log.append([b"first record", b"second record"])
    log.close()
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF  # inside the first payload
    path.write_bytes(bytes(data))
    with pytest.raises(LogCorrupted):
        VoucherLog(path)


@pytest.mark.slow  # starts a process
def test_a_killed_writer_loses_nothing_it_reported_durable(tmp_path: Path) -> None:
    path = tmp_path / "v.log"
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from cocoon_p2p.payments.voucherlog import VoucherLog
        log = VoucherLog(Path({str(path)!r}))
        for i in range(1000):
            log.append([b"voucher %d" % i])
            print(i, flush=True)  # acknowledged only after the fsync
            if i == 300:
                os.kill(os.getpid(), 9)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    acked = [int(x) for x in out.stdout.split()]
    records = VoucherLog(path).records
    assert records[: len(acked)] == [b"voucher %d" % i for i in acked]
