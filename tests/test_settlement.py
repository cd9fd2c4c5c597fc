"""The settlement policy's decisions, without a chain."""

from __future__ import annotations

from cocoon_p2p.payments.settlement import (
    CLOSURE_STARTED,
    OPEN,
    Action,
    ChainView,
    Quarantine,
    SettlementPolicy,
    client_action,
    quarantine_action,
    worker_action,
)

TON = 1_000_000_000
POLICY = SettlementPolicy(deposit_nanoton=TON, reserve_fraction=0.05, settle_above_nanoton=TON // 2, idle_close_s=60)


def test_client_rolls_over_when_the_deposit_runs_low() -> None:
    assert client_action(POLICY, deposit=TON, sent=0) is Action.KEEP
    assert client_action(POLICY, deposit=TON, sent=TON - TON // 20) is Action.KEEP  # exactly the reserve left
    assert client_action(POLICY, deposit=TON, sent=TON - TON // 20 + 1) is Action.ROLL_OVER
    assert client_action(POLICY, deposit=TON, sent=TON // 2, next_cost=TON // 2 + 1) is Action.ROLL_OVER


def test_worker_closes_on_its_limit_on_silence_and_on_shutdown() -> None:
    assert worker_action(POLICY, received=TON // 4, payer_silent_s=1) is Action.KEEP
    assert worker_action(POLICY, received=TON // 2, payer_silent_s=1) is Action.CLOSE  # its risk limit
    assert worker_action(POLICY, received=1, payer_silent_s=60) is Action.CLOSE  # the payer went quiet
    assert worker_action(POLICY, received=1, payer_silent_s=1, shutting_down=True) is Action.CLOSE
    assert worker_action(POLICY, received=0, payer_silent_s=1e9, shutting_down=True) is Action.KEEP  # nothing at stake
    lenient = SettlementPolicy(close_on_shutdown=False)
    assert worker_action(lenient, received=TON, payer_silent_s=1, shutting_down=True) is Action.KEEP


def _view(now: int, q: Quarantine | None, state: int = CLOSURE_STARTED) -> ChainView:
    return ChainView(state=state, now=now, quarantine_s=100, conditional_close_s=10, quarantine=q)


def test_worker_challenges_an_old_state_in_time_and_finishes_after_quarantine() -> None:
    old = Quarantine(seqno_a=4, sent_a=400, seqno_b=0, sent_b=0, started_at=1000, committed_by_a=True)
    assert quarantine_action(_view(1050, old), we_are_a=False, our_seqno=9, our_sent=900) is Action.CHALLENGE
    assert quarantine_action(_view(1050, old), we_are_a=False, our_seqno=4, our_sent=400) is Action.WAIT  # honest
    assert quarantine_action(_view(1100, old), we_are_a=False, our_seqno=9, our_sent=900) is Action.WAIT  # too late
    assert quarantine_action(_view(1110, old), we_are_a=False, our_seqno=9, our_sent=900) is Action.WAIT  # conditionals
    assert quarantine_action(_view(1111, old), we_are_a=False, our_seqno=9, our_sent=900) is Action.FINISH
    ours = Quarantine(4, 400, 0, 0, 1000, committed_by_a=False)  # we (B) started it: nothing to challenge
    assert quarantine_action(_view(1050, ours), we_are_a=False, our_seqno=9, our_sent=900) is Action.WAIT
    challenged = Quarantine(4, 400, 0, 0, 1000, committed_by_a=True, challenged=True)
    assert quarantine_action(_view(1050, challenged), we_are_a=False, our_seqno=9, our_sent=900) is Action.WAIT
    assert quarantine_action(_view(1050, None, OPEN), we_are_a=True, our_seqno=0, our_sent=0) is Action.KEEP
    assert quarantine_action(_view(1111, ours), we_are_a=True, our_seqno=0, our_sent=0) is Action.FINISH
