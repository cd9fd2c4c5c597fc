"""What the muxer needs from a secured connection: :class:`SealedConn`.

Our Noise data phase (:class:`~.noise.NoiseSession`) implements it natively:
the muxer seals frames itself, so that it can queue sealed bytes and send them
later without re-encrypting (that is what makes its writes cancel-safe).
Any other py-libp2p ``ISecureConn`` is wrapped in :class:`OpaqueSealedConn`,
which seals nothing and sends each write whole.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import trio


@runtime_checkable
class SealedConn(Protocol):
    """A secured byte stream that seals (encrypts and frames) apart from sending."""

    def seal(self, data: bytes | memoryview) -> bytes:
        """``data`` as it goes on the wire (any number of whole secure messages)."""
        ...

    async def send_some(self, data: bytes | memoryview) -> int:
        """Send a prefix of sealed ``data`` (one cancellation point); return its length."""
        ...

    def try_send(self, data: bytes | memoryview) -> int:
        """Send what the socket takes now, without waiting; 0 when nothing could go."""
        ...

    async def read_some(self) -> bytes:
        """Plaintext the peer sent, at least one byte; ``b""`` at the end of the stream."""
        ...


class OpaqueSealedConn:
    """A secured connection we cannot seal for: each write goes whole, shielded from cancellation."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def seal(self, data: bytes | memoryview) -> bytes:
        return bytes(data)

    async def send_some(self, data: bytes | memoryview) -> int:
        with trio.CancelScope(shield=True):  # it sends all or fails: never half a message
            await self.conn.write(bytes(data))
        return len(data)

    def try_send(self, data: bytes | memoryview) -> int:
        return 0  # everything goes through send_some, in order

    async def read_some(self) -> bytes:
        return bytes(await self.conn.read(None))


def as_sealed(conn: Any) -> SealedConn:
    """``conn`` itself when it can seal, else wrapped."""
    return conn if isinstance(conn, SealedConn) else OpaqueSealedConn(conn)
