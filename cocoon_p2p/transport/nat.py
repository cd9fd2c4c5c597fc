"""What a node tells others about where to reach it, and the services that find out
(trio side): AutoNAT (:mod:`.autonat`), relays and hole punching (:mod:`.relay`).

The addresses a node announces (:meth:`NatTraversal.addrs`), in order:

1. the operator's ``--announce`` addresses, if any: they know their port forwarding
   better than we can guess (nothing is added to them but relayed addresses);
2. otherwise what the host listens on, a wildcard (``0.0.0.0``) listener made into this
   machine's interface addresses, loopback left out unless it is all there is
   (:func:`~.addresses.announceable`);
3. addresses AutoNAT peers reached from outside (a NAT's public address with a
   forwarded or preserved port);
4. relayed addresses, while this node holds relay slots (it is not reachable directly,
   or was told to reserve always).

They are also what the host itself advertises (:func:`advertise`): py-libp2p 0.8.1's
``get_addrs()``, which identify, the signed peer record, the DHT, DCUtR and a relay's
reservations send, is otherwise the raw listen addresses: a peer stored a wildcard
listener's ``/ip4/0.0.0.0/tcp/4001`` and, hole punching, dialed its own machine.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

import trio
from libp2p.abc import IHost
from multiaddr import Multiaddr

from cocoon_p2p.core.metrics import Metric, metric

from .addresses import announceable
from .autonat import FreshDialAutoNAT, Prober
from .reachability import Status
from .relay import Relaying, RelaySettings

log = logging.getLogger(__name__)


def local_ips() -> list[str]:
    """This machine's interface addresses (psutil: a dependency of multiaddr's)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return [
            a.address.split("%")[0]
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)
        ]
    except Exception:  # no psutil, or no permission to list interfaces
        return []


def advertise(host: IHost, addrs: Callable[[], Sequence[str]]) -> None:
    """Make ``host.get_addrs()`` return ``addrs()`` (full multiaddrs, ``.../p2p/<PeerId>``),
    asked afresh at each call (instance attribute: this host only).

    Overridden whole rather than through py-libp2p's ``addrs_factory``: that path strips
    each address's first ``/p2p/`` part and everything after it before appending ours, which
    turns ``<relay>/p2p/<relay-id>/p2p-circuit/p2p/<us>`` into ``<relay>/p2p/<us>``."""

    def get_addrs() -> list[Multiaddr]:
        return [Multiaddr(a) for a in addrs()]

    host.get_addrs = get_addrs  # type: ignore[method-assign]


class NatTraversal:
    """AutoNAT, relaying and the announced addresses of one host (which the host
    advertises from then on: :func:`advertise`)."""

    def __init__(
        self,
        host: IHost,
        settings: RelaySettings,
        *,
        announce: Sequence[str] = (),
        relays: Callable[[], Sequence[str]] = tuple,
    ) -> None:
        self.host = host
        self.settings = settings
        self.announce = list(announce)
        self.autonat = FreshDialAutoNAT(host)
        self.prober = Prober(host, self.autonat)
        self.relaying = Relaying(
            host,
            settings,
            relays=lambda: list(settings.relays) or list(relays()),
            wants_relay=lambda: self.prober.status() is not Status.PUBLIC,
        )
        self._local_ips: list[str] | None = None
        advertise(host, self.addrs)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.relaying.run)
            nursery.start_soon(self.prober.run)
            task_status.started()

    def status(self) -> Status:
        return self.prober.status()

    def addrs(self) -> list[str]:
        """Full multiaddrs (``.../p2p/<PeerId>``) for others to dial us at."""
        me = f"/p2p/{self.host.get_id()}"
        if self.announce:
            direct = list(self.announce)
        else:
            if self._local_ips is None:
                self._local_ips = local_ips()
            listening = [str(a) for a in self.host.get_transport_addrs()]
            direct = announceable(listening, local_ips=self._local_ips)
            direct += [a for a in self.prober.confirmed() if a not in direct]
        out = [a if "/p2p/" in a else a + me for a in direct]
        return out + self.relaying.relayed_addrs()

    def metrics(self) -> list[Metric]:
        status = self.status()
        out = [
            metric("cocoon_reachability", "gauge", "What AutoNAT peers found (1: this status)",
                   1.0 if status is s else 0.0, status=s.value)
            for s in Status
        ]  # fmt: skip
        out.append(metric("cocoon_autonat_dial_backs_total", "counter", "Dial-backs done for peers asking",
                          self.autonat.dial_backs))  # fmt: skip
        return out + self.relaying.metrics()
