"""Where a multiaddr can be reached from: this machine, its private network, or anywhere.

Pure (no I/O). A worker whose every announced address is loopback, private or unspecified
cannot be reached by peers outside its network, however well it serves: its operator is
told at start (:func:`reachability_warning`). Names (``/dns4/``, ``/dns6/``, ``/dns/``)
count as reachable: what they resolve to is not ours to judge here.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiaddr import Multiaddr


class Scope(enum.Enum):
    """How far an address reaches."""

    LOOPBACK = "loopback"  # this machine only
    UNSPECIFIED = "unspecified"  # 0.0.0.0 or :: : a listening wildcard, no one's address
    PRIVATE = "private"  # a private, link-local or other non-global network
    PUBLIC = "public"  # a global address, or a name


def scope(multiaddr: str) -> Scope:
    """The scope of ``multiaddr``'s first component (``/ip4/...``, ``/ip6/...``, ``/dns.../...``).
    ValueError for a multiaddr without a host part."""
    parts = multiaddr.split("/")
    if len(parts) < 3 or parts[0] != "":
        raise ValueError(f"not a multiaddr with a host: {multiaddr!r}")
    kind, host = parts[1], parts[2]
    if kind in ("dns", "dns4", "dns6", "dnsaddr"):
        return Scope.PUBLIC
    if kind not in ("ip4", "ip6"):
        raise ValueError(f"not a multiaddr with a host: {multiaddr!r}")
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        return Scope.UNSPECIFIED
    if ip.is_loopback:
        return Scope.LOOPBACK
    return Scope.PUBLIC if ip.is_global else Scope.PRIVATE


def reachability_warning(addrs: Sequence[str]) -> str | None:
    """A warning when no address in ``addrs`` reaches beyond this machine or its private
    network (None when one does). Addresses without a host part are left out."""
    scopes = []
    for a in addrs:
        try:
            scopes.append(scope(a))
        except ValueError:
            continue  # a kind we cannot judge (unix socket, ...): it reaches no remote peer either
    if Scope.PUBLIC in scopes:
        return None
    shown = ", ".join(addrs) or "none"
    if scopes and all(s is Scope.LOOPBACK for s in scopes):
        return f"this node's addresses are loopback only ({shown}): only this machine can reach it"
    return (
        f"this node's addresses are all private ({shown}): peers outside its network cannot dial them; "
        "a worker reserves a relay slot on its bootstrap peers unless AutoNAT finds it reachable, or "
        "announce a public address (--announce) after forwarding a port to it"
    )


# Where no peer outside the network can dial (go-libp2p's private ranges, plus loopback and
# wildcards). Not "not is_global": that also takes in the documentation ranges
# (203.0.113.0/24...), which the NAT lab uses as its public internet.
_LAN_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",  # carrier-grade NAT
        "169.254.0.0/16",  # link-local
        "127.0.0.0/8",
        "0.0.0.0/8",
        "::/128",
        "::1/128",
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
    )
)


def is_lan(addr: str | Multiaddr) -> bool:
    """Whether ``addr``'s host is an IP of a private network, loopback, link-local or a
    wildcard: an address only peers on that network (or machine) can dial.

    The first component is judged, so a relayed address is judged by its relay's host.
    Names (``/dns*/``) and addresses without an IP are not LAN: nothing to judge."""
    parts = str(addr).split("/")
    if len(parts) < 3 or parts[0] != "":
        return False
    if parts[1] == "ip6zone":  # a zone only ever qualifies a link-local address
        return True
    if parts[1] not in ("ip4", "ip6"):
        return False
    try:
        ip = ipaddress.ip_address(parts[2])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in _LAN_NETWORKS)


def is_relayed(multiaddr: str) -> bool:
    """Whether ``multiaddr`` goes through a relay (``.../p2p-circuit/...``)."""
    return "/p2p-circuit" in multiaddr


def tcp_port(multiaddr: str) -> int | None:
    """The TCP port of an ``/ip4|ip6|dns*/HOST/tcp/PORT...`` address (None: none)."""
    parts = multiaddr.split("/")
    if len(parts) >= 5 and parts[3] == "tcp" and parts[4].isdigit():
        return int(parts[4])
    return None


def announceable(transport_addrs: Sequence[str], *, local_ips: Sequence[str] = ()) -> list[str]:
    """The addresses worth telling other peers, from what the host listens on.

    A wildcard listener (``0.0.0.0``, ``::``) becomes one address per ``local_ips``
    of its family (no one can dial a wildcard); loopback addresses are told only when
    nothing else is (a node on one machine, as in tests), since a remote peer that
    dials them reaches itself. Order is kept; duplicates and relayed addresses go."""
    out: list[str] = []
    for addr in transport_addrs:
        if is_relayed(addr):
            continue
        try:
            where = scope(addr)
        except ValueError:
            continue
        if where is Scope.UNSPECIFIED:
            kind, _, rest = addr.split("/", 3)[1:]
            v6 = kind == "ip6"
            out += [
                f"/{kind}/{ip}/{rest}"
                for ip in local_ips
                if (":" in ip) == v6 and not ipaddress.ip_address(ip).is_loopback
            ]
        else:
            out.append(addr)
    unique = list(dict.fromkeys(out))
    remote = [a for a in unique if scope(a) is not Scope.LOOPBACK]
    if remote:
        return remote
    if unique:
        return unique
    # Only wildcards and no other interface: this machine, then.
    return [
        a.replace("/0.0.0.0/", "/127.0.0.1/").replace("/::/", "/::1/")
        for a in transport_addrs
        if scope(a) is Scope.UNSPECIFIED
    ]
