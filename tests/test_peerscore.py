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
from cocoon_p2p.overlay.peerscore import Blame, PeerScores

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
