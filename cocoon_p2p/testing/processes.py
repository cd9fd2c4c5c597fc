"""Node programs as child processes, for the demo, the emulation and the tests.

:func:`start_node` runs ``cocoon-node`` (as ``python -m cocoon_p2p.nodes.cli``
under the running interpreter) and waits until it serves, keeping what it said.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field

import trio

from cocoon_p2p.core.errors import CocoonError

NODE_CLI = (sys.executable, "-m", "cocoon_p2p.nodes.cli")


class ProcessFailed(CocoonError):
    """A node process exited before it was ready."""


LOOPBACK_LISTEN = "/ip4/127.0.0.1/tcp/0"


def local_env() -> dict[str, str]:
    """The environment for the node processes of a network on this one machine: they
    listen on loopback at free ports (not at a worker's default ``0.0.0.0:4001``, which
    only one process can hold), unless ``$COCOON_LISTEN`` says otherwise."""
    return {**os.environ, "COCOON_LISTEN": os.environ.get("COCOON_LISTEN", LOOPBACK_LISTEN)}


@dataclass
class Started:
    """A node process that is ready: its listen addresses and, by first word, the first
    line of each kind it printed before it was (``metrics ...``, ``cheating ...``)."""

    proc: trio.Process
    addrs: list[str]
    said: dict[str, str] = field(default_factory=dict)


async def start_node(cmd: list[str], nursery: trio.Nursery, wallets: list[str] | None = None) -> Started:
    """Start a node process and return once it serves (a bootstrap peer: once it listens).
    The wallet address it prints goes to ``wallets``."""
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE, env=local_env())
    assert proc.stdout is not None
    buf, started = b"", Started(proc, [])
    while True:
        chunk = await proc.stdout.receive_some(4096)
        if not chunk:
            raise ProcessFailed(f"{cmd[3]} exited before it served")
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            text = line.decode()
            word = text.split(" ", 1)[0]
            started.said.setdefault(word, text)
            if word == "listening":
                started.addrs.append(text.split()[1])
            elif word == "wallet" and wallets is not None:
                wallets.append(text.split()[1])
        if "serving" in started.said or (started.addrs and cmd[3] == "bootstrap"):
            nursery.start_soon(_drain, proc.stdout)  # a full pipe would block the node
            return started


async def start_process(
    cmd: list[str], nursery: trio.Nursery, wallets: list[str] | None = None
) -> tuple[trio.Process, list[str]]:
    """:func:`start_node`, as the process and its listen addresses."""
    started = await start_node(cmd, nursery, wallets)
    return started.proc, started.addrs


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(4096):
        pass
