"""Building a py-libp2p host the way cocoon-p2p needs it (trio side).

Each work-around for a py-libp2p 0.8.1 defect lives here, named and explained:

* **Noise only, yamux only.** ``new_host()`` otherwise also accepts TLS, secio
  and plaintext, and mplex failed a 1 MiB full-duplex echo here.
* **Connect in ~7 ms, not 251 ms.** ``Swarm.dial_peer`` starts a dial, then waits
  ``_HAPPY_EYEBALLS_DELAY`` (250 ms) before trying the next address, and its
  event fires only on failure, so a *successful* dial still waits the full
  delay. The wait is cut short when the dial reaches
  ``max_connections_per_peer``; setting that to 1 (we never want parallel
  connections to one peer: yamux multiplexes) ends it as soon as one dial succeeds.
* **Our data path.** py-libp2p's Noise data phase and yamux cost ~13 lock
  operations and several task switches per frame (throughput 0.15 of a bare
  Noise socket): after its handshake the session is a :class:`NoiseSession`, and
  yamux runs as :class:`YamuxMuxer` (:func:`use_own_yamux`). Same wire bytes.
* **No scheduler trip per stream read and write.** ``NetStream`` takes a
  ``trio.Lock`` around each read and write to check its state; the lock guards
  no ``await``, yet an uncontended ``trio.Lock`` still yields to the scheduler
  (~10% of stream throughput). :class:`StreamLockNotifee` gives each new
  stream a :class:`~cocoon_p2p.transport.fastlock.FastLock` instead.
* **Quiet logs.** py-libp2p logs hundreds of empty "Failed to read DHT message"
  lines and LifecycleError tracebacks at shutdown; :func:`quiet_libp2p_logs`
  raises its loggers' thresholds (they stay reachable for debugging).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

import trio
from libp2p import new_host
from libp2p.abc import IHost, IMuxedConn, INetConn, INetStream, INetwork, INotifee, IRawConnection, ISecureConn
from libp2p.connection_types import ConnectionType
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.stream.net_stream import NetStream
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from multiaddr import Multiaddr

from cocoon_p2p.core.identity import Identity

from .fastlock import FastLock
from .muxer import PROTOCOL_ID as MUXER_PROTOCOL_ID
from .muxer import WRITE_TIMEOUT_S, YamuxMuxer
from .noise import NoiseCipher, NoiseSession
from .yamux import YamuxStats

# Loggers whose INFO/WARNING output is routine noise for an operator.
_NOISY_LOGGERS = {
    "libp2p": logging.ERROR,
    "libp2p.kad_dht": logging.CRITICAL,
    "libp2p.pubsub": logging.CRITICAL,
    "libp2p.tools.anyio_service": logging.CRITICAL,
    # Per-connection failures (a peer hung up mid-negotiation) are routine in a
    # churning network and logged at ERROR with multi-line dumps; Node counts them.
    "libp2p.host.basic_host": logging.CRITICAL,
    "libp2p.network.swarm": logging.CRITICAL,
    "libp2p.stream_muxer": logging.CRITICAL,
    "libp2p.protocol_muxer": logging.CRITICAL,
    "libp2p.transport.tcp": logging.CRITICAL,
    "async_service": logging.CRITICAL,
    "multiaddr": logging.ERROR,
}


READ_AHEAD = 1 << 16


class ReadAheadConnection(IRawConnection):
    """A raw connection whose reads fetch up to ``READ_AHEAD`` bytes at once.

    py-libp2p's Noise handshake asks the socket for each message's 2-byte length,
    then for its body: two receive calls per message. Reading ahead serves both
    from memory; what was read beyond the handshake is handed to the session
    (:meth:`unread`).
    """

    def __init__(self, conn: IRawConnection) -> None:
        self._conn = conn
        self.is_initiator = conn.is_initiator
        self._buf = b""
        self._pos = 0

    async def read(self, n: int | None = None) -> bytes:
        if self._pos >= len(self._buf):
            self._buf = await self._conn.read(max(n or 0, READ_AHEAD))
            self._pos = 0
        end = len(self._buf) if n is None else self._pos + n
        data = self._buf[self._pos : end]
        self._pos += len(data)
        return data

    def unread(self) -> tuple[IRawConnection, bytes]:
        """The connection underneath and the bytes read ahead but not consumed."""
        return self._conn, self._buf[self._pos :]

    async def write(self, data: bytes) -> None:
        await self._conn.write(data)

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()

    def get_transport_addresses(self) -> list[Multiaddr]:
        return self._conn.get_transport_addresses()

    def get_connection_type(self) -> ConnectionType:
        return self._conn.get_connection_type()


class FastNoiseTransport(NoiseTransport):
    """py-libp2p's Noise handshake, then our data phase (:class:`NoiseSession`)."""

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        ahead = ReadAheadConnection(conn)
        return _fast_session(await super().secure_inbound(ahead), ahead)

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        ahead = ReadAheadConnection(conn)
        return _fast_session(await super().secure_outbound(ahead, peer_id), ahead)


def _fast_session(session: ISecureConn, ahead: ReadAheadConnection) -> NoiseSession:
    if not isinstance(session, SecureSession):
        raise TypeError(f"py-libp2p's Noise handshake returned a {type(session).__name__}")
    raw, pending = ahead.unread()
    return NoiseSession(
        local_peer=session.local_peer,
        local_private_key=session.local_private_key,
        remote_peer=session.remote_peer,
        remote_permanent_pubkey=session.remote_permanent_pubkey,
        is_initiator=session.is_initiator,
        raw=raw,
        cipher=NoiseCipher.from_noise_state(session.conn.noise_state),  # type: ignore[attr-defined]
        pending=pending,
    )


class StreamLockNotifee(INotifee):
    """Swaps each new ``NetStream``'s state lock for a :class:`FastLock`
    before the stream reaches its user (the swarm awaits notifees first)."""

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        if isinstance(stream, NetStream) and not stream._state_lock.locked():
            stream._state_lock = FastLock()  # type: ignore[assignment]

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


def quiet_libp2p_logs() -> None:
    """Raise py-libp2p's log thresholds (a process-wide logging setting)."""
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def build_host(
    identity: Identity, *, announce_addrs: Sequence[str] = (), muxer_stats: YamuxStats | None = None
) -> IHost:
    """A libp2p host for ``identity``: TCP, Noise only, yamux only, fast dials.
    ``muxer_stats`` collects the counters of all its yamux sessions."""
    key_pair = create_new_key_pair(identity.seed)
    host_id = ID.from_pubkey(key_pair.public_key)
    if host_id.to_bytes() != identity.peer_id:  # our PeerId derivation must agree with libp2p's
        raise AssertionError("libp2p derived a different PeerId from the same key")
    noise = FastNoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(MUXER_PROTOCOL_ID): YamuxMuxer},
        connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0, low_watermark=0),
        announce_addrs=[Multiaddr(a) for a in announce_addrs] or None,
    )
    disable_auto_connector(host)
    use_own_yamux(host, stats=muxer_stats)
    host.get_network().register_notifee(StreamLockNotifee())
    return host


def use_own_yamux(host: IHost, *, write_timeout_s: float = WRITE_TIMEOUT_S, stats: YamuxStats | None = None) -> None:
    """Make ``host`` run yamux sessions with :class:`YamuxMuxer`.

    py-libp2p's muxer negotiation constructs its own ``Yamux`` whenever the
    protocol is ``/yamux/1.0.0``, whatever class the muxer options name, so the
    negotiation step of this host's upgrader is replaced (instance attribute: this
    host only). The wire protocol and its negotiation are unchanged. ``stats``,
    when given, adds up every connection's counters.
    """
    muxers = host.get_network().upgrader.muxer_multistream  # type: ignore[attr-defined]

    async def new_conn(conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, muxer_class = await muxers._selector.select(conn, conn.is_initiator, muxers.negotiate_timeout)
        if protocol == MUXER_PROTOCOL_ID:
            muxed: IMuxedConn = YamuxMuxer(conn, peer_id, write_timeout_s=write_timeout_s, stats=stats)
        else:
            muxed = muxer_class(conn, peer_id)
        return cast(IMuxedConn, muxers._annotate_connection(muxed, conn, protocol))

    muxers.new_conn = new_conn


def disable_auto_connector(host: IHost) -> None:
    """Keep py-libp2p's auto-connector from starting on this host.

    It aims at the midpoint of the watermarks (150 connections by default, and
    no watermark setting brings that to zero without also pruning every idle
    connection), dials every peer in the peerstore from both sides at once, and
    py-libp2p then closes one of each pair of simultaneous connections together
    with its streams. Our PeerSet decides whom to dial instead.
    """
    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is not None:

        async def stay_stopped() -> None:
            return None

        connector.start = stay_stopped  # instance attribute: this host only


async def close_quietly(stream: Any, *, timeout_s: float = 1.0) -> None:
    """Close a libp2p stream at the end of a handler, even while being cancelled;
    a peer that already hung up is no error here."""
    with trio.move_on_after(timeout_s) as scope:
        scope.shield = True
        try:
            await stream.close()
        except Exception:
            pass


def unblock_peer(host: IHost, peer_id: bytes) -> None:
    """Let a peer be dialled again at once. py-libp2p keeps peers whose addresses all
    failed in a negative cache and refuses to dial them for a while, even after they
    announce a new address (a restarted worker): called when we learn fresh addresses."""
    network = host.get_network()
    unblock = getattr(network, "unblock_peer", None)
    if unblock is not None:
        unblock(ID(peer_id))
