"""A worker's channels on disk: accepted vouchers survive restarts and kill -9; earnings intact."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from cocoon_p2p.core.durable import StateFileDamaged
from cocoon_p2p.payments.channelstate import ChannelEvent, ChannelState
from cocoon_p2p.payments.errors import ChannelConflict, UnknownChannel
from cocoon_p2p.payments.store import ChannelStore, ChannelTerms
from cocoon_p2p.payments.voucherlog import OpenedReadOnly
from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody

A = SigningKey(bytes([1]) * 32)
TERMS = ChannelTerms(channel_id=0xC0C0A, payer_key=bytes(A.verify_key), deposit_a=10**9)


def voucher(seqno: int, sent: int):  # type: ignore[no-untyped-def]
    return SemiChannel(TERMS.channel_id, SemiChannelBody(seqno, sent)).sign(A)


def test_accepts_refuses_and_recovers(tmp_path: Path) -> None:
    store = ChannelStore(tmp_path)
    store.open(TERMS)
    store.open(TERMS)  # idempotent
    r = store.accept(TERMS.channel_id, [(voucher(1, 100), 100), (voucher(1, 200), 100), (voucher(2, 300), 200)])
    assert [v.state.body.seqno for v in r.vouchers] == [1, 2] and r.added_nanoton == 300
    assert len(r.refused) == 1  # the replayed seqno
    store.close()
    again = ChannelStore(tmp_path)
    assert again.earned(TERMS.channel_id) == 300
    assert again.newest(TERMS.channel_id) == voucher(2, 300)
    with pytest.raises(ChannelConflict):
        again.open(ChannelTerms(TERMS.channel_id, TERMS.payer_key, deposit_a=1))
    with pytest.raises(UnknownChannel):
        again.accept(TERMS.channel_id + 1, [(voucher(3, 400), 100)])


@pytest.mark.slow  # starts a process
def test_kill_minus_nine_loses_no_acknowledged_voucher(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from nacl.signing import SigningKey
        from cocoon_p2p.payments.store import ChannelStore, ChannelTerms
        from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody
        A = SigningKey(bytes([1]) * 32)
        terms = ChannelTerms(channel_id=0xC0C0A, payer_key=bytes(A.verify_key), deposit_a=10**9)
        store = ChannelStore(Path({str(tmp_path)!r}))
        store.open(terms)
        for batch in range(100):
            vs = [SemiChannel(terms.channel_id, SemiChannelBody(batch * 10 + i + 1, (batch * 10 + i + 1) * 7))
                  .sign(A) for i in range(10)]
            store.accept(terms.channel_id, [(v, 7) for v in vs])
            print(store.earned(terms.channel_id), flush=True)  # acknowledged
            if batch == 37:
                os.kill(os.getpid(), 9)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    acked = [int(x) for x in out.stdout.split()]
    assert acked and acked[-1] == 380 * 7
    assert ChannelStore(tmp_path).earned(TERMS.channel_id) == acked[-1]


def test_what_jobs_cost_is_written_in_batches_and_restored(tmp_path: Path) -> None:
    store = ChannelStore(tmp_path)
    store.open(TERMS)
    store.bill(TERMS.channel_id, 100)
    store.bill(TERMS.channel_id, 50)
    batch = store.take_unwritten_bills()
    assert batch == {TERMS.channel_id: 150} and store.take_unwritten_bills() == {}
    store.write_bills(batch)
    store.bill(TERMS.channel_id, 25)  # not yet written: a kill -9 now forgets it
    assert ChannelStore(tmp_path, read_only=True).billed(TERMS.channel_id) == 150
    store.flush_bills()
    store.close()
    again = ChannelStore(tmp_path)
    assert again.billed(TERMS.channel_id) == 175 and again.earned(TERMS.channel_id) == 0
    again.close()


def test_a_read_only_store_writes_nothing(tmp_path: Path) -> None:
    store = ChannelStore(tmp_path)
    store.open(TERMS)
    store.close()
    peek = ChannelStore(tmp_path, read_only=True)
    with pytest.raises(OpenedReadOnly):
        peek.advance(TERMS.channel_id, ChannelEvent.CLOSE_PROPOSED)
    with pytest.raises(OpenedReadOnly):
        peek.accept(TERMS.channel_id, [(voucher(1, 100), 0)])
    peek.close()
    assert ChannelStore(tmp_path).state(TERMS.channel_id) is ChannelState.OPEN


@pytest.mark.parametrize("name", ["channel.json", "state.json", "billed.json"])
def test_a_damaged_channel_file_is_named(tmp_path: Path, name: str) -> None:
    store = ChannelStore(tmp_path)
    store.open(TERMS)
    store.bill(TERMS.channel_id, 1)
    store.flush_bills()
    store.close()
    path = tmp_path / f"{TERMS.channel_id:032x}" / name
    path.write_bytes(path.read_bytes()[:7])
    with pytest.raises(StateFileDamaged, match=name):
        ChannelStore(tmp_path)
