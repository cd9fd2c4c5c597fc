"""Interop with js-libp2p: a real JS peer dials our node (TCP, Noise, yamux),
pings it, reads our protocols through identify; our node dials it back.

The npm packages are installed here, from tests/interop/package-lock.json, on
first run. Skipped, with the reason printed, only where ``node``/``npm`` is absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from cocoon_p2p.node import Node
from cocoon_p2p.overlay import protocols

from .netutil import fast_config

JS = Path(__file__).parent / "interop"

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def js_peer_dir() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: js-libp2p interop not tested here")
    if not (JS / "node_modules" / "libp2p").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS, check=True, timeout=600)
    return JS


async def _read_json_line(stream: trio.abc.ReceiveStream, buf: bytearray) -> dict[str, object]:
    while b"\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("js peer exited")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return json.loads(line)  # type: ignore[no-any-return]


async def test_js_libp2p_dials_pings_identifies_and_is_dialled_back(js_peer_dir: Path) -> None:
    async with Node(fast_config()) as node:
        proc = await trio.lowlevel.open_process(
            ["node", "--import", "./polyfill.mjs", "peer.mjs", node.addrs[0]],
            cwd=js_peer_dir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            buf = bytearray()
            with trio.fail_after(60):
                listen = await _read_json_line(proc.stdout, buf)
                result = await _read_json_line(proc.stdout, buf)
            print(f"js-libp2p ping rtt {result['ping_ms']} ms")
            assert result["remote_peer"] == node.peer_id_str
            assert isinstance(result["ping_ms"], (int, float))
            assert protocols.INFO_PROTOCOL in result["protocols"]  # type: ignore[operator]
            assert protocols.GOSSIPSUB_PROTOCOL in result["protocols"]  # type: ignore[operator]

            js_addr = str(listen["listen"])
            js_id = js_addr.rsplit("/p2p/", 1)[1]
            # Dial back: from our side, a fresh connection to the JS listener.
            async with Node(fast_config()) as second:
                with trio.fail_after(20):
                    await second.connect(js_addr)
                assert js_id in _connected_strs(second)
        finally:
            if proc.stdin is not None:
                await proc.stdin.aclose()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


def _connected_strs(node: Node) -> list[str]:
    from cocoon_p2p.core.identity import peer_id_to_str

    return [peer_id_to_str(p) for p in node.connected_peers()]
