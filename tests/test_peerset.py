import random

import pytest

from cocoon_p2p.core.errors import ConfigError
from cocoon_p2p.overlay.peerset import PeerSet, split_p2p_addr

from .helpers import ident

A, B, C = ident(1), ident(2), ident(3)


def addr(who, port: int = 1) -> str:  # type: ignore[no-untyped-def]
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{who.peer_id_str}"


def test_split() -> None:
    assert split_p2p_addr(addr(A)) == (A.peer_id, "/ip4/127.0.0.1/tcp/1")
    for bad in ["/ip4/1.2.3.4/tcp/1", f"/p2p/{A.peer_id_str}", addr(A) + "/x"]:
        with pytest.raises((ConfigError, Exception)):
            split_p2p_addr(bad)


def test_bootstrap_backoff_grows_and_resets() -> None:
    ps = PeerSet(rng=random.Random(1), base_backoff_ms=100, max_backoff_ms=1000)
    ps.add_bootstrap(addr(A))
    assert [d.peer_id for d in ps.poll(0)] == [A.peer_id]
    assert ps.poll(0) == []  # dial in flight
    delays = []
    now = 0
    for _ in range(6):
        ps.on_dial_failed(A.peer_id, now)
        deadline = ps.next_deadline_ms()
        assert deadline is not None
        delays.append(deadline - now)
        assert ps.poll(deadline - 1) == []
        now = deadline
        assert len(ps.poll(now)) == 1
    for failures, delay in enumerate(delays, start=1):  # doubles up to the cap, jitter in [c/2, c]
        ceiling = min(1000, 100 * 2**failures)
        assert ceiling // 2 <= delay <= ceiling
    ps.on_connected(A.peer_id)
    assert ps.next_deadline_ms() is None
    ps.on_disconnected(A.peer_id, now)
    assert ps.next_deadline_ms() is not None and ps.next_deadline_ms() - now <= 100  # type: ignore[operator]


def test_candidates_only_up_to_target_and_bootstrap_always() -> None:
    ps = PeerSet(rng=random.Random(2), target_peers=2)
    ps.add_bootstrap(addr(A))
    ps.add_candidate(B.peer_id, (addr(B),))
    ps.add_candidate(C.peer_id, (addr(C),))
    first = {d.peer_id for d in ps.poll(0, connected_total=0)}
    assert A.peer_id in first and len(first) == 2  # bootstrap + one candidate fills the target
    assert ps.poll(0, connected_total=5) == []
    ps.forget(A.peer_id)  # bootstrap peers are never forgotten
    ps.on_dial_failed(A.peer_id, 0)
    assert A.peer_id in {d.peer_id for d in ps.poll(10**9, connected_total=9)}


def test_self_is_never_a_target() -> None:
    ps = PeerSet(rng=random.Random(3), local_peer_id=A.peer_id)
    ps.add_bootstrap(addr(A))
    ps.add_candidate(A.peer_id, (addr(A),))
    assert ps.poll(0) == []


def test_a_banned_bootstrap_peer_is_dialled_again_when_its_ban_ends() -> None:
    # Dialling a banned peer only gets the connection hung up on, over and over
    # ("closing every new connection at once"); when the ban ends, at once.
    ps = PeerSet(rng=random.Random(4), base_backoff_ms=100)
    ps.add_bootstrap(addr(A))
    ps.add_candidate(B.peer_id, (addr(B),))
    for pid in (A.peer_id, B.peer_id):
        ps.on_connected(pid)
        ps.on_banned(pid, 30_000)
        ps.on_disconnected(pid, 1_000)  # the ban's disconnect lands after the ban
    assert ps.poll(29_999) == []
    assert ps.next_deadline_ms() == 30_000
    assert [d.peer_id for d in ps.poll(30_000)] == [A.peer_id]  # B, not a bootstrap peer, is forgotten
    ps.add_candidate(B.peer_id, (addr(B),))  # until it is learnt again
    assert [d.peer_id for d in ps.poll(30_000)] == [B.peer_id]


def test_sync_sees_a_connection_that_came_and_went_between_two_looks() -> None:
    # A bootstrap connection dialled, then dropped (banned) before the dialer looked
    # again stayed "connected" here: it was never dialled again.
    ps = PeerSet(rng=random.Random(5), base_backoff_ms=100)
    ps.add_bootstrap(addr(A))
    ps.poll(0)
    ps.on_connected(A.peer_id)  # the dial succeeded
    ps.sync(set(), 50)  # the next look: gone already
    deadline = ps.next_deadline_ms()
    assert deadline is not None and 50 < deadline <= 150
    assert [d.peer_id for d in ps.poll(deadline)] == [A.peer_id]
    ps.sync({A.peer_id}, deadline + 10)
    assert ps.connected_count() == 1 and ps.poll(10**9) == []
