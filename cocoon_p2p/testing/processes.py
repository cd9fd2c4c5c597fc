"""Node programs as child processes, for the demo, the emulation and the tests.

:func:`start_process` runs ``cocoon-node`` (as ``python -m cocoon_p2p.nodes.cli``
under the running interpreter) and waits until it has said where it listens.
"""

from __future__ import annotations

import subprocess
import sys

import trio

from cocoon_p2p.core.errors import CocoonError

NODE_CLI = (sys.executable, "-m", "cocoon_p2p.nodes.cli")


class ProcessFailed(CocoonError):
    """A node process exited before it was ready."""


async def start_process(
    cmd: list[str], nursery: trio.Nursery, wallets: list[str] | None = None
) -> tuple[trio.Process, list[str]]:
    """Start a node process; return it and its listen addresses once it prints them
    (and add the wallet address it prints to ``wallets``)."""
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    buf, addrs = b"", []
    while True:
        chunk = await proc.stdout.receive_some(4096)
        if not chunk:
            raise ProcessFailed(f"{cmd[3]} exited before it listened")
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            text = line.decode()
            if text.startswith("listening "):
                addrs.append(text.split()[1])
            elif text.startswith("wallet ") and wallets is not None:
                wallets.append(text.split()[1])
            elif text.startswith("serving ") or (addrs and cmd[3] == "bootstrap"):
                nursery.start_soon(_drain, proc.stdout)
                return proc, addrs
        if addrs and cmd[3] == "bootstrap":
            nursery.start_soon(_drain, proc.stdout)
            return proc, addrs


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(4096):
        pass
