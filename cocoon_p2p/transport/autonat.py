"""AutoNAT (trio side): asking peers to dial us back, and answering them honestly.

py-libp2p 0.8.1's AutoNAT server dials the asker back with ``host.connect``, which
returns the connection the asker is already on: every asker, NATed or not, was told
it is reachable (seen in the NAT lab). :class:`FreshDialAutoNAT` dials back on a new
TCP connection instead and counts it as reached when a libp2p listener answers the
multistream-select header: a NAT drops unsolicited SYNs, so only a reachable
listener gets that far. It also answers one request per asking IP per
:data:`ANSWER_EVERY_S` (a dial-back costs us a connection; an attacker could
otherwise make us dial anywhere its IP listens, as fast as it asks).

:class:`Prober` is the asking side: it proposes :func:`~.reachability.candidates`
(our observed IPs at our listen port, our own addresses) to a few connected peers
that serve AutoNAT and feeds their verdicts to a :class:`~.reachability.Reachability`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from .addresses import tcp_port
from .reachability import Reachability, Status, candidates

log = logging.getLogger(__name__)

ANSWER_EVERY_S = 4.0
DIAL_BACK_TIMEOUT_S = 3.0
ASK_TIMEOUT_S = 8.0
PROBE_UNKNOWN_S = 5.0  # how often to ask while nothing is decided
PROBE_DECIDED_S = 600.0  # and once it is (a NAT or an address can change)
HEADER = b"/multistream/1.0.0\n"


class FreshDialAutoNAT(AutoNATService):
    """AutoNAT v1 that dials back on a fresh connection, rate-limited per asking IP."""

    def __init__(self, host: Any, serve: bool = True) -> None:
        super().__init__(host, serve=serve, confirmations=1)
        self._answered: dict[str, float] = {}
        self.dial_backs = 0
        self.refused = 0

    async def _handle_dial(self, message: Message, observed_ip: str | None, is_relayed: bool) -> Message:
        now = time.monotonic()
        key = observed_ip or ""
        if now - self._answered.get(key, -ANSWER_EVERY_S) < ANSWER_EVERY_S:
            self.refused += 1
            response = Message()
            response.type = Message.DIAL_RESPONSE
            response.dialResponse.status = Message.E_DIAL_REFUSED
            response.dialResponse.statusText = "asked too often"
            return response
        if len(self._answered) > 4096:  # forget old askers, keep the map small
            self._answered = {ip: t for ip, t in self._answered.items() if now - t < ANSWER_EVERY_S}
        self._answered[key] = now
        return await super()._handle_dial(message, observed_ip, is_relayed)

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs:
            try:
                parts = str(Multiaddr(raw)).split("/")
            except Exception:
                continue
            port = tcp_port(str(Multiaddr(raw)))
            if port is None or parts[1] not in ("ip4", "ip6"):
                continue
            self.dial_backs += 1
            if await listener_answers(parts[2], port):
                return raw
        return None


async def listener_answers(ip: str, port: int, timeout_s: float = DIAL_BACK_TIMEOUT_S) -> bool:
    """Whether a new TCP connection to ip:port reaches a libp2p listener (it answers
    multistream-select's header)."""
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(ip, port)
        except OSError:
            return False
        async with stream:
            try:
                await stream.send_all(bytes([len(HEADER)]) + HEADER)
                got = b""
                while len(got) < len(HEADER) + 1:
                    chunk = await stream.receive_some(64)
                    if not chunk:
                        break
                    got += chunk
                return HEADER in got
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return False
    return False


class Prober:
    """Asks peers to dial us back and keeps what they found in ``reachability``."""

    def __init__(self, host: IHost, autonat: FreshDialAutoNAT, reachability: Reachability | None = None) -> None:
        self.host = host
        self.autonat = autonat
        self.reachability = reachability or Reachability()
        self._askable = 0

    def status(self) -> Status:
        return self.reachability.status(time.time(), askable=self._askable)

    def confirmed(self) -> list[str]:
        return self.reachability.confirmed(time.time()) if self.status() is Status.PUBLIC else []

    def servers(self) -> list[ID]:
        """Connected peers that answer AutoNAT."""
        store = self.host.get_peerstore()
        out = []
        for peer in self.host.get_connected_peers():
            try:
                if store.supports_protocols(peer, [str(AUTONAT_PROTOCOL_ID)]):
                    out.append(peer)
            except Exception:
                continue
        return out

    def candidates(self) -> list[str]:
        manager = getattr(self.host, "_observed_addr_manager", None)
        observed = [str(a) for a in manager.addrs(min_observers=1)] if manager is not None else []
        own = [str(a) for a in self.host.get_transport_addrs()]
        ports = sorted({p for a in own if (p := tcp_port(a))})
        return candidates(observed, ports, own)

    async def run(self) -> None:
        while True:
            await self.probe_once()
            await trio.sleep(PROBE_UNKNOWN_S if self.status() is Status.UNKNOWN else PROBE_DECIDED_S)

    async def probe_once(self) -> None:
        servers = self.servers()
        self._askable = len(servers)
        cands = self.candidates()
        if not servers or not cands:
            return
        before = self.status()
        for server in servers[: self.reachability.required]:
            try:
                with trio.fail_after(ASK_TIMEOUT_S):
                    status, addr = await self.autonat.query_server(
                        server, [Multiaddr(c).to_bytes() for c in cands], timeout=ASK_TIMEOUT_S
                    )
            except Exception as exc:
                log.debug("AutoNAT: %s did not answer: %s", server, exc)
                continue
            if status == Message.E_DIAL_REFUSED:  # asked too often, or none of ours at the IP it sees: no verdict
                continue
            reached = str(Multiaddr(addr)) if status == Message.OK and addr else None
            self.reachability.record(server.to_bytes(), reached, time.time())
        after = self.status()
        if after is not before:
            log.info("reachability: %s %s", after.value, " ".join(self.confirmed()))
