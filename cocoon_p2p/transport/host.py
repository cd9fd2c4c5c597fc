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
* **A failing stream handler fails its stream, not the node.** py-libp2p runs
  each inbound stream's handler in its connection's accept loop and lets its
  exceptions out: one raised by a handler (a write to a stream the peer has just
  reset will do) went up through the swarm and ended the whole node.
  :func:`contain_stream_errors` ends the stream instead.
* **No py-libp2p resource manager; limits of our own.** ``new_host()`` installs
  ``libp2p.rcmgr`` whether asked or not. Its counters leak: after 40 peers came
  and went it counted 36 connections and 172 streams open where 1 and 0 were, and
  at its limit (1000 connections) it refuses every new one: a node that stays up
  ends with no peers. It also has no per-peer stream limit and trips a circuit
  breaker for 60 s. It is removed; :func:`enforce_limits` applies
  :class:`~.limits.Admission` instead, from counts read off the live connections
  (``docs/upstream/rcmgr-accounting-leak.md``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, cast

import trio
from libp2p import new_host
from libp2p.abc import IHost, IMuxedConn, INetConn, INetStream, INetwork, INotifee, IRawConnection, ISecureConn
from libp2p.connection_types import ConnectionType
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.net_stream import NetStream
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from multiaddr import Multiaddr

from cocoon_p2p.core.identity import Identity

from .fastlock import FastLock
from .limits import Admission
from .muxer import PROTOCOL_ID as MUXER_PROTOCOL_ID
from .muxer import WRITE_TIMEOUT_S, YamuxMuxer
from .noise import NoiseCipher, NoiseSession
from .redial import redial_past_closed
from .yamux import YamuxStats

log = logging.getLogger(__name__)
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
    # Circuit relay logs every peer that hangs up mid-circuit, and every failed hole punch
    # (a symmetric NAT fails them all), at ERROR: routine on the internet.
    "libp2p.relay": logging.CRITICAL,
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
    identity: Identity,
    *,
    announce_addrs: Sequence[str] = (),
    muxer_stats: YamuxStats | None = None,
    admission: Admission | None = None,
) -> IHost:
    """A libp2p host for ``identity``: TCP, Noise only, yamux only, fast dials, under
    the resource limits of ``admission`` (the defaults when None). ``muxer_stats``
    collects the counters of all its yamux sessions."""
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
    host.get_network().set_resource_manager(None)  # type: ignore[attr-defined]  # see the module docstring
    admission = admission or Admission()
    enforce_limits(host, admission)
    use_own_yamux(host, stats=muxer_stats, admit_stream=stream_admission(host, admission))
    contain_stream_errors(host)
    redial_past_closed(host)
    host.get_network().register_notifee(StreamLockNotifee())
    return host


def contain_stream_errors(host: IHost) -> None:
    """Whatever an inbound stream's handler raises ends that stream (reset), and
    nothing else: not the connection's accept loop, not the swarm, not the node."""
    swarm: Any = host.get_network()
    handle = swarm.common_stream_handler

    async def contained(stream: INetStream) -> None:
        try:
            await handle(stream)
        except Exception as exc:
            log.debug("stream handler failed (%s); resetting the stream", exc)
            try:
                await stream.reset()
            except Exception:  # already reset or closed: nothing left to end
                pass

    swarm.common_stream_handler = contained  # instance attribute: this host only


def use_own_yamux(
    host: IHost,
    *,
    write_timeout_s: float = WRITE_TIMEOUT_S,
    stats: YamuxStats | None = None,
    admit_stream: Callable[[YamuxMuxer], bool] | None = None,
) -> None:
    """Make ``host`` run yamux sessions with :class:`YamuxMuxer`.

    py-libp2p's muxer negotiation constructs its own ``Yamux`` whenever the
    protocol is ``/yamux/1.0.0``, whatever class the muxer options name, so the
    negotiation step of this host's upgrader is replaced (instance attribute: this
    host only). The wire protocol and its negotiation are unchanged. ``stats``,
    when given, adds up every connection's counters; ``admit_stream`` is asked
    for each stream a peer opens (:func:`stream_admission`).
    """
    muxers = host.get_network().upgrader.muxer_multistream  # type: ignore[attr-defined]

    async def new_conn(conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, muxer_class = await muxers._selector.select(conn, conn.is_initiator, muxers.negotiate_timeout)
        if protocol == MUXER_PROTOCOL_ID:
            muxed: IMuxedConn = YamuxMuxer(
                conn, peer_id, write_timeout_s=write_timeout_s, stats=stats, admit_stream=admit_stream
            )
        else:
            muxed = muxer_class(conn, peer_id)
        return cast(IMuxedConn, muxers._annotate_connection(muxed, conn, protocol))

    muxers.new_conn = new_conn


def _remote_ip(conn: Any) -> str:
    address = conn.get_remote_address()
    return str(address[0]) if address else ""


def enforce_limits(host: IHost, admission: Admission) -> None:
    """Refuse inbound handshakes and connections beyond ``admission``'s limits.

    Wraps two steps of this host's swarm (instance attributes: this host only):
    the inbound upgrade (handshakes in progress, connections per IP: refused before
    any cryptography, the socket closed at once) and the registration of a
    connection, either direction (connections per peer: py-libp2p trims extra
    connections only after a grace period, so a burst of them would all stay).
    Each refusal is counted in ``admission.refused``.
    """
    swarm: Any = host.get_network()
    upgrade_inbound = swarm.upgrade_inbound_raw_conn
    add_conn = swarm.add_conn
    # Connections being registered: add_conn awaits before the swarm lists a new
    # connection, so a burst of them would each see none of the others.
    registering: dict[ID, set[IMuxedConn]] = {}

    def inbound_from(ip: str) -> int:
        return sum(
            1
            for conns in swarm.connections.values()
            for c in conns
            if not c.muxed_conn.is_initiator and _remote_ip(c.muxed_conn) == ip
        )

    async def limited_upgrade(raw_conn: IRawConnection, maddr: Multiaddr) -> IMuxedConn:
        ip = _remote_ip(raw_conn)
        refusal = admission.begin_handshake(ip, inbound_from_ip=inbound_from(ip))
        if refusal is not None:
            await close_quietly(raw_conn)
            raise SwarmException(f"inbound connection from {ip} refused: {refusal.value}")
        try:
            return cast(IMuxedConn, await upgrade_inbound(raw_conn, maddr))
        finally:
            admission.end_handshake(ip)

    async def limited_add_conn(muxed_conn: IMuxedConn, direction: str = "unknown") -> INetConn:
        peer = muxed_conn.peer_id
        pending = registering.setdefault(peer, set())
        others = {c.muxed_conn for c in swarm.connections.get(peer, ())} | pending
        others.discard(muxed_conn)
        refusal = admission.admit_connection(open_with_peer=len(others))
        if refusal is not None:
            if not pending:
                del registering[peer]
            await close_quietly(muxed_conn)
            raise SwarmException(f"connection with {peer} refused: {refusal.value}")
        pending.add(muxed_conn)
        try:
            return cast(INetConn, await add_conn(muxed_conn, direction))
        finally:
            pending.discard(muxed_conn)
            if not pending and registering.get(peer) is pending:
                del registering[peer]

    swarm.upgrade_inbound_raw_conn = limited_upgrade
    swarm.add_conn = limited_add_conn


def stream_admission(host: IHost, admission: Admission) -> Callable[[YamuxMuxer], bool]:
    """What a :class:`YamuxMuxer` of ``host`` asks for each stream its peer opens:
    the peer's inbound streams over all its connections, counted from the sessions
    themselves (nothing to release, so nothing to leak), against the limit."""
    swarm: Any = host.get_network()

    def admit(muxer: YamuxMuxer) -> bool:
        open_from_peer = muxer.proto.inbound_streams
        for c in swarm.connections.get(muxer.peer_id, ()):
            other = c.muxed_conn
            if other is not muxer and isinstance(other, YamuxMuxer):
                open_from_peer += other.proto.inbound_streams
        return admission.admit_inbound_stream(open_from_peer=open_from_peer) is None

    return admit


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


async def close_connections(host: IHost, timeout_s: float) -> None:
    """Close every connection and refuse new ones, in or out (a node winding down).

    Listeners stay open until the host exits, because gossipsub reads their
    sockets for our addresses while it winds down."""
    network = host.get_network()
    gate = getattr(network, "connection_gate", None)
    if gate is not None:

        async def refuse(_addr: Multiaddr) -> bool:
            return False

        gate.is_allowed = refuse
    with trio.move_on_after(timeout_s):
        for peer in list(network.connections):
            await network.close_peer(peer)


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
