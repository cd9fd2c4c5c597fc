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
        f"this node's addresses are all private ({shown}): peers outside its network cannot reach it; "
        "announce a public address (--announce) after forwarding a port to it"
    )
