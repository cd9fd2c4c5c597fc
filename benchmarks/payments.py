"""Payment benchmarks: vouchers created, verified, and verified + durably persisted.

Durable persistence compares one fsync per voucher (the baseline) with group
commit (one fsync per batch of vouchers that arrived together), same run.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from cocoon_p2p.voucherlog import VoucherLog
from cocoon_p2p.vouchers import SemiChannel, SemiChannelBody, SignedSemiChannel, VoucherBook

CLIENT = SigningKey(bytes([5]) * 32)
CHANNEL = 0xC0C0A


def _vouchers(n: int) -> list[SignedSemiChannel]:
    return [SemiChannel(CHANNEL, SemiChannelBody(i + 1, (i + 1) * 1000)).sign(CLIENT) for i in range(n)]


def _book() -> VoucherBook:
    return VoucherBook(channel_id=CHANNEL, payer_key=CLIENT.verify_key, deposit_a=10**15)


def _persisted(vouchers: list[SignedSemiChannel], batch: int) -> float:
    book = _book()
    with tempfile.TemporaryDirectory() as d:
        log = VoucherLog(Path(d) / "vouchers.log")
        t = time.perf_counter()
        for start in range(0, len(vouchers), batch):
            group = vouchers[start : start + batch]
            for v in group:  # each checked against the state after the one before it
                book.check(v)
                book.commit(v)
            log.append([v.to_record() for v in group])  # durable, then acknowledged
        elapsed = time.perf_counter() - t
        log.close()
    return len(vouchers) / elapsed


async def bench_vouchers(n: int) -> dict[str, float]:
    t = time.perf_counter()
    vouchers = _vouchers(n)
    created = n / (time.perf_counter() - t)
    book = _book()
    t = time.perf_counter()
    for v in vouchers:
        book.check(v)
        book.commit(v)
    verified = n / (time.perf_counter() - t)
    return {
        "vouchers_created_per_s": created,
        "vouchers_verified_per_s": verified,
        "vouchers_persisted_per_s_fsync_each": _persisted(vouchers[: n // 4], 1),
        "vouchers_persisted_per_s_group_64": _persisted(vouchers, 64),
    }


BENCHES: list[tuple[str, Callable[[bool], Any]]] = [
    ("vouchers", lambda quick: bench_vouchers(4000 if quick else 20000)),
]
