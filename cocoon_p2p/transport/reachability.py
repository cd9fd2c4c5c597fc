"""Whether this node can be dialed from outside, and at which address (pure).

A node behind a NAT sees only its private address; its peers see the router's
(identify's *observed address*). A NAT that keeps a flow's source port (Linux
``MASQUERADE`` does when it is free) maps our fixed listen port to the same port
on the router, so ``observed IP : listen port`` is the address to try. Whether it
works only a dial from outside can tell: peers are asked to dial each candidate
back on a fresh connection (AutoNAT). :class:`Reachability` gathers their verdicts
and decides:

* ``PUBLIC``: ``required`` distinct peers reached us; the addresses they reached
  are announced (:attr:`Reachability.confirmed`) and no relay is needed;
* ``PRIVATE``: ``required`` peers could not; we reserve relay slots and announce
  relayed addresses;
* ``UNKNOWN``: not enough verdicts yet (treated as PRIVATE by the relay policy:
  a reservation costs little, an unreachable worker earns nothing).

``required`` is at most :data:`CONFIRMATIONS` but never more than the peers that
can be asked (a network of one bootstrap peer still decides), and one liar cannot
flip a verdict that others made.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CONFIRMATIONS = 3  # distinct peers that must agree (AutoNAT's spec says more than 3 for big networks)
VERDICT_TTL_S = 1800.0  # a verdict older than this is forgotten (the NAT or the address may change)


class Status(enum.Enum):
    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


@dataclass(frozen=True)
class Verdict:
    """A peer's answer: it reached ``addr`` (or nothing: ``addr`` empty) at ``at_s``."""

    peer: bytes
    addr: str
    at_s: float

    @property
    def reached(self) -> bool:
        return bool(self.addr)


@dataclass
class Reachability:
    """Verdicts of distinct peers and the status they add up to."""

    required: int = CONFIRMATIONS
    ttl_s: float = VERDICT_TTL_S
    verdicts: dict[bytes, Verdict] = field(default_factory=dict)

    def record(self, peer: bytes, reached: str | None, now_s: float) -> None:
        """``peer`` dialed us back and reached ``reached`` (None: it could not)."""
        self.verdicts[peer] = Verdict(peer, reached or "", now_s)

    def status(self, now_s: float, *, askable: int) -> Status:
        """What the fresh verdicts say, needing ``min(required, askable)`` of one kind
        (``askable``: peers that could be asked at all)."""
        fresh = [v for v in self.verdicts.values() if now_s - v.at_s <= self.ttl_s]
        need = max(1, min(self.required, askable))
        yes = sum(v.reached for v in fresh)
        no = len(fresh) - yes
        if yes >= need and yes > no:
            return Status.PUBLIC
        if no >= need and no >= yes:
            return Status.PRIVATE
        return Status.UNKNOWN

    def confirmed(self, now_s: float) -> list[str]:
        """Addresses peers reached recently (most often first)."""
        counts: dict[str, int] = {}
        for v in self.verdicts.values():
            if v.reached and now_s - v.at_s <= self.ttl_s:
                counts[v.addr] = counts.get(v.addr, 0) + 1
        return sorted(counts, key=lambda a: -counts[a])


def candidates(observed: Iterable[str], listen_ports: Sequence[int], own: Sequence[str] = ()) -> list[str]:
    """Addresses to have dialed back: each observed IP (from peers' identify; their
    ports are our outgoing connections' and useless) at each of our listen ports, and
    our own addresses. Loopback, link-local and unspecified IPs are left out: a peer
    that dials those reaches itself, not us. (A private one stays: the AutoNAT server
    dials only addresses at the IP it sees us at, so behind a NAT it is refused.)"""
    out: list[str] = []
    for addr in observed:
        ip = _ip_of(addr)
        if ip is not None and _remote(ip):
            kind = "ip6" if ip.version == 6 else "ip4"
            out += [f"/{kind}/{ip}/tcp/{port}" for port in listen_ports if port]
    for addr in own:
        ip = _ip_of(addr)
        if ip is not None and _remote(ip):
            out.append(addr)
    return list(dict.fromkeys(out))


def _ip_of(multiaddr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    parts = multiaddr.split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        return ipaddress.ip_address(parts[2])
    except ValueError:
        return None


def _remote(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (ip.is_loopback or ip.is_unspecified or ip.is_link_local)
