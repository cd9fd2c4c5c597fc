"""The data phase of a libp2p Noise session, framed and encrypted without I/O.

py-libp2p's Noise transport performs the XX handshake (kept: it is the part
other implementations check), then reads each message with two awaited reads
and decrypts through three wrapper layers. After the handshake we take its two
cipher keys and run the data phase here instead: :class:`NoiseCipher` turns
plaintext into length-prefixed ChaChaPoly messages and back (sans-IO), and
:class:`NoiseSession` is the thin trio connection that py-libp2p and our
multiplexer use. Bytes on the wire are unchanged (libp2p Noise spec: a 2-byte
big-endian length, at most 65535 bytes of ciphertext, nonces counting from 0).
"""

from __future__ import annotations

import socket
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from libp2p.abc import IRawConnection
from libp2p.connection_types import ConnectionType
from libp2p.crypto.keys import PrivateKey, PublicKey
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.peer.id import ID
from libp2p.security.base_session import BaseSession
from multiaddr import Multiaddr

from cocoon_p2p.core.errors import RemoteProtocolError

from .reassembly import Reassembly

MAX_MESSAGE = 65535  # ciphertext bytes in one Noise transport message
TAG_SIZE = 16
MAX_PLAINTEXT = MAX_MESSAGE - TAG_SIZE
MAX_NONCE = 2**64 - 1  # reserved by the Noise spec; a session must end before it
READ_SIZE = 1 << 20  # bytes asked of the socket per read: many messages at once


class NoiseDecryptError(RemoteProtocolError):
    """A message failed authentication: the connection must be closed."""

    code = "noise"


def _nonce(n: int) -> bytes:
    """ChaChaPoly's 96-bit nonce for message ``n``, as the Noise spec encodes it."""
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")


class NoiseCipher:
    """Both directions of a Noise transport session: ``encrypt`` and ``feed``."""

    def __init__(self, send_key: bytes, recv_key: bytes, *, send_nonce: int = 0, recv_nonce: int = 0) -> None:
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self._send_n = send_nonce
        self._recv_n = recv_nonce
        self._in = Reassembly()

    @classmethod
    def from_noise_state(cls, state: Any) -> NoiseCipher:
        """Take over the cipher states of a finished noiseprotocol handshake."""
        proto = state.noise_protocol
        enc, dec = proto.cipher_state_encrypt, proto.cipher_state_decrypt
        return cls(enc.k, dec.k, send_nonce=enc.n, recv_nonce=dec.n)

    def encrypt(self, plaintext: bytes | memoryview) -> bytes:
        """``plaintext`` as Noise messages (split at 65,519 bytes), prefixes included."""
        parts: list[bytes] = []
        view = memoryview(plaintext)
        # An empty message is never sent: py-libp2p reads one as the end of the connection.
        for start in range(0, len(view), MAX_PLAINTEXT):
            if self._send_n >= MAX_NONCE:
                raise ConnectionClosedError("Noise send nonce exhausted")
            nonce = _nonce(self._send_n)
            self._send_n += 1
            sealed = self._send.encrypt(nonce, view[start : start + MAX_PLAINTEXT], None)
            parts.append(len(sealed).to_bytes(2, "big"))
            parts.append(sealed)
        return b"".join(parts)

    def feed(self, data: bytes) -> bytes:
        """Decrypt every complete message in ``data`` plus what was buffered."""
        src = self._in.join(data)
        out: list[bytes] = []
        pos = 0
        end = len(src)
        view = memoryview(src)
        try:
            while end - pos >= 2:
                n = (src[pos] << 8) | src[pos + 1]
                if end - pos - 2 < n:
                    break
                if n < TAG_SIZE:
                    raise NoiseDecryptError(f"Noise message of {n} bytes")
                nonce = _nonce(self._recv_n)
                try:
                    out.append(self._recv.decrypt(nonce, view[pos + 2 : pos + 2 + n], None))
                except InvalidTag:
                    raise NoiseDecryptError("Noise message failed authentication") from None
                self._recv_n += 1
                pos += 2 + n
        finally:
            view.release()
            self._in.keep(src, pos)
        return out[0] if len(out) == 1 else b"".join(out)


def _take_socket(raw: object) -> socket.socket | None:
    """The stdlib socket under py-libp2p's TCP wrappers, held by us from now on.

    trio's socket methods spend ~3 us of wrapper code per call, and a 64 KiB
    message costs ~2.4 calls (a tenth of stream throughput here), so the session
    calls the stdlib socket itself, with trio's ``wait_readable``/``wait_writable``
    and one checkpoint per call, as trio does. trio hands out no stdlib socket,
    so the trio socket is detached and the same file descriptor re-wrapped:
    py-libp2p's wrapper gets a ``SocketStream`` over our socket, and closing
    either closes both.
    """
    tcp = getattr(raw, "stream", None)
    stream = getattr(tcp, "stream", None)
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    tcp.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))  # type: ignore[union-attr]
    return sock


class NoiseSession(BaseSession):
    """A secured connection: Noise messages over a raw libp2p connection.

    ``read_some`` returns whatever plaintext the next socket read completes (what
    a multiplexer wants); ``read(n)`` keeps py-libp2p's semantics for the rest.
    A cancelled ``write`` may have sent part of its messages: the connection is
    then unusable, as with any cancelled ``send_all``.
    """

    def __init__(
        self,
        *,
        local_peer: ID,
        local_private_key: PrivateKey,
        remote_peer: ID,
        remote_permanent_pubkey: PublicKey,
        is_initiator: bool,
        raw: IRawConnection,
        cipher: NoiseCipher,
        pending: bytes = b"",
    ) -> None:
        super().__init__(
            local_peer=local_peer,
            local_private_key=local_private_key,
            remote_peer=remote_peer,
            remote_permanent_pubkey=remote_permanent_pubkey,
            is_initiator=is_initiator,
        )
        self.raw = raw
        self.cipher = cipher
        self._plain = cipher.feed(pending) if pending else b""
        # py-libp2p wraps the TCP socket twice, each wrapper with its own lock and
        # error translation (~10 us per 64 KiB message here); we call it directly.
        # Our multiplexer already serialises writes, and only its task reads.
        self._socket = _take_socket(raw)
        self._drained = False  # the last recv took less than asked: nothing is left

    async def read_some(self) -> bytes:
        """The next plaintext bytes, at least one; raises ConnectionClosedError at EOF."""
        if self._plain:
            data, self._plain = self._plain, b""
            return data
        while True:
            raw = await self._receive(READ_SIZE)
            if not raw:
                raise ConnectionClosedError("Connection closed")
            data = self.cipher.feed(raw)
            if data:
                return data

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        if not self._plain:
            self._plain = await self.read_some()
        if n is None or n < 0 or n >= len(self._plain):
            data, self._plain = self._plain, b""
        else:
            data, self._plain = self._plain[:n], self._plain[n:]
        return data

    def seal(self, data: bytes | memoryview) -> bytes:
        """``data`` as Noise messages, ready for :meth:`send_some` (order matters:
        messages must go out in the order they were sealed)."""
        return self.cipher.encrypt(data)

    async def send_some(self, data: bytes | memoryview) -> int:
        """Send a prefix of sealed bytes and return its length (at least 1).

        Cancellation-atomic: a cancelled call sent nothing, so the caller can keep
        the rest for later without corrupting the stream. Raises
        ``ConnectionClosedError`` when the connection is gone.
        """
        sock = self._socket
        if sock is None:  # not a TCP socket: the raw connection sends all or fails
            with trio.CancelScope(shield=True):
                await self.raw.write(bytes(data))
            return len(data)
        waited = False
        while not (n := self.try_send(data)):
            try:
                await trio.lowlevel.wait_writable(sock.fileno())  # cancelled here: nothing was sent
            except (OSError, ValueError, trio.ClosedResourceError) as e:  # ValueError: closed (fd -1)
                raise ConnectionClosedError(f"connection closed: {e}") from None
            waited = True
        if not waited:  # one schedule point per call, as trio's own sockets: others run
            await trio.lowlevel.cancel_shielded_checkpoint()  # shielded: never lose a sent count
        return n

    def try_send(self, data: bytes | memoryview) -> int:
        """Send what the socket takes now, without waiting or a schedule point: the
        length sent (0 when it takes nothing now, or when this session has no socket
        of its own). Raises ``ConnectionClosedError`` when the connection is gone."""
        sock = self._socket
        if sock is None:
            return 0
        try:
            return sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as e:
            raise ConnectionClosedError(f"connection closed: {e}") from None

    async def write(self, data: bytes) -> None:
        view = memoryview(self.seal(data))
        while view:
            view = view[await self.send_some(view) :]

    async def _receive(self, n: int) -> bytes:
        sock = self._socket
        if sock is None:
            return await self.raw.read(n)
        waited = False
        if self._drained:  # the last read emptied the socket: a recv now would only fail
            waited = await self._wait_readable(sock)
            if not waited:
                return b""
        while True:
            try:
                data = sock.recv(n)
            except BlockingIOError:
                if not await self._wait_readable(sock):
                    return b""
                waited = True
                continue
            except OSError:
                return b""
            self._drained = len(data) < n
            # One schedule point per call, as in trio's own sockets: a wait was one. A second
            # would cost every received message a pass of the scheduler (~4 us here).
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()  # shielded: never drop what was read
            return data

    @staticmethod
    async def _wait_readable(sock: socket.socket) -> bool:
        """False when the socket is closed: by the peer, or by us while the reading task
        was between two reads (its descriptor is then -1, which trio refuses with ValueError:
        that went up through the muxer and the swarm, a traceback at every busy shutdown)."""
        try:
            await trio.lowlevel.wait_readable(sock.fileno())
        except (OSError, ValueError, trio.ClosedResourceError):
            return False
        return True

    async def close(self) -> None:
        await self.raw.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.raw.get_remote_address()

    def get_transport_addresses(self) -> list[Multiaddr]:
        return self.raw.get_transport_addresses()

    def get_connection_type(self) -> ConnectionType:
        return self.raw.get_connection_type()
