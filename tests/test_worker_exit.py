"""A worker's exit: with ``settle_on_exit = false`` a SIGTERM restart pays no on-chain fees and
keeps every earning; the channel is settled later, as usual. Real processes, local chain."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cocoon_p2p.payments.chain import read_channel
from cocoon_p2p.payments.channelstate import ChannelState
from cocoon_p2p.payments.settlement import OPEN
from cocoon_p2p.testing.localchain import open_local_chain

from .crashnet import JOB, Net, audit, ok

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("node") is None, reason="the local chain needs Node.js"),
]


def test_a_restart_without_settling_keeps_the_channel_open_and_its_earnings(tmp_path: Path) -> None:
    with open_local_chain() as chain:
        net = Net(chain, tmp_path)
        toml = tmp_path / "worker" / "worker.toml"
        toml.write_text(toml.read_text() + "settle_on_exit = false\ndrain_s = 5.0\n")
        net.start_worker()
        try:
            ok(net.client())
            assert net.stop_worker() == 0  # SIGTERM: drained, nothing closed
            store = net.worker_store()
            try:
                ((cid, ch),) = store.channels.items()
                assert store.state(cid) is ChannelState.OPEN and store.earned(cid) == JOB
                address = ch.terms.address
            finally:
                store.close()
            chain.settle()
            assert read_channel(chain, address).state == OPEN  # no close went on chain
            net.start_worker()  # back from its data directory: the same channel goes on
            ok(net.client(settle=True))  # the client settles it, cooperatively
            assert net.stop_worker() == 0
        finally:
            net.kill_all()
        audit(net, paid_jobs=2)
