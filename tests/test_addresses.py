"""Address scopes, and the warning a node whose addresses reach nobody outside gets."""

from __future__ import annotations

import pytest

from cocoon_p2p.transport.addresses import Scope, reachability_warning, scope

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
    assert private is not None and "peers outside its network cannot reach it" in private and "10.0.1.2" in private
    assert reachability_warning([]) is not None
    assert reachability_warning(["/unix/tmp/sock", "/ip4/8.8.8.8" + P]) is None  # what it cannot judge is left out
