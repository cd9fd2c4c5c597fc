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
* **Quiet logs.** py-libp2p logs hundreds of empty "Failed to read DHT message"
  lines and LifecycleError tracebacks at shutdown; :func:`quiet_libp2p_logs`
  raises its loggers' thresholds (they stay reachable for debugging).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import trio
from libp2p import new_host
from libp2p.abc import IHost, IRawConnection, ISecureConn
from libp2p.connection_types import ConnectionType
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as NOISE_MAX_PLAINTEXT
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from .identity import Identity

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

    py-libp2p's Noise reader asks the socket for each message's 2-byte length,
    then for its body: two receive calls (and two trio waits) per message.
    Reading ahead serves both, and the messages behind them, from memory
    (measured: an echo on an open stream 0.67 -> 0.60 ms p50).
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


class ReadAheadNoiseTransport(NoiseTransport):
    """py-libp2p's Noise transport over :class:`ReadAheadConnection`."""

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await super().secure_inbound(ReadAheadConnection(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await super().secure_outbound(ReadAheadConnection(conn), peer_id)


def quiet_libp2p_logs() -> None:
    """Raise py-libp2p's log thresholds (a process-wide logging setting)."""
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def build_host(identity: Identity, *, announce_addrs: Sequence[str] = ()) -> IHost:
    """A libp2p host for ``identity``: TCP, Noise only, yamux only, fast dials."""
    key_pair = create_new_key_pair(identity.seed)
    host_id = ID.from_pubkey(key_pair.public_key)
    if host_id.to_bytes() != identity.peer_id:  # our PeerId derivation must agree with libp2p's
        raise AssertionError("libp2p derived a different PeerId from the same key")
    # py-libp2p's yamux sends a WINDOW_UPDATE frame after every read (its
    # PY_YAMUX_RELEASE_ON_READ knob, on by default): one extra encrypted frame and
    # syscall per message. Off, it releases credit at half a window as go-yamux does;
    # 20 gossip peers in one process then deliver every message instead of ~70%.
    # Read at call time by py-libp2p, so an operator's own setting wins.
    os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")
    # py-libp2p's yamux sends frames of 64 KiB plus a 12-byte header, and its Noise layer
    # then splits each into two messages (one carries at most 65,519 bytes): twice the
    # encryptions, frames and reads. Frames that fit one Noise message: stream throughput
    # +12-15% (benchmarks/overlay). A py-libp2p module constant read at each write; it
    # bounds only what we send (any peer's 64 KiB frames are still read).
    yamux_module.MAX_MESSAGE_SIZE = NOISE_MAX_PLAINTEXT
    noise = ReadAheadNoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0, low_watermark=0),
        announce_addrs=[Multiaddr(a) for a in announce_addrs] or None,
    )
    disable_auto_connector(host)
    return host


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
