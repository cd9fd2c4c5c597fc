"""Address scopes, and the warning a node whose addresses reach nobody outside gets."""

from __future__ import annotations

import pytest
from multiaddr import Multiaddr

from cocoon_p2p.transport.addresses import (
    Scope,
    announceable,
    is_lan,
    is_relayed,
    reachability_warning,
    scope,
    tcp_port,
)

P = "/tcp/4001/p2p/12D3KooWExample"


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        ("/ip4/127.0.0.1" + P, Scope.LOOPBACK),
        ("/ip6/::1/tcp/4001", Scope.LOOPBACK),
        ("/ip4/0.0.0.0/tcp/4001", Scope.UNSPECIFIED),
        ("/ip4/10.0.1.2" + P, Scope.PRIVATE),
        ("/ip4/192.168.1.20/tcp/4001", Scope.PRIVATE),
        ("/ip4/100.64.0.7/tcp/4001", Scope.PRIVATE),  # carrier-grade NAT: not reachable from outside
        ("/ip4/169.254.3.4/tcp/4001", Scope.PRIVATE),  # link-local
        ("/ip6/fd00::1/tcp/4001", Scope.PRIVATE),
        ("/ip4/8.8.8.8" + P, Scope.PUBLIC),
        ("/ip6/2001:4860::8888/tcp/4001", Scope.PUBLIC),
        ("/dns4/boot.example.org/tcp/4001", Scope.PUBLIC),
    ],
)
def test_scope(addr: str, expected: Scope) -> None:
    assert scope(addr) is expected


@pytest.mark.parametrize("bad", ["", "ip4/1.2.3.4", "/unix/tmp/sock", "/ip4/not-an-ip/tcp/1"])
def test_a_multiaddr_without_a_host_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        scope(bad)


def test_the_warning_says_who_can_reach_the_node() -> None:
    assert reachability_warning(["/ip4/10.0.1.2" + P, "/ip4/8.8.8.8" + P]) is None  # one public address is enough
    loopback = reachability_warning(["/ip4/127.0.0.1" + P])
    assert loopback is not None and "only this machine" in loopback
    private = reachability_warning(["/ip4/10.0.1.2" + P, "/ip4/127.0.0.1" + P, "/ip4/0.0.0.0/tcp/4001"])
    assert private is not None and "peers outside its network cannot dial them" in private and "10.0.1.2" in private
    assert "relay" in private
    assert reachability_warning([]) is not None
    assert reachability_warning(["/unix/tmp/sock", "/ip4/8.8.8.8" + P]) is None  # what it cannot judge is left out


@pytest.mark.parametrize(
    ("listening", "local_ips", "expected"),
    [
        # a wildcard listener becomes this machine's addresses (loopback and link-local left out)
        (["/ip4/0.0.0.0/tcp/4001"], ["127.0.0.1", "10.0.1.2", "fe80::1"], ["/ip4/10.0.1.2/tcp/4001"]),
        (["/ip6/::/tcp/4001"], ["10.0.1.2", "2001:db8::5"], ["/ip6/2001:db8::5/tcp/4001"]),
        # loopback is told only when it is all there is (a network on one machine)
        (["/ip4/127.0.0.1/tcp/5"], [], ["/ip4/127.0.0.1/tcp/5"]),
        (["/ip4/127.0.0.1/tcp/5", "/ip4/1.2.3.4/tcp/9"], [], ["/ip4/1.2.3.4/tcp/9"]),
        (["/ip4/0.0.0.0/tcp/4001"], ["127.0.0.1"], ["/ip4/127.0.0.1/tcp/4001"]),
        # relayed addresses are not the host's to list; duplicates go
        (
            ["/ip4/1.2.3.4/tcp/9", "/ip4/1.2.3.4/tcp/9", "/ip4/5.6.7.8/tcp/1/p2p/R/p2p-circuit"],
            [],
            ["/ip4/1.2.3.4/tcp/9"],
        ),
    ],
)
def test_announceable(listening: list[str], local_ips: list[str], expected: list[str]) -> None:
    assert announceable(listening, local_ips=local_ips) == expected


def test_relayed_and_ports() -> None:
    assert is_relayed("/ip4/1.2.3.4/tcp/4001/p2p/R/p2p-circuit/p2p/W") and not is_relayed("/ip4/1.2.3.4/tcp/4001")
    assert tcp_port("/ip4/1.2.3.4/tcp/4001/p2p/X") == 4001 and tcp_port("/ip4/1.2.3.4/udp/53") is None


@pytest.mark.parametrize(
    ("addr", "lan"),
    [
        # IPv4: private networks, carrier-grade NAT, link-local, loopback, wildcards
        ("/ip4/10.0.1.2" + P, True),
        ("/ip4/172.16.0.1/tcp/4001", True),
        ("/ip4/172.31.255.254/tcp/4001", True),
        ("/ip4/172.32.0.1/tcp/4001", False),  # just past 172.16.0.0/12
        ("/ip4/192.168.1.20/tcp/4001", True),
        ("/ip4/100.64.0.7/tcp/4001", True),
        ("/ip4/100.128.0.1/tcp/4001", False),  # just past 100.64.0.0/10
        ("/ip4/169.254.3.4/tcp/4001", True),
        ("/ip4/127.0.0.1" + P, True),
        ("/ip4/127.1.2.3/udp/4001/quic-v1", True),
        ("/ip4/0.0.0.0/tcp/4001", True),
        ("/ip4/8.8.8.8" + P, False),
        # the lab's "internet": documentation ranges that is_global calls private (scope() too)
        ("/ip4/203.0.113.10/tcp/4001", False),
        ("/ip4/198.51.100.7/tcp/4001", False),
        # IPv6
        ("/ip6/::/tcp/4001", True),
        ("/ip6/::1/tcp/4001", True),
        ("/ip6/fd00::1/tcp/4001", True),
        ("/ip6/fc12:3456::1/tcp/4001", True),
        ("/ip6/fe80::1/tcp/4001", True),
        ("/ip6zone/eth0/ip6/fe80::1/tcp/4001", True),
        ("/ip6/::ffff:192.168.1.2/tcp/4001", True),  # an IPv4-mapped private address
        ("/ip6/2001:4860::8888/tcp/4001", False),
        ("/ip6/2001:db8::5/tcp/4001", False),
        # names and hostless addresses: nothing to judge
        ("/dns4/boot.example.org/tcp/4001", False),
        ("/dns6/localhost/tcp/4001", False),
        ("/dns/10.0.0.1.example/tcp/4001", False),
        ("/unix/tmp/sock", False),
        ("", False),
        ("ip4/10.0.0.1", False),
        # relayed addresses: judged by the relay's host
        ("/ip4/203.0.113.5/tcp/4001/p2p/R/p2p-circuit/p2p/W", False),
        ("/ip4/192.168.1.1/tcp/4001/p2p/R/p2p-circuit/p2p/W", True),
    ],
)
def test_is_lan(addr: str, lan: bool) -> None:
    assert is_lan(addr) is lan


@pytest.mark.parametrize(
    ("addr", "lan"),
    [("/ip4/10.0.0.3/tcp/4001", True), ("/ip4/203.0.113.10/tcp/4001", False), ("/ip6/fe80::1/tcp/1", True)],
)
def test_is_lan_takes_a_multiaddr(addr: str, lan: bool) -> None:
    assert is_lan(Multiaddr(addr)) is lan
