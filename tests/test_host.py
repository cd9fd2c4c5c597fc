"""The read-ahead under py-libp2p's Noise handshake: same bytes, fewer receive calls,
and what was read ahead is handed on."""

from __future__ import annotations

import trio
import trio.testing
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection

from cocoon_p2p.transport.host import ReadAheadConnection


class _Stream:
    """A trio stream as py-libp2p's ReadWriteCloser, counting receive calls."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reads = 0

    async def read(self, n: int | None = None) -> bytes:
        self.reads += 1
        return await self.stream.receive_some(n)

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    def get_remote_address(self) -> tuple[str, int] | None:
        return ("127.0.0.1", 1)


async def test_small_reads_are_served_from_one_receive() -> None:
    left, right = trio.testing.memory_stream_pair()
    raw = _Stream(right)
    conn = ReadAheadConnection(RawConnection(raw, initiator=False))  # type: ignore[arg-type]
    frames = b"".join(len(body).to_bytes(2, "big") + body for body in (b"a" * 10, b"b" * 300, b"c"))
    await left.send_all(frames)
    got = []
    for _ in range(3):  # what the Noise reader does: a 2-byte length, then the body
        size = int.from_bytes(await conn.read(2), "big")
        got.append(await conn.read(size))
    assert got == [b"a" * 10, b"b" * 300, b"c"]
    assert raw.reads == 1
    await left.send_all(b"xyz")
    assert await conn.read(1) == b"x"
    assert conn.unread()[1] == b"yz"  # what the session after the handshake must see first
    assert await conn.read(None) == b"yz"  # a read without a size returns what is there
    assert conn.is_initiator is False and conn.get_connection_type() == ConnectionType.DIRECT
    await left.aclose()
    assert await conn.read(5) == b""  # end of stream passes through


async def test_a_stream_to_a_peer_whose_connection_is_closing_dials_it_again() -> None:
    """The window between a connection's close beginning (``is_closed``) and the swarm
    dropping it from its list: py-libp2p's new_stream failed there with "No valid
    connections available" instead of dialing (a CI run lost a job to it)."""
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    from cocoon_p2p.node import Node, NodeConfig

    echo = TProtocol("/cocoon/test-echo/1")

    async def handler(stream: object) -> None:
        await stream.write(await stream.read(4))  # type: ignore[attr-defined]
        await stream.close()  # type: ignore[attr-defined]

    async with Node(NodeConfig()) as a, Node(NodeConfig()) as b:
        b.host.set_stream_handler(echo, handler)
        await a.host.connect(info_from_p2p_addr(Multiaddr(b.addrs[0])))
        swarm = a.host.get_network()
        (conn,) = swarm.get_connections(b.host.get_id())
        conn.event_closed.set()  # type: ignore[attr-defined]  # its close has begun: still listed
        with trio.fail_after(10):
            stream = await a.host.new_stream(b.host.get_id(), [echo])
            await stream.write(b"ping")
            assert await stream.read(4) == b"ping"
        assert conn not in swarm.get_connections(b.host.get_id())
