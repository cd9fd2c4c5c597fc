"""What one peer, or one IP address, may hold open on a node. Pure policy.

Four limits, each refusal counted by kind (:class:`Refusal`):

* **handshakes in progress** (TCP accepted, Noise and yamux not done yet), all
  peers together: slow or silent dialers cannot pile up tasks and sockets;
* **connections per IP** (inbound, established or still in their handshake): many
  identities behind one address cannot take every slot;
* **connections per peer** (either direction): one identity gets at most a couple;
* **inbound streams per peer** (over all its connections): one peer cannot hold
  thousands of open streams, each a task and buffers on our side.

:class:`Admission` decides from counts the caller reads from the live state
(the swarm's connections, the yamux sessions' streams), so a count can never
drift from what is open; the only count it keeps itself, handshakes in progress,
the caller releases in a ``finally``. The trio side is
:func:`~cocoon_p2p.transport.host.enforce_limits`. py-libp2p's own resource
manager is not used: measured in ``docs/upstream/rcmgr-accounting-leak.md``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.core.metrics import Metric, metric


class Refusal(enum.Enum):
    """Why a connection or a stream was refused."""

    PENDING_HANDSHAKES = "pending-handshakes"
    IP_CONNECTIONS = "ip-connections"
    PEER_CONNECTIONS = "peer-connections"
    PEER_STREAMS = "peer-streams"


@dataclass(frozen=True, kw_only=True)
class ResourceLimits:
    """The limits. The defaults leave room for many nodes on one machine (tests,
    the demo); a public node behind one address per peer can lower the per-IP one."""

    max_pending_handshakes: int = 128
    max_connections_per_ip: int = 64
    max_connections_per_peer: int = 3  # both sides dialing make two, briefly; a hole punch beside a relayed one, three
    max_inbound_streams_per_peer: int = 256

    def __post_init__(self) -> None:
        for name in ("max_pending_handshakes", "max_connections_per_ip", "max_connections_per_peer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.max_inbound_streams_per_peer < 0:
            raise ConfigError("max_inbound_streams_per_peer must not be negative")


@dataclass
class Admission:
    """Admits or refuses handshakes, connections and inbound streams under ``limits``."""

    limits: ResourceLimits = field(default_factory=ResourceLimits)
    refused: dict[Refusal, int] = field(default_factory=lambda: dict.fromkeys(Refusal, 0))
    _pending: dict[str, int] = field(default_factory=dict)  # handshakes in progress, by remote IP

    @property
    def pending_handshakes(self) -> int:
        return sum(self._pending.values())

    def begin_handshake(self, ip: str, *, inbound_from_ip: int) -> Refusal | None:
        """A connection from ``ip`` was accepted; ``inbound_from_ip`` established
        inbound connections from that address are open. None: go ahead, and call
        :meth:`end_handshake` when the handshake ends, however it ends."""
        if self.pending_handshakes >= self.limits.max_pending_handshakes:
            return self._refuse(Refusal.PENDING_HANDSHAKES)
        if inbound_from_ip + self._pending.get(ip, 0) >= self.limits.max_connections_per_ip:
            return self._refuse(Refusal.IP_CONNECTIONS)
        self._pending[ip] = self._pending.get(ip, 0) + 1
        return None

    def end_handshake(self, ip: str) -> None:
        """The handshake admitted by :meth:`begin_handshake` ended (the connection is
        now established, and counted as such by the caller, or it failed)."""
        left = self._pending.get(ip, 0) - 1
        if left > 0:
            self._pending[ip] = left
        else:
            self._pending.pop(ip, None)

    def admit_connection(self, *, open_with_peer: int) -> Refusal | None:
        """A connection to a peer finished its handshake; ``open_with_peer`` others
        to the same peer are open. None: keep it."""
        if open_with_peer >= self.limits.max_connections_per_peer:
            return self._refuse(Refusal.PEER_CONNECTIONS)
        return None

    def admit_inbound_stream(self, *, open_from_peer: int) -> Refusal | None:
        """A peer opened a stream; ``open_from_peer`` of its inbound streams are open,
        this one included. None: accept it."""
        if open_from_peer > self.limits.max_inbound_streams_per_peer:
            return self._refuse(Refusal.PEER_STREAMS)
        return None

    def _refuse(self, why: Refusal) -> Refusal:
        self.refused[why] += 1
        return why

    def metrics(self) -> list[Metric]:
        return [
            metric(
                "cocoon_handshakes_pending",
                "gauge",
                "Inbound connections still in their Noise/yamux handshake",
                self.pending_handshakes,
            )
        ] + [
            metric(
                "cocoon_resource_refusals_total",
                "counter",
                "Connections and streams refused by a resource limit",
                n,
                limit=why.value,
            )
            for why, n in self.refused.items()
        ]
