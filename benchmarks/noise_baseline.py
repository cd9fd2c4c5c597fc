"""The throughput baseline: bare trio TCP + noiseprotocol Noise_XX, no libp2p.

Same cipher suite libp2p's Noise uses (25519, ChaChaPoly, SHA256), frames of at
most 65535 bytes with a 2-byte length prefix, as in the libp2p Noise spec.
"""

from __future__ import annotations

import functools
import time

import trio
from noise.connection import Keypair, NoiseConnection

PROTOCOL = b"Noise_XX_25519_ChaChaPoly_SHA256"
CHUNK = 65535 - 16  # largest plaintext per frame


async def _send_frame(stream: trio.SocketStream, data: bytes) -> None:
    await stream.send_all(len(data).to_bytes(2, "big") + data)


async def _recv_exact(stream: trio.SocketStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = await stream.receive_some(1 << 20)
        if not chunk:
            raise EOFError
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _recv_frame(stream: trio.SocketStream, buf: bytearray) -> bytes:
    n = int.from_bytes(await _recv_exact(stream, 2, buf), "big")
    return await _recv_exact(stream, n, buf)


def _noise(initiator: bool) -> NoiseConnection:
    conn = NoiseConnection.from_name(PROTOCOL)
    conn.set_as_initiator() if initiator else conn.set_as_responder()
    import os

    conn.set_keypair_from_private_bytes(Keypair.STATIC, os.urandom(32))
    conn.start_handshake()
    return conn


async def measure(total_bytes: int) -> dict[str, float]:
    """Handshake time and MB/s for ``total_bytes`` over loopback."""
    done = trio.Event()
    received = [0]

    async def serve(stream: trio.SocketStream) -> None:
        buf = bytearray()
        conn = _noise(False)
        conn.read_message(await _recv_frame(stream, buf))
        await _send_frame(stream, conn.write_message())
        conn.read_message(await _recv_frame(stream, buf))
        while received[0] < total_bytes:
            received[0] += len(conn.decrypt(await _recv_frame(stream, buf)))
        await _send_frame(stream, conn.encrypt(b"ok"))
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        t0 = time.perf_counter()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buf = bytearray()
        conn = _noise(True)
        await _send_frame(stream, conn.write_message())
        conn.read_message(await _recv_frame(stream, buf))
        await _send_frame(stream, conn.write_message())
        handshake_ms = (time.perf_counter() - t0) * 1000
        payload = b"\x5a" * CHUNK
        t1 = time.perf_counter()
        sent = 0
        while sent < total_bytes:
            piece = payload[: min(CHUNK, total_bytes - sent)]
            await _send_frame(stream, conn.encrypt(piece))
            sent += len(piece)
        conn.decrypt(await _recv_frame(stream, buf))
        elapsed = time.perf_counter() - t1
        await done.wait()
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return {"handshake_ms": handshake_ms, "mb_per_s": total_bytes / elapsed / 1e6}
