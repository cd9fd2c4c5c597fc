"""The read-ahead under py-libp2p's Noise reader: same bytes, fewer receive calls."""

from __future__ import annotations

import trio
import trio.testing
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection

from cocoon_p2p.host import ReadAheadConnection


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
    assert await conn.read(None) == b"xyz"  # a read without a size returns what is there
    assert conn.is_initiator is False and conn.get_connection_type() == ConnectionType.DIRECT
    await left.aclose()
    assert await conn.read(5) == b""  # end of stream passes through


async def test_yamux_frames_fit_one_noise_message(monkeypatch: object) -> None:
    """A 1 MiB write goes out as whole Noise messages, none split in two (stock py-libp2p
    sends 64 KiB + 12-byte frames, each split into a 65,519-byte and a 17-byte message)."""
    import math

    from libp2p.custom_types import TProtocol
    from libp2p.peer.id import ID

    from cocoon_p2p.node import Node

    from .netutil import fast_config

    sizes: list[int] = []
    original = ReadAheadConnection.write

    async def counting(self: ReadAheadConnection, data: bytes) -> None:
        if self.is_initiator:  # the sender's side (it dialled); the receiver sends window updates
            sizes.append(len(data))
        await original(self, data)

    monkeypatch.setattr(ReadAheadConnection, "write", counting)  # type: ignore[attr-defined]
    total, got = 1 << 20, trio.Event()

    async def sink(stream: object) -> None:
        n = 0
        while n < total:
            n += len(await stream.read(1 << 20))  # type: ignore[attr-defined]
        got.set()

    async with Node(fast_config()) as a, Node(fast_config()) as b:
        b.host.set_stream_handler(TProtocol("/test/sink/1"), sink)
        await a.connect(b.addrs[0])
        s = await a.host.new_stream(ID(b.peer_id), [TProtocol("/test/sink/1")])
        with trio.fail_after(10):
            sizes.clear()
            await s.write(b"\x5a" * total)
            await got.wait()
    full = [n for n in sizes if n > 60_000]
    assert len(full) == math.ceil(total / (65_519 - 12)) - 1 and all(n <= 2 + 65_535 for n in full)
    # A split frame's tail would be a 17-byte message: 2 (length) + 17 + 16 (tag) = 35 bytes.
    assert 35 not in sizes  # (12-byte yamux control frames are 30)
