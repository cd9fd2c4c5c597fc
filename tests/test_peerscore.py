import pytest

from cocoon_p2p.core.errors import (
    BadSignature,
    ExpiredMessage,
    ForeignKey,
    MalformedMessage,
    ProtocolError,
    RateLimited,
    ReplayedMessage,
)
from cocoon_p2p.overlay.peerscore import Blame, PeerScores, gossip_blame

P = b"peer"


@pytest.mark.parametrize(
    ("errors", "gap_ms", "banned_after"),
    [
        ([BadSignature("x")] * 2, 0, 2),  # two forgeries: out
        ([MalformedMessage("x")] * 4, 0, 4),
        ([ReplayedMessage("x")] * 60, 0, 50),  # reordering is cheap but not free
        ([ReplayedMessage("x")] * 200, 10_000, None),  # occasional staleness decays away
        ([BadSignature("x")] * 5, 120_000, None),  # one forgery every 2 minutes: decays
    ],
)
def test_threshold_table(errors: list[Exception], gap_ms: int, banned_after: int | None) -> None:
    scores = PeerScores()
    now = 0
    for i, err in enumerate(errors, start=1):
        cmd = scores.penalize(P, err, now)  # type: ignore[arg-type]
        if cmd is not None:
            assert i == banned_after
            assert cmd.peer_id == P and cmd.until_ms == now + scores.ban_ms
            assert scores.is_banned(P, now)
            return
        now += gap_ms
    assert banned_after is None


def test_ban_expires_and_score_decays() -> None:
    scores = PeerScores(half_life_ms=1000, ban_ms=5000)
    scores.penalize(P, MalformedMessage("x"), 0)
    assert scores.score(P, 0) == -25
    assert scores.score(P, 1000) == pytest.approx(-12.5)
    for _ in range(3):
        scores.penalize(P, MalformedMessage("x"), 0)
    assert scores.is_banned(P, 4999)
    assert scores.banned(4999) == [P]
    assert not scores.is_banned(P, 5000)
    assert scores.score(P, 5000) == 0.0


E = ExpiredMessage("x")


@pytest.mark.parametrize(
    ("blame", "error", "count", "banned_after"),
    [
        # Stale gossip relayed for its origin: the relay's bad luck, free up to the allowance...
        (Blame.RELAY, E, 100, None),
        (Blame.RELAY, ReplayedMessage("x"), 100, None),
        (Blame.RELAY, RateLimited("x"), 100, None),
        # ...then a flood, which costs what it costs an origin (5 a message: 20 more).
        (Blame.RELAY, E, 200, 120),
        # The same from its origin counts at once.
        (Blame.ORIGIN, E, 100, 20),
        # Forgeries are never bad luck: honest relays validate before they forward.
        (Blame.RELAY, BadSignature("x"), 2, 2),
        (Blame.RELAY, ForeignKey("x"), 3, 3),
    ],
)
def test_relays_are_excused_stale_gossip_within_limits(
    blame: Blame, error: ProtocolError, count: int, banned_after: int | None
) -> None:
    scores = PeerScores()
    for i in range(1, count + 1):
        if scores.penalize(P, error, 0, blame=blame) is not None:
            assert i == banned_after
            return
    assert banned_after is None


W, R = b"worker", b"relay"


@pytest.mark.parametrize(
    ("error", "sender", "blame"),
    [
        # An origin's older announcement, replayed from a cache (its own too) or late by
        # another path: routine in gossipsub, so dropped and held against nobody.
        (ReplayedMessage("x"), W, None),
        (ReplayedMessage("x"), R, None),
        (ExpiredMessage("x"), W, None),
        (ExpiredMessage("x"), R, None),
        # A burst over the origin's rate: bunched delivery, free within the allowance.
        (RateLimited("x"), W, Blame.RELAY),
        (RateLimited("x"), R, Blame.RELAY),
        # Forgeries and garbage: whoever handed them to us.
        (BadSignature("x"), W, Blame.ORIGIN),
        (BadSignature("x"), R, Blame.RELAY),
        (ForeignKey("x"), W, Blame.ORIGIN),
        (MalformedMessage("x"), W, Blame.ORIGIN),
        (MalformedMessage("x", code="too-large"), R, Blame.RELAY),
    ],
)
def test_gossip_blame(error: ProtocolError, sender: bytes, blame: Blame | None) -> None:
    assert gossip_blame(error.code, sender=sender, origin=W) is blame


def test_a_worker_replaying_its_own_older_announcements_is_never_scored() -> None:
    # A late joiner gets each worker's cache window from the worker itself, every time a
    # client joins: thousands over a day cost it nothing.
    scores = PeerScores()
    for i in range(10_000):
        blame = gossip_blame(ReplayedMessage("x").code, sender=W, origin=W)
        if blame is not None:
            scores.penalize(W, ReplayedMessage("x"), i, blame=blame)
    assert scores.score(W, 10_000) == 0.0 and not scores.is_banned(W, 10_000)
    # A flood over its rate still adds up, once the allowance is spent.
    bunched = gossip_blame(RateLimited("x").code, sender=W, origin=W)
    assert bunched is not None
    cmd = None
    for _ in range(1_000):
        cmd = cmd or scores.penalize(W, RateLimited("x"), 20_000, blame=bunched)
    assert cmd is not None and scores.is_banned(W, 20_000)


def test_the_relay_allowance_refills() -> None:
    scores = PeerScores(relay_allowance=10, relay_refill_per_s=2.0)
    for _ in range(10):
        assert scores.penalize(P, E, 0, blame=Blame.RELAY) is None
    assert scores.score(P, 0) == 0.0 and scores.stale_relays_excused == 10
    scores.penalize(P, E, 0, blame=Blame.RELAY)  # the 11th at once is held against it
    assert scores.score(P, 0) == -5.0
    for _ in range(4):  # two seconds later: four more free
        scores.penalize(P, E, 2000, blame=Blame.RELAY)
    assert scores.stale_relays_excused == 14
    assert scores.score(P, 2000) == pytest.approx(-5.0 * 0.5 ** (2000 / scores.half_life_ms))


def test_protected_peers_are_banned_briefly() -> None:
    scores = PeerScores(ban_ms=300_000, protected_ban_ms=30_000)
    boot = b"bootstrap"
    scores.protect(boot)
    for who, ban in ((boot, 30_000), (P, 300_000)):
        cmd = None
        while cmd is None:
            cmd = scores.penalize(who, BadSignature("x"), 1000)
        assert cmd.until_ms == 1000 + ban
        assert scores.is_banned(who, 1000 + ban - 1) and not scores.is_banned(who, 1000 + ban)
