"""Payment channels as the chain shows them, and the contract's addresses.

:func:`read_channel` reads a channel's state and terms (``get_channel_data``);
:func:`state_init` and :func:`address_of` give a new channel's StateInit and
address. Chain access itself is :mod:`.toncenter`, the wallet :mod:`.wallet`;
both are re-exported here, where callers have always found them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytoniq_core import Cell, begin_cell

from .settlement import ChainView, Quarantine
from .toncenter import (  # re-exported
    TRANSIENT_STATUSES,
    ChainError,
    ChainTransaction,
    RetryBudgetSpent,
    RetryPolicy,
    TonCenter,
    parse_transaction,
    raw_address,
    wait_until,
)
from .wallet import WALLET_ADVICE, TransferFailed, Wallet  # re-exported

__all__ = [
    "TRANSIENT_STATUSES",
    "WALLET_ADVICE",
    "ChainError",
    "ChainTransaction",
    "ChannelOnChain",
    "RetryBudgetSpent",
    "RetryPolicy",
    "TonCenter",
    "TransferFailed",
    "Wallet",
    "address_of",
    "parse_transaction",
    "raw_address",
    "read_channel",
    "state_init",
    "wait_until",
]


@dataclass(frozen=True)
class ChannelOnChain:
    """What ``get_channel_data`` says about a deployed payment channel."""

    state: int  # 0 uninitialised/closed, 1 open, 2 quarantine, ...
    balance_a: int
    balance_b: int
    key_a: bytes
    key_b: bytes
    channel_id: int
    quarantine_s: int
    misbehavior_fine: int
    seqno_a: int
    seqno_b: int
    addr_a: str
    addr_b: str
    conditional_close_s: int = 0
    quarantine: Quarantine | None = None

    def view(self, now: int) -> ChainView:
        """What the settlement policy needs to know, at chain time ``now``."""
        return ChainView(self.state, now, self.quarantine_s, self.conditional_close_s, self.quarantine)


def _quarantine(cell: Any) -> Quarantine | None:
    """QuarantinedState: A's and B's bodies (seqno, sent, conditionals), start, who committed."""
    if not isinstance(cell, Cell):
        return None
    s = cell.begin_parse()
    seqno_a, sent_a = s.load_uint(64), s.load_coins()
    s.load_maybe_ref()
    seqno_b, sent_b = s.load_uint(64), s.load_coins()
    s.load_maybe_ref()
    started, by_a = s.load_uint(32), bool(s.load_bit())
    challenged = bool(s.load_bit()) if s.remaining_bits else False
    return Quarantine(seqno_a, sent_a or 0, seqno_b, sent_b or 0, started, by_a, challenged)


def read_channel(chain: TonCenter, address: str) -> ChannelOnChain:
    """Read a channel's state and terms from the chain (a worker checks a client's channel so)."""
    r = chain.run_get_method(address, "get_channel_data")
    try:
        payment = r[7]
        addr_a = payment[1].begin_parse().load_address().to_str(is_user_friendly=False)
        addr_b = payment[2].begin_parse().load_address().to_str(is_user_friendly=False)
        return ChannelOnChain(
            state=r[0],
            balance_a=r[1][0],
            balance_b=r[1][1],
            key_a=r[2][0].to_bytes(32, "big"),
            key_b=r[2][1].to_bytes(32, "big"),
            channel_id=r[3],
            quarantine_s=r[4][0],
            misbehavior_fine=r[4][1],
            seqno_a=r[5][0],
            seqno_b=r[5][1],
            addr_a=addr_a,
            addr_b=addr_b,
            conditional_close_s=r[4][2],
            quarantine=_quarantine(r[6]),
        )
    except (IndexError, TypeError, AttributeError, ValueError) as exc:
        raise ChainError(f"{address}: get_channel_data is not a payment channel's ({exc})") from exc


def state_init(code: Cell, data: Cell) -> Cell:
    """StateInit with code and data only (no split depth, special or libraries)."""
    return begin_cell().store_uint(0b00110, 5).store_ref(code).store_ref(data).end_cell()


def address_of(init: Cell, workchain: int = 0) -> str:
    """The raw address a contract with this StateInit is deployed at."""
    return f"{workchain}:{init.hash.hex()}"
