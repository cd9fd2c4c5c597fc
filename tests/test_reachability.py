"""AutoNAT's verdicts (pure), the addresses a node proposes for dial-back, the honest
dial-back itself (a real libp2p listener answers; a closed port does not), and the
addresses identify tells peers (the announced ones, never a wildcard)."""

from __future__ import annotations

import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from cocoon_p2p.core.identity import Identity
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.transport.addresses import Scope, scope
from cocoon_p2p.transport.autonat import listener_answers
from cocoon_p2p.transport.reachability import Reachability, Status, candidates

A, B, C, D = b"a", b"b", b"c", b"d"
ADDR = "/ip4/198.51.100.7/tcp/4001"


@pytest.mark.parametrize(
    ("answers", "askable", "expected"),
    [
        ([], 3, Status.UNKNOWN),
        ([(A, ADDR)], 3, Status.UNKNOWN),  # one peer is not enough where three can be asked
        ([(A, ADDR)], 1, Status.PUBLIC),  # ... but it is all a network of one can say
        ([(A, ADDR), (B, ADDR), (C, ADDR)], 5, Status.PUBLIC),
        ([(A, None), (B, None), (C, None)], 5, Status.PRIVATE),
        ([(A, ADDR), (B, ADDR), (C, ADDR), (D, None)], 5, Status.PUBLIC),  # one liar flips nothing
        ([(A, None), (B, None), (C, None), (D, ADDR)], 5, Status.PRIVATE),
        ([(A, ADDR), (A, None)], 1, Status.PRIVATE),  # one verdict per peer: its latest
    ],
)
def test_status_needs_agreeing_peers(answers: list[tuple[bytes, str | None]], askable: int, expected: Status) -> None:
    r = Reachability()
    for peer, reached in answers:
        r.record(peer, reached, now_s=100.0)
    assert r.status(100.0, askable=askable) is expected


def test_verdicts_expire_and_confirmed_addresses_rank_by_votes() -> None:
    r = Reachability(ttl_s=60)
    other = "/ip4/198.51.100.7/tcp/5000"
    r.record(A, ADDR, 0.0)
    r.record(B, ADDR, 0.0)
    r.record(C, other, 0.0)
    assert r.confirmed(10.0) == [ADDR, other]
    assert r.status(61.0, askable=3) is Status.UNKNOWN and r.confirmed(61.0) == []


def test_candidates_are_observed_ips_at_our_listen_ports_and_our_own_addresses() -> None:
    observed = ["/ip4/203.0.113.100/tcp/51234", "/ip4/127.0.0.1/tcp/1", "/ip4/203.0.113.100/tcp/40000"]
    own = ["/ip4/10.0.1.2/tcp/4001", "/ip4/127.0.0.1/tcp/4001", "/ip4/0.0.0.0/tcp/4001"]
    assert candidates(observed, [4001], own) == ["/ip4/203.0.113.100/tcp/4001", "/ip4/10.0.1.2/tcp/4001"]


async def test_a_dial_back_reaches_only_a_listening_libp2p_node() -> None:
    async with Node(NodeConfig()) as node:
        port = int(node.addrs[0].split("/")[4])
        assert await listener_answers("127.0.0.1", port)
    assert not await listener_answers("127.0.0.1", port)  # the node is gone: nothing answers
    with trio.socket.socket() as s:  # something listens, but not libp2p: no answer to the header
        await s.bind(("127.0.0.1", 0))
        s.listen()
        assert not await listener_answers("127.0.0.1", s.getsockname()[1], timeout_s=0.5)


async def test_identify_tells_a_peer_the_announced_addresses_not_the_wildcard() -> None:
    # py-libp2p's identify sends the host's get_addrs(): for a wildcard listener that was
    # /ip4/0.0.0.0/tcp/P, which a peer stored and then dialed (its own machine) to hole-punch.
    async with Node(NodeConfig(listen_addrs=["/ip4/0.0.0.0/tcp/0"])) as a, Node(NodeConfig()) as b:
        announced = a.addrs
        if all(scope(addr) is Scope.LOOPBACK for addr in announced):
            pytest.skip("this machine has no interface address but loopback")
        assert [str(addr) for addr in a.host.get_addrs()] == announced
        # B dials A at loopback, which A does not announce (it has another address): the
        # identify answer replaces B's addresses for A, so when it is gone, identify is done.
        port = announced[0].split("/")[4]
        dialed = f"/ip4/127.0.0.1/tcp/{port}"
        await b.host.connect(info_from_p2p_addr(Multiaddr(f"{dialed}/p2p/{a.peer_id_str}")))
        store, suffix = b.host.get_peerstore(), f"/p2p/{a.peer_id_str}"

        def learned() -> set[str]:
            return {str(addr).removesuffix(suffix) for addr in store.addrs(a.host.get_id())}

        with trio.fail_after(10):
            while dialed in learned():
                await trio.sleep(0.05)
        assert not any(scope(addr) is Scope.UNSPECIFIED for addr in learned())
        assert learned() == {addr.removesuffix(suffix) for addr in announced}


def test_the_host_advertises_relayed_addresses_whole() -> None:
    # py-libp2p's own hook (addrs_factory) cuts one back to the relay's transport address.
    me, relay = Identity.generate(), Identity.generate()
    relayed = f"/ip4/203.0.113.5/tcp/4001/p2p/{relay.peer_id_str}/p2p-circuit/p2p/{me.peer_id_str}"
    node = Node(NodeConfig(identity=me, announce_addrs=["/ip4/198.51.100.7/tcp/4001", relayed]))
    expected = [f"/ip4/198.51.100.7/tcp/4001/p2p/{me.peer_id_str}", relayed]
    assert [str(addr) for addr in node.host.get_addrs()] == node.addrs == expected
