"""Finding peers on the same local network with no bootstrap peer (trio side): mDNS.

py-libp2p's :class:`~libp2p.discovery.mdns.mdns.MDNSDiscovery` (zeroconf) announces our
addresses as ``dnsaddr`` TXT records of a ``_p2p._udp.local.`` service and puts the peers
it hears of into the peerstore, where the :class:`~.dialer.Dialer` finds them. Around it:

* zeroconf's set-up and registration block (multicast sockets, ~1 s of probing): they
  run in a thread, not on the node's event loop;
* we announce the addresses we tell everyone (:meth:`~cocoon_p2p.node.Node.addrs`, less
  relayed ones), not py-libp2p's guess of this machine's IP (it asks the route to 8.8.8.8);
* a node whose every address is loopback has no network to find peers on and runs none
  (tests run many nodes on one machine: they must not find each other this way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import IHost

from cocoon_p2p.transport.addresses import Scope, is_relayed, scope, tcp_port

log = logging.getLogger(__name__)

CLEANUP_EVERY_S = 60.0
TTL_S = 120


def lan_addrs(addrs: list[str]) -> list[str]:
    """The addresses worth announcing on the LAN (transport part only): not relayed,
    not loopback."""
    out = []
    for a in addrs:
        if is_relayed(a):
            continue
        transport = a.split("/p2p/")[0]
        try:
            if scope(transport) is not Scope.LOOPBACK:
                out.append(transport)
        except ValueError:
            continue
    return out


class LanDiscovery:
    """mDNS discovery for one host (run it in the node's nursery)."""

    def __init__(self, host: IHost, addrs: Callable[[], list[str]]) -> None:
        self.host = host
        self.addrs = addrs
        self.mdns: Any = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        announce = lan_addrs(self.addrs())
        port = next((p for a in announce if (p := tcp_port(a))), None)
        if not announce or port is None:
            log.debug("mDNS off: no address on a local network")
            task_status.started()
            return
        from libp2p.discovery.mdns.mdns import MDNSDiscovery

        network = self.host.get_network()

        def start() -> Any:
            mdns = MDNSDiscovery(network, port=port, listen_addrs=announce, ttl=TTL_S)
            mdns.broadcaster.register()
            return mdns

        try:
            self.mdns = await trio.to_thread.run_sync(start)
        except Exception as exc:  # no multicast here (a container without it): the node runs on
            log.warning("mDNS unavailable: %s", exc)
            task_status.started()
            return
        task_status.started()
        try:
            while True:
                await trio.sleep(CLEANUP_EVERY_S)
                self.mdns.listener.cleanup_stale_entries(max_age=TTL_S * 2)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._stop)

    def _stop(self) -> None:
        try:
            self.mdns.broadcaster.unregister()
            self.mdns.listener.stop()
            self.mdns.zeroconf.close()
        except Exception as exc:
            log.debug("mDNS stop: %s", exc)
