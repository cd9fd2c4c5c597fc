"""Contract message bodies, byte-exact with @ton/core built to tonweb's layouts (golden vectors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nacl.signing import SigningKey
from pytoniq_core import Cell

from cocoon_p2p.payments import messages as m
from cocoon_p2p.payments.vouchers import SemiChannel, SemiChannelBody

VEC = json.loads((Path(__file__).parent / "vectors" / "channel_messages.json").read_text())
A, B = SigningKey(bytes([1]) * 32), SigningKey(bytes([2]) * 32)
CH = 0xC0C0A


def built() -> dict[str, Cell]:
    close = m.CloseTerms(CH, 1_500_000_000, 500_000_000, 42, 0)
    commit = m.CommitTerms(CH, 42, 3)
    sa = SemiChannel(CH, SemiChannelBody(42, 500_000_000), SemiChannelBody(3, 0)).sign(A)
    sb = SemiChannel(CH, SemiChannelBody(3, 0), SemiChannelBody(42, 500_000_000)).sign(B)
    return {
        "top_up": m.top_up(1_000_000_000, 5),
        "init_channel_by_a": m.init_channel(CH, 2_000_000_000, 0, key=A, is_a=True),
        "cooperative_close": m.cooperative_close(close, m.sign_body(close.body(), A), m.sign_body(close.body(), B)),
        "cooperative_commit": m.cooperative_commit(
            commit, m.sign_body(commit.body(), A), m.sign_body(commit.body(), B)
        ),
        "start_uncooperative_close_by_b": m.start_uncooperative_close(CH, sa, sb, key=B, is_a=False),
        "challenge_by_a": m.challenge_quarantined_state(CH, sa, sb, key=A, is_a=True),
        "finish_uncooperative_close": m.finish_uncooperative_close(),
    }


@pytest.mark.parametrize("name", [k for k in VEC if k != "comment"])
def test_message_matches_ton_core(name: str) -> None:
    cell = built()[name]
    assert cell.hash.hex() == VEC[name]["hash"]
    assert Cell.one_from_boc(bytes.fromhex(VEC[name]["boc"])).hash == cell.hash
