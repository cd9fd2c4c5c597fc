"""Our yamux and Noise data path between real peers on 127.0.0.1."""

from __future__ import annotations

import os
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID
from noise.connection import Keypair, NoiseConnection

from cocoon_p2p.node import Node
from cocoon_p2p.transport.fastlock import FastLock
from cocoon_p2p.transport.host import use_own_yamux
from cocoon_p2p.transport.muxer import YamuxMuxer
from cocoon_p2p.transport.noise import MAX_PLAINTEXT, NoiseCipher, NoiseDecryptError, NoiseSession

from .netutil import fast_config

ECHO = TProtocol("/test/echo/1")


# -- NoiseCipher (no sockets) --------------------------------------------------


def _handshake() -> tuple[NoiseConnection, NoiseConnection]:
    """Two noiseprotocol connections after an XX handshake, as libp2p runs it."""
    ends = []
    for initiator in (True, False):
        conn = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
        conn.set_as_initiator() if initiator else conn.set_as_responder()
        conn.set_keypair_from_private_bytes(Keypair.STATIC, os.urandom(32))
        conn.start_handshake()
        ends.append(conn)
    i, r = ends
    r.read_message(i.write_message())
    i.read_message(r.write_message())
    r.read_message(i.write_message())
    return i, r


def _frames(conn: NoiseConnection, data: bytes) -> bytes:
    out = b""
    for k in range(0, len(data), MAX_PLAINTEXT):
        sealed = conn.encrypt(data[k : k + MAX_PLAINTEXT])
        out += len(sealed).to_bytes(2, "big") + sealed
    return out


def test_cipher_speaks_noiseprotocol_both_ways() -> None:
    i, r = _handshake()
    ours = NoiseCipher.from_noise_state(type("S", (), {"noise_protocol": i.noise_protocol})())
    payload = os.urandom(200_000)
    wire = ours.encrypt(payload)
    # noiseprotocol (what py-libp2p and the baseline use) reads our messages ...
    got, pos = b"", 0
    while pos < len(wire):
        n = int.from_bytes(wire[pos : pos + 2], "big")
        assert n <= 65535
        got += r.decrypt(wire[pos + 2 : pos + 2 + n])
        pos += 2 + n
    assert got == payload
    # ... and we read its messages, fed in arbitrary pieces.
    theirs = _frames(r, payload)
    pieces = [theirs[k : k + 7777] for k in range(0, len(theirs), 7777)]
    assert b"".join(ours.feed(p) for p in pieces) == payload
    assert ours.encrypt(b"") == b""  # py-libp2p would read an empty message as end of stream


def test_cipher_rejects_tampering_and_short_messages() -> None:
    key = os.urandom(32)
    a, b = NoiseCipher(key, key), NoiseCipher(key, key)
    wire = bytearray(a.encrypt(b"hello"))
    wire[5] ^= 1
    with pytest.raises(NoiseDecryptError):
        b.feed(bytes(wire))
    with pytest.raises(NoiseDecryptError):
        NoiseCipher(key, key).feed(b"\x00\x03abc")
    replayed = NoiseCipher(key, key)
    msg = NoiseCipher(key, key).encrypt(b"once")
    replayed.feed(msg)
    with pytest.raises(NoiseDecryptError):  # the nonce moved on: a replay fails
        replayed.feed(msg)
    assert ChaCha20Poly1305  # the cipher libp2p's Noise suite names


# -- the muxer between two nodes -------------------------------------------------


class _TcpLike:
    """Just enough of py-libp2p's raw TCP connection for a :class:`NoiseSession` to take its socket."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.stream = type("TrioTCPStream", (), {})()
        self.stream.stream = trio.SocketStream(sock)

    async def close(self) -> None:
        await self.stream.stream.aclose()


def _session_pair() -> tuple[NoiseSession, NoiseSession]:
    """Two ends of a socket pair, each a NoiseSession with the other's keys."""
    from libp2p.crypto.ed25519 import create_new_key_pair

    ka, kb = os.urandom(32), os.urandom(32)
    keys = [create_new_key_pair(os.urandom(32)) for _ in range(2)]
    ends = []
    for (mine, theirs), sock, (send, recv) in zip(
        ((keys[0], keys[1]), (keys[1], keys[0])), trio.socket.socketpair(), ((ka, kb), (kb, ka)), strict=True
    ):
        ends.append(
            NoiseSession(
                local_peer=ID.from_pubkey(mine.public_key),
                local_private_key=mine.private_key,
                remote_peer=ID.from_pubkey(theirs.public_key),
                remote_permanent_pubkey=theirs.public_key,
                is_initiator=not ends,
                raw=_TcpLike(sock),  # type: ignore[arg-type]
                cipher=NoiseCipher(send, recv),
            )
        )
    return ends[0], ends[1]


async def test_a_session_closed_between_two_reads_ends_its_reader_cleanly() -> None:
    """Our node closing its connections at shutdown while a reading task was between two
    socket reads (after half a Noise message): trio refused the closed descriptor (-1) with
    ValueError, which went up through the muxer and the swarm: a traceback on exit."""
    a, b = _session_pair()
    message = b.cipher.encrypt(b"x" * 1000)
    await b.send_some(message[:500])  # half a Noise message: a's reader must read again
    await trio.testing.wait_all_tasks_blocked()
    reads = 0
    real_receive = a._receive

    async def receive_then_close(n: int) -> bytes:
        nonlocal reads
        reads += 1
        if reads == 2:  # the connection closed at the reader's schedule point after its first read
            await a.close()
        return await real_receive(n)

    a._receive = receive_then_close  # type: ignore[method-assign]
    with pytest.raises(ConnectionClosedError):
        await a.read_some()
    with pytest.raises(ConnectionClosedError):  # and a write to it: the connection's end, not a crash
        await a.send_some(a.cipher.encrypt(b"y"))
    await b.close()


async def _echo(stream: Any) -> None:
    try:
        while True:
            data = await stream.read(1 << 20)
            if not data:
                break
            await stream.write(data)
    except Exception:
        pass
    await stream.close()


async def _read_exactly(stream: Any, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        got += await stream.read(n - len(got))
    return bytes(got)


async def test_nodes_run_our_muxer_over_our_noise_session() -> None:
    async with Node(fast_config()) as a, Node(fast_config()) as b:
        b.host.set_stream_handler(ECHO, _echo)
        await a.connect(b.addrs[0])
        conn = a.host.get_network().connections[ID(b.peer_id)][0]
        assert isinstance(conn.muxed_conn, YamuxMuxer)
        assert isinstance(conn.muxed_conn.secured_conn, NoiseSession)
        rtt = await conn.muxed_conn.ping()
        assert 0 < rtt < 5
        s = await a.host.new_stream(ID(b.peer_id), [ECHO])
        assert isinstance(s._state_lock, FastLock)  # py-libp2p's yielding lock was swapped


async def test_full_duplex_and_many_streams() -> None:
    async with Node(fast_config()) as a, Node(fast_config()) as b:
        b.host.set_stream_handler(ECHO, _echo)
        await a.connect(b.addrs[0])
        big = os.urandom(3 << 20)

        async def one(size: int, results: list[bool]) -> None:
            s = await a.host.new_stream(ID(b.peer_id), [ECHO])
            data = big[:size]
            async with trio.open_nursery() as n:
                n.start_soon(s.write, data)
                got = await _read_exactly(s, size)
            await s.close()
            results.append(got == data)

        results: list[bool] = []
        with trio.fail_after(30):
            await one(3 << 20, results)  # more than a window each way at once
            async with trio.open_nursery() as n:
                for k in range(60):
                    n.start_soon(one, 1000 + 977 * k, results)
        assert results == [True] * 61


async def test_small_reads_of_a_large_buffer() -> None:
    """Reads of a few bytes, then of the rest, across chunk boundaries: the same bytes."""
    payload = os.urandom(300_000)
    async with Node(fast_config()) as a, Node(fast_config()) as b:
        b.host.set_stream_handler(ECHO, _echo)
        await a.connect(b.addrs[0])
        s = await a.host.new_stream(ID(b.peer_id), [ECHO])
        with trio.fail_after(10):
            await s.write(payload)
            while s.muxed_stream._buffered < len(payload):  # all of it buffered, in several chunks
                await trio.sleep(0.01)
            got = [await s.read(n) for n in (1, 2, 3, 1000, 70_000)]
            got.append(await _read_exactly(s, len(payload) - sum(map(len, got))))
    assert [len(g) for g in got[:5]] == [1, 2, 3, 1000, 70_000]
    assert b"".join(got) == payload


async def test_both_sides_write_before_reading() -> None:
    """The reading task never waits on a send, so two writers cannot deadlock."""
    size = 3 << 20
    got: dict[str, bytes] = {}

    async def handler(stream: Any) -> None:
        async with trio.open_nursery() as n:
            n.start_soon(stream.write, b"b" * size)
            got["b"] = await _read_exactly(stream, size)

    async with Node(fast_config()) as a, Node(fast_config()) as b:
        b.host.set_stream_handler(ECHO, handler)
        await a.connect(b.addrs[0])
        s = await a.host.new_stream(ID(b.peer_id), [ECHO])
        with trio.fail_after(20):
            await s.write(b"a" * size)  # all of it before reading anything
            got["a"] = await _read_exactly(s, size)
    assert got == {"a": b"b" * size, "b": b"a" * size}


async def test_reset_reaches_the_peer_and_eof_after_close() -> None:
    seen: list[str] = []
    done = trio.Event()

    async def handler(stream: Any) -> None:
        first = await stream.read(5)
        if first == b"reset":
            try:
                await stream.read(10)
            except StreamReset:
                seen.append("reset")
        else:
            rest = await stream.read(100)
            seen.append((first + rest).decode())
            try:
                await stream.read(1)
            except Exception as e:
                seen.append(type(e).__name__)
        done.set()

    async with Node(fast_config()) as a, Node(fast_config()) as b:
        b.host.set_stream_handler(ECHO, handler)
        await a.connect(b.addrs[0])
        with trio.fail_after(10):
            s = await a.host.new_stream(ID(b.peer_id), [ECHO])
            await s.write(b"reset")
            await trio.sleep(0.05)
            await s.reset()
            await done.wait()
            done = trio.Event()
            s = await a.host.new_stream(ID(b.peer_id), [ECHO])
            await s.write(b"hello world")
            await s.close()
            await done.wait()
    assert seen == ["reset", "hello world", "StreamEOF"]


async def test_a_peer_sending_bad_frames_is_disconnected() -> None:
    async with Node(fast_config()) as a, Node(fast_config()) as b:
        await a.connect(b.addrs[0])
        conn = a.host.get_network().connections[ID(b.peer_id)][0]
        muxed = conn.muxed_conn
        assert isinstance(muxed, YamuxMuxer)
        # A yamux frame of version 7, through the real Noise session.
        async with muxed._write_lock:  # between the muxer's own frames
            await muxed.secured_conn.write(b"\x07" + b"\x00" * 11)
        with trio.fail_after(5):
            await muxed.event_closed.wait()
            while ID(b.peer_id) in b.host.get_network().connections:
                await trio.sleep(0.02)
        assert muxed.is_closed
        assert b.muxer_stats.protocol_errors == 1 and a.muxer_stats.protocol_errors == 0


async def test_a_peer_sending_a_forged_noise_message_is_disconnected() -> None:
    async with Node(fast_config()) as a, Node(fast_config()) as b:
        await a.connect(b.addrs[0])
        muxed = a.host.get_network().connections[ID(b.peer_id)][0].muxed_conn
        assert isinstance(muxed, YamuxMuxer) and isinstance(muxed.secured_conn, NoiseSession)
        sock = muxed.secured_conn._socket
        assert sock is not None
        async with muxed._write_lock:  # 32 bytes that are no ChaChaPoly message under the session key
            sock.send(b"\x00\x20" + os.urandom(32))
        with trio.fail_after(5):
            await muxed.event_closed.wait()
            while ID(b.peer_id) in b.host.get_network().connections or any(
                c.muxed_conn is muxed for c in a.host.get_network().connections.get(ID(b.peer_id), [])
            ):
                await trio.sleep(0.02)
        await a.connect(b.addrs[0])  # b dropped that connection and serves on
        fresh = a.host.get_network().connections[ID(b.peer_id)][0].muxed_conn
        assert fresh is not muxed and isinstance(fresh, YamuxMuxer)
        assert await fresh.ping() < 5
        assert b.muxer_stats.protocol_errors == 1


async def test_a_cancelled_write_leaves_the_stream_whole() -> None:
    """A write cancelled half-way sends whole frames only: the peer reads a prefix
    of it followed by the next write, and the connection carries on."""
    first, second = os.urandom(12 << 20), os.urandom(100_000)
    got = bytearray()
    done = trio.Event()

    async def sink(stream: Any) -> None:
        while True:
            data = await stream.read(1 << 20)
            got.extend(data)
            if got.endswith(second):
                done.set()

    async with Node(fast_config()) as a, Node(fast_config()) as b:
        b.host.set_stream_handler(ECHO, sink)
        await a.connect(b.addrs[0])
        s = await a.host.new_stream(ID(b.peer_id), [ECHO])
        with trio.move_on_after(0.002) as scope:
            await s.write(first)
        assert scope.cancelled_caught  # three windows: it had to wait for credit
        with trio.fail_after(10):
            await s.write(second)
            await done.wait()
        muxed = s.muxed_stream.muxed_conn
        assert await muxed.ping() < 5
    prefix = len(got) - len(second)
    assert 0 < prefix < len(first) and bytes(got[:prefix]) == first[:prefix]


async def test_a_peer_that_reads_nothing_is_dropped_after_the_write_timeout() -> None:
    """Sends that make no progress for ``write_timeout_s`` abort the connection,
    and the blocked writers get an error instead of waiting forever."""
    async with Node(fast_config()) as a, Node(fast_config()) as b:
        use_own_yamux(a.host, write_timeout_s=1.0, stats=a.muxer_stats)
        b.host.set_stream_handler(ECHO, _echo)
        await a.connect(b.addrs[0])
        b_muxed = b.host.get_network().connections[ID(a.peer_id)][0].muxed_conn
        assert isinstance(b_muxed, YamuxMuxer) and isinstance(b_muxed.secured_conn, NoiseSession)

        streams = [await a.host.new_stream(ID(b.peer_id), [ECHO]) for _ in range(8)]

        async def frozen(n: int) -> bytes:  # b's process stops reading its socket
            await trio.sleep_forever()
            return b""

        b_muxed.secured_conn._receive = frozen  # type: ignore[method-assign]  # from its next read on
        errors: list[str] = []

        async def flood(s: Any) -> None:
            try:
                await s.write(os.urandom(4 << 20))  # one window per stream
            except Exception as e:
                errors.append(type(e).__name__)

        a_muxed = a.host.get_network().connections[ID(b.peer_id)][0].muxed_conn
        assert isinstance(a_muxed, YamuxMuxer) and a_muxed.write_timeout_s == 1.0
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                for s in streams:  # 32 MiB: more than the kernel's socket buffers hold
                    n.start_soon(flood, s)
        assert a_muxed.is_closed and a.muxer_stats.write_timeouts == 1
        assert errors and set(errors) <= {"StreamReset", "StreamClosed"}


async def test_try_write_sends_at_once_or_leaves_the_write_to_write() -> None:
    """A write that needs no waiting goes out with no schedule point (a cancelled
    caller is not interrupted); one that lacks credit is refused whole, untouched."""
    got = bytearray()
    started = trio.Event()

    async def handler(stream: Any) -> None:
        started.set()
        got.extend(await _read_exactly(stream, 5))
        await trio.sleep_forever()  # reads no more: the writer's credit runs out

    async with Node(fast_config()) as a, Node(fast_config()) as b:
        b.host.set_stream_handler(ECHO, handler)
        await a.connect(b.addrs[0])
        s = await a.host.new_stream(ID(b.peer_id), [ECHO])
        muxed = s.muxed_stream
        await trio.sleep(0.1)  # the stream's negotiation has gone out: the writer is idle
        with trio.CancelScope() as scope:
            scope.cancel()
            assert muxed.try_write(b"hello")  # synchronous: nothing to interrupt
        with trio.fail_after(10):
            await started.wait()
            while len(got) < 5:
                await trio.sleep(0.01)
        assert bytes(got) == b"hello"
        window = muxed.muxed_conn.proto.send_window(muxed.stream_id)
        assert not muxed.try_write(b"x" * (window + 1))
        assert muxed.muxed_conn.proto.send_window(muxed.stream_id) == window  # nothing was framed
        with trio.move_on_after(0.5) as stuck:
            await muxed.write(b"x" * (window + 1))  # the slow way waits for credit that never comes
        assert stuck.cancelled_caught


async def test_deliver_to_hands_over_what_was_buffered_then_everything_then_the_end() -> None:
    """A receiver gets every byte in order, returns the credit as it goes (more than
    a window gets through), and None once at the end."""
    window = 4 << 20
    payload = os.urandom(3 * window)
    pieces: list[bytes | None] = []
    ended = trio.Event()

    async def handler(stream: Any) -> None:
        while stream.muxed_stream._buffered < 1000:  # some arrives before the receiver is set
            await trio.sleep(0.01)

        def receive(data: bytes | None) -> None:
            pieces.append(data)
            if data is None:
                ended.set()

        stream.muxed_stream.deliver_to(receive)
        await trio.sleep_forever()

    async with Node(fast_config()) as a, Node(fast_config()) as b:
        b.host.set_stream_handler(ECHO, handler)
        await a.connect(b.addrs[0])
        s = await a.host.new_stream(ID(b.peer_id), [ECHO])
        with trio.fail_after(20):
            await s.write(payload[:1000])
            await trio.sleep(0.1)
            await s.write(payload[1000:])
            await s.close()
            await ended.wait()
    assert pieces[-1] is None and pieces.count(None) == 1
    assert b"".join(p for p in pieces if p is not None) == payload
