"""One node per data directory: the lock, in process and between real node processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cocoon_p2p.nodes.datadir import DataDirInUse, locked

from .crashnet import wait_line

CLI = [sys.executable, "-m", "cocoon_p2p.nodes.cli"]


def test_a_held_data_directory_is_refused_naming_its_holder(tmp_path: Path) -> None:
    d = tmp_path / "node"
    with locked(d):
        with pytest.raises(DataDirInUse, match=f"in use by another node \\(pid {os.getpid()}\\)"):
            with locked(d):
                pass
    with locked(d):  # released on leaving
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    code = (
        "import time; from pathlib import Path; from cocoon_p2p.nodes.datadir import locked\n"
        f"with locked(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(DataDirInUse, match=f"pid {holder.pid}"):
            with locked(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with locked(tmp_path):  # the kernel released it with the process
        pass


@pytest.mark.slow
def test_a_second_node_on_a_running_nodes_data_directory_exits_and_status_still_reads_it(tmp_path: Path) -> None:
    d = str(tmp_path / "node")
    first = subprocess.Popen([*CLI, "bootstrap", "--data-dir", d, "--log-level", "WARNING"], stdout=subprocess.PIPE)
    try:
        wait_line(first, b"listening ")
        second = subprocess.run([*CLI, "bootstrap", "--data-dir", d], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"in use by another node (pid {first.pid})" in second.stderr
        status = subprocess.run([*CLI, "status", "--data-dir", d], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "peer id" in status.stdout  # read-only: no lock needed
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
