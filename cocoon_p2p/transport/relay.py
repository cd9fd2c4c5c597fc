"""Reaching peers behind NATs (trio side): Circuit Relay v2 and DCUtR hole punching.

py-libp2p 0.8.1 ships both protocols; what they need around them lives here:

* **Relay (hop) with our limits.** A public node that opts in (bootstrap peers do by
  default) relays for others under :class:`RelaySettings`' limits, not the library's
  (1 GiB and an hour a circuit, 4 reservations).
* **Reservations kept.** A node that cannot be dialed reserves a slot on up to
  ``max_relays`` relays and keeps it: py-libp2p refreshes a reservation only while
  the relay connection lives; when it drops (a relay restarted) the slot is made
  again here. :meth:`Relaying.relayed_addrs` are the ``.../p2p-circuit/p2p/<us>``
  addresses to announce.
* **Dialing relayed addresses.** py-libp2p's swarm drops ``/p2p-circuit`` addresses
  when it dials a peer, so a stream to a worker known only by them failed ("no
  addresses"). :func:`dial_through_relays` makes this host's swarm dial them through
  the relay transport, racing the peer's direct addresses after their head start
  (:data:`DIRECT_HEAD_START_S`: a private address from another network only times out).
* **Direct when possible.** DCUtR upgrades a relayed connection to a direct one by a
  simultaneous TCP open through both NATs (it works through endpoint-independent NATs,
  never through a symmetric one: the relay then keeps carrying). New streams go on the
  direct connection once it exists: py-libp2p's "best" connection choice prefers
  direct over relayed.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetConn
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from cocoon_p2p.core.logfields import fields
from cocoon_p2p.core.metrics import Metric, metric

from .addresses import is_relayed
from .dcutr_upgrade import dial_public_first

log = logging.getLogger(__name__)

DIRECT_HEAD_START_S = 0.25  # a peer's direct addresses are dialed this long before its relayed ones
RESERVE_EVERY_S = 5.0  # how often reservations are checked and made again
RELAY_DIAL_TIMEOUT_S = 10.0
# DCUtR's dial timeout (py-libp2p's: 10 s): each hole-punch dial, and the direct dial before a
# punch (to public addresses only: dcutr_upgrade), which is all the punch waits for.
HOLE_PUNCH_DIAL_S = 2
HOLE_PUNCH_POLL_S = 1.0
MAX_HOLE_PUNCHES = 3  # py-libp2p's budget per peer (reset when the peer reconnects)
RELAYED_DRAIN_S = 30.0  # a relayed connection superseded by a direct one closes by then (its streams move)
REFUSED_RETRY_S = 60.0  # a relay that refused a reservation (or is none) is asked again after this


class ReserveMode(enum.Enum):
    """When a node reserves relay slots (and announces relayed addresses)."""

    NEVER = "never"
    AUTO = "auto"  # unless AutoNAT found this node reachable from outside
    ALWAYS = "always"


@dataclass(frozen=True, kw_only=True)
class RelaySettings:
    """NAT traversal: relaying for others, reserving slots, hole punching."""

    serve: bool = False  # relay (hop) for others: public nodes that opt in
    reserve: ReserveMode = ReserveMode.NEVER
    relays: tuple[str, ...] = ()  # full multiaddrs of relays to reserve with (default: the bootstrap peers)
    max_relays: int = 2
    hole_punch: bool = True  # DCUtR: upgrade relayed connections to direct ones
    # A relay's limits: a circuit carries jobs when hole punching fails (symmetric NATs),
    # so it is not the few seconds and 128 KiB go-libp2p allows for upgrading only.
    max_reservations: int = 128
    max_circuits: int = 64  # per relayed peer
    circuit_s: int = 3600
    circuit_bytes: int = 256 << 20


@dataclass
class RelayStats:
    reservations_made: int = 0
    reservations_failed: int = 0
    relayed_dials_ok: int = 0
    relayed_dials_failed: int = 0


@dataclass
class _Held:
    relay: ID
    addr: str  # the relay's transport address we reached it at (with /p2p/<relay>)
    since_s: float = field(default_factory=time.monotonic)


class Relaying:
    """Circuit Relay v2 and DCUtR for one host (run it in the node's nursery).

    ``wants_relay`` says, each round, whether this node should hold reservations
    (the reserve mode and what AutoNAT found); ``relays`` lists candidate relays."""

    def __init__(
        self,
        host: IHost,
        settings: RelaySettings,
        *,
        relays: Callable[[], Sequence[str]],
        wants_relay: Callable[[], bool],
    ) -> None:
        self.host = host
        self.settings = settings
        self._relays = relays
        self._wants_relay = wants_relay
        limits = RelayLimits(
            duration=settings.circuit_s,
            data=settings.circuit_bytes,
            max_circuit_conns=settings.max_circuits,
            max_reservations=settings.max_reservations,
        )
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=settings.serve)
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(limits=limits))
        self.dcutr: DCUtRProtocol | None = None
        if settings.hole_punch:
            self.dcutr = DCUtRProtocol(host, dial_timeout=HOLE_PUNCH_DIAL_S)
            self.dcutr._auto_drive_loop = self._drive_hole_punches  # type: ignore[method-assign]
            dial_public_first(self.dcutr)
        self.stats = RelayStats()
        self._held: dict[ID, _Held] = {}
        self._refused: dict[str, float] = {}  # relay address -> when it last failed us
        self._nursery: trio.Nursery | None = None
        dial_through_relays(host, self)
        trim_relayed_first(host, lambda: self._nursery)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.protocol):
            await self.protocol.event_started.wait()
            if self.dcutr is None:
                task_status.started()
                await self._keep_reservations()
            else:
                async with background_trio_service(self.dcutr):
                    await self.dcutr.event_started.wait()
                    task_status.started()
                    await self._keep_reservations()

    async def _drive_hole_punches(self) -> None:
        """Start hole punches from the side the relay reached (instead of py-libp2p's
        loop, which starts them from both sides at once: two sessions for one pair
        collided and both failed, in about a third of the lab's runs)."""
        assert self.dcutr is not None
        while True:
            await trio.sleep(HOLE_PUNCH_POLL_S)
            for peer, conns in list(self.host.get_network().connections.items()):
                inbound_relayed = any(_is_relayed_conn(c) and not c.muxed_conn.is_initiator for c in conns)
                if not inbound_relayed or not all(_is_relayed_conn(c) for c in conns):
                    continue
                if self.dcutr._hole_punch_attempts.get(peer, 0) >= MAX_HOLE_PUNCHES or peer in self.dcutr._in_progress:
                    continue
                try:
                    await self.dcutr.initiate_hole_punch(peer)
                except Exception as exc:
                    log.debug("hole punch with %s failed: %s", peer, exc)

    def relayed_addrs(self) -> list[str]:
        """Our addresses through the relays holding a slot for us."""
        me = self.host.get_id()
        return [f"{held.addr}/p2p-circuit/p2p/{me}" for held in self._held.values()]

    async def _keep_reservations(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                self._forget_lost()
                if self.settings.reserve is ReserveMode.ALWAYS or (
                    self.settings.reserve is ReserveMode.AUTO and self._wants_relay()
                ):
                    for addr in self._relays():
                        if len(self._held) >= self.settings.max_relays:
                            break
                        await self._reserve(addr, nursery)
                elif self._held:
                    log.info("reachable directly: relayed addresses withdrawn")
                    self._held.clear()
                await trio.sleep(RESERVE_EVERY_S)

    def _forget_lost(self) -> None:
        """Drop slots whose relay connection is gone or whose reservation expired."""
        now = time.time()
        connected = set(self.host.get_connected_peers())
        for relay in list(self._held):
            expires = self.transport._reservations.get(relay, 0)
            if relay not in connected or expires <= now:
                log.info("relay slot lost; reserving again", extra=fields(peer=str(relay)))
                del self._held[relay]

    async def _reserve(self, addr: str, nursery: trio.Nursery) -> None:
        try:
            info = info_from_p2p_addr(Multiaddr(addr))
        except Exception:
            return
        if info.peer_id in self._held or info.peer_id == self.host.get_id():
            return
        if time.monotonic() - self._refused.get(addr, -REFUSED_RETRY_S) < REFUSED_RETRY_S:
            return
        try:
            with trio.fail_after(RELAY_DIAL_TIMEOUT_S):
                await self.host.connect(info)
                stream = await self.host.new_stream(info.peer_id, [TProtocol(HOP_PROTOCOL)])
                ok = await self.transport.reserve(stream, info.peer_id, nursery)
        except Exception as exc:
            log.debug("reservation with %s failed: %s", addr, exc)
            ok = False
        if not ok:
            self.stats.reservations_failed += 1
            self._refused[addr] = time.monotonic()
            return
        self.stats.reservations_made += 1
        transport_addr = addr if "/p2p/" in addr else f"{addr}/p2p/{info.peer_id}"
        self._held[info.peer_id] = _Held(info.peer_id, transport_addr)
        log.info("relay slot held", extra=fields(peer=str(info.peer_id), addr=self.relayed_addrs()[-1]))

    async def dial_relayed(self, peer_id: ID, addrs: Sequence[str]) -> INetConn:
        """A connection to ``peer_id`` through the first of its relayed ``addrs`` that works."""
        last: Exception | None = None
        for addr in addrs:
            full = addr if addr.endswith(f"/p2p/{peer_id}") else f"{addr}/p2p/{peer_id}"
            try:
                with trio.fail_after(RELAY_DIAL_TIMEOUT_S):
                    conn = await self.transport.dial(Multiaddr(full))
            except Exception as exc:
                last = exc
                continue
            self.stats.relayed_dials_ok += 1
            return conn
        self.stats.relayed_dials_failed += 1
        raise SwarmException(f"no relay reached {peer_id}: {last}")

    def connections(self) -> tuple[int, int]:
        """Open connections as (direct, relayed)."""
        direct = relayed = 0
        for conns in self.host.get_network().connections.values():
            for conn in conns:
                if _is_relayed_conn(conn):
                    relayed += 1
                else:
                    direct += 1
        return direct, relayed

    def metrics(self) -> list[Metric]:
        direct, relayed = self.connections()
        s = self.stats
        return [
            metric("cocoon_relay_slots", "gauge", "Relay slots held for us (relayed addresses announced)",
                   len(self._held)),
            metric("cocoon_relay_reservations_total", "counter", "Relay reservations we asked for", s.reservations_made,
                   outcome="ok"),
            metric("cocoon_relay_reservations_total", "counter", "Relay reservations we asked for",
                   s.reservations_failed, outcome="failed"),
            metric("cocoon_relayed_dials_total", "counter", "Dials through a relay", s.relayed_dials_ok, outcome="ok"),
            metric("cocoon_relayed_dials_total", "counter", "Dials through a relay", s.relayed_dials_failed,
                   outcome="failed"),
            metric("cocoon_connections", "gauge", "Open connections by path", direct, path="direct"),
            metric("cocoon_connections", "gauge", "Open connections by path", relayed, path="relayed"),
        ]  # fmt: skip


def _is_relayed_conn(conn: INetConn) -> bool:
    try:
        return any(is_relayed(str(a)) for a in conn.get_transport_addresses()) or (
            str(conn.get_connection_type()).endswith("RELAYED")
        )
    except Exception:
        return False


def trim_relayed_first(host: IHost, nursery_of: Callable[[], trio.Nursery | None]) -> None:
    """Make ``host``'s swarm, when a peer has more connections than it keeps (one), close
    the relayed ones once a direct one exists: after their streams end (a job on its way
    finishes), or :data:`RELAYED_DRAIN_S` at most. py-libp2p trims the connection with
    the fewest streams, which was the new direct one (instance attribute: this host only)."""
    swarm: Any = host.get_network()
    trim = swarm._trim_connections

    def trim_relayed(peer_id: ID) -> None:
        conns = list(swarm.connections.get(peer_id, ()))
        relayed = [c for c in conns if _is_relayed_conn(c)]
        nursery = nursery_of()
        if not relayed or len(relayed) == len(conns) or nursery is None:
            trim(peer_id)
            return
        for conn in relayed:
            nursery.start_soon(_close_when_idle, conn)

    swarm._trim_connections = trim_relayed


async def _close_when_idle(conn: INetConn) -> None:
    with trio.move_on_after(RELAYED_DRAIN_S):
        while conn.get_streams():
            await trio.sleep(0.5)
    try:
        await conn.close()
    except Exception:  # already closed
        pass


def dial_through_relays(host: IHost, relaying: Relaying) -> None:
    """Make ``host``'s swarm dial a peer's relayed addresses (instance attribute: this
    host only), racing its direct ones (given :data:`DIRECT_HEAD_START_S`) when it has both."""
    swarm: Any = host.get_network()
    dial_peer = swarm.dial_peer
    store = host.get_peerstore()

    async def dial_peer_or_relay(peer_id: ID) -> list[INetConn]:
        addrs = [str(a) for a in store.addrs(peer_id)]
        relayed = [a for a in addrs if is_relayed(a)]
        if not relayed:
            return list(await dial_peer(peer_id))
        if len(relayed) == len(addrs):
            return [await relaying.dial_relayed(peer_id, relayed)]
        # Both kinds: the direct addresses first, the relay after a head start; the
        # first connection wins. (A private address from another network does not
        # refuse: it times out, and the relay should not wait for that.)
        won: list[list[INetConn]] = []
        failures: list[Exception] = []

        async def attempt(delay_s: float, dial: Callable[[], Awaitable[list[INetConn]]]) -> None:
            await trio.sleep(delay_s)
            try:
                won.append(await dial())
            except Exception as exc:
                failures.append(exc)
                return
            race.cancel_scope.cancel()

        async def direct() -> list[INetConn]:
            return list(await dial_peer(peer_id))

        async def through_relay() -> list[INetConn]:
            return [await relaying.dial_relayed(peer_id, relayed)]

        async with trio.open_nursery() as race:
            race.start_soon(attempt, 0.0, direct)
            race.start_soon(attempt, DIRECT_HEAD_START_S, through_relay)
        if won:
            return won[0]
        existing = swarm.get_connections(peer_id)
        if existing:  # made meanwhile (the peer dialed us, or a hole punch)
            return list(existing)
        raise SwarmException(f"cannot reach {peer_id}: {'; '.join(map(str, failures))}")

    swarm.dial_peer = dial_peer_or_relay


def stream_is_relayed(host: IHost, peer_id: bytes, stream: Any) -> bool:
    """Whether ``stream`` (to ``peer_id``) runs on a relayed connection."""
    muxed = getattr(stream, "muxed_conn", None)
    for conn in _connections(host, peer_id):
        if conn.muxed_conn is muxed:
            return _is_relayed_conn(conn)
    return False


def has_direct(host: IHost, peer_id: bytes) -> bool:
    """Whether a direct (not relayed) connection to ``peer_id`` is open."""
    return any(
        not _is_relayed_conn(conn) and not getattr(conn, "is_closed", False) for conn in _connections(host, peer_id)
    )


def _connections(host: Any, peer_id: bytes) -> list[INetConn]:
    network = getattr(host, "get_network", None)  # tests' in-memory hosts have no swarm
    return list(network().connections.get(ID(peer_id), ())) if network is not None else []
