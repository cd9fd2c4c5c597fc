"""What both parties of a channel share: configuration, one request on a pay stream, and
sending to the contract.

Chain calls are blocking HTTP; the trio side runs them in threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from cocoon_p2p.core.framing import NeedData

from . import frames as pf
from .chain import TonCenter, Wallet
from .connection import PayConnection
from .errors import PaymentFailed
from .settlement import SettlementPolicy
from .vouchers import SemiChannel, SemiChannelBody, SignedSemiChannel

__all__ = ["CONTROL_FEE", "PAY_PROTOCOL", "PaymentConfig", "PaymentFailed", "b_state", "exchange", "send_control"]
PAY_PROTOCOL = "/cocoon/pay/1"
CONTROL_FEE = 50_000_000  # nanoton attached to channel control messages for gas


@dataclass
class PaymentConfig:
    """One node's payments: its chain, wallet and data directory, and the settlement policy."""

    chain: TonCenter
    wallet: Wallet
    data_dir: Path
    policy: SettlementPolicy = field(default_factory=SettlementPolicy)
    credit_nanoton: int = 100_000_000  # what a worker lets a client owe before refusing jobs
    quarantine_s: int = 3600  # set in the channels a client opens
    watch_interval_s: float = 10.0  # how often channels are checked on chain
    # How long a client lets finished jobs gather before one voucher pays for them all
    # (0: a voucher per job); the workers' credit covers them meanwhile.
    pay_linger_s: float = 0.2


async def exchange(stream: Any, conn: PayConnection, request: pf.PayFrame) -> pf.PayFrame:
    """Send ``request`` on ``stream`` and read its reply, both checked by ``conn``.

    Raises PaymentFailed when the peer closes the stream, LocalProtocolError when
    ``request`` is not ours to send now, RemoteProtocolError when the reply breaks
    the rules; a failed or cancelled write is recorded in ``conn`` (unusable
    after it). Cancelled while reading: the reply may still come, so the caller
    drops the stream.
    """
    data = conn.send(request)
    try:
        await stream.write(data)
    except BaseException:
        conn.send_failed()
        raise
    while isinstance(frame := conn.next_event(), NeedData):
        data = await stream.read(pf.MAX_PAY_FRAME)
        if not data:
            raise PaymentFailed("the peer closed the pay stream")
        conn.receive_data(data)
    return frame


def send_control(config: PaymentConfig, address: str, body: Any) -> None:
    """Send a message to a channel contract from our wallet (blocking)."""
    config.wallet.transfer(config.chain, address, CONTROL_FEE, body=body)


def b_state(key: SigningKey, channel_id: int, a_body: SemiChannelBody | None) -> SignedSemiChannel:
    """B's (the worker's) own state: it never pays, so seqno 0 and nothing sent, with
    the newest A state it holds as counterparty (none at opening)."""
    return SemiChannel(channel_id, SemiChannelBody(0, 0), a_body).sign(key)
