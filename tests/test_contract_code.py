"""The official payment-channel code: fetched from tonweb's npm tarball, hash-checked, cached."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pytoniq_core import begin_cell

from cocoon_p2p.payments.contract import (
    OFFICIAL_CODE_HASH,
    ContractCodeError,
    code_from_boc,
    payment_channel_code,
)

needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")


@needs_npm
def test_fetches_verifies_and_caches_the_official_code(tmp_path: Path) -> None:
    cell = payment_channel_code(tmp_path)
    assert cell.hash.hex() == OFFICIAL_CODE_HASH
    (cached,) = tmp_path.glob("payment-channel-*.boc")
    assert payment_channel_code(tmp_path).hash == cell.hash  # from the cache now
    cached.write_bytes(bytes(begin_cell().store_uint(1, 8).end_cell().to_boc()))
    with pytest.raises(ContractCodeError):  # a tampered cache is refused, not used
        payment_channel_code(tmp_path)


def test_any_other_code_is_refused() -> None:
    with pytest.raises(ContractCodeError):
        code_from_boc(bytes(begin_cell().store_uint(0xDEAD, 16).end_cell().to_boc()))
