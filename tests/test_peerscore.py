import pytest

from cocoon_p2p.core.errors import BadSignature, MalformedMessage, ReplayedMessage
from cocoon_p2p.overlay.peerscore import PeerScores

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
