"""The official TON payment-channel contract code, obtained at set-up time, never pasted.

The compiled code ships as ``PAYMENT_CHANNEL_CODE_HEX`` in the npm package tonweb
(src/contract/payments/PaymentChannel.js). ``npm pack tonweb@0.0.66`` fetches
that package's tarball alone (240 KB, none of its ~500 dependencies); we read the
constant out of it, check the code cell's hash against the official one, and
cache the BOC. Everything that deploys or emulates a channel uses this code.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import tempfile
from pathlib import Path

from pytoniq_core import Cell

from cocoon_p2p.core.errors import CocoonError

TONWEB_PACKAGE = "tonweb@0.0.66"
# Representation hash of async-channel.func as compiled for tonweb (ton-blockchain/payment-channels).
OFFICIAL_CODE_HASH = "41f5b77f02d4a96eb465197215ed00923720a6c731fa32934f9c0e80ffb85589"
_SOURCE = "package/src/contract/payments/PaymentChannel.js"
_CONSTANT = re.compile(r"PAYMENT_CHANNEL_CODE_HEX\s*=\s*['\"]([0-9A-Fa-f]+)['\"]")


class ContractCodeError(CocoonError):
    """The contract code cannot be obtained, or is not the official code."""


def default_cache() -> Path:
    return Path(os.environ.get("COCOON_CONTRACT_CACHE", Path.home() / ".cache" / "cocoon-p2p" / "contracts"))


def code_from_boc(boc: bytes) -> Cell:
    """The code cell, after checking it is the official contract."""
    cell = Cell.one_from_boc(boc)
    if cell.hash.hex() != OFFICIAL_CODE_HASH:
        raise ContractCodeError(f"payment-channel code hash {cell.hash.hex()} is not the official {OFFICIAL_CODE_HASH}")
    return cell


def payment_channel_code(cache: Path | None = None) -> Cell:
    """The official payment-channel code cell: from the cache, else fetched with npm once."""
    path = (cache or default_cache()) / f"payment-channel-{OFFICIAL_CODE_HASH[:16]}.boc"
    if path.is_file():
        return code_from_boc(path.read_bytes())
    boc = _fetch_with_npm()
    cell = code_from_boc(boc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(boc)
    tmp.replace(path)
    return cell


def _fetch_with_npm() -> bytes:
    with tempfile.TemporaryDirectory(prefix="cocoon-tonweb-") as d:
        try:
            out = subprocess.run(
                ["npm", "pack", TONWEB_PACKAGE, "--silent"], cwd=d, capture_output=True, text=True, timeout=180
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ContractCodeError(f"cannot run npm to fetch {TONWEB_PACKAGE}: {exc}") from exc
        if out.returncode != 0:
            raise ContractCodeError(f"npm pack {TONWEB_PACKAGE} failed: {out.stderr.strip()[-300:]}")
        tarball = Path(d) / out.stdout.strip().splitlines()[-1]
        with tarfile.open(tarball) as tar:
            member = tar.extractfile(_SOURCE)
            if member is None:
                raise ContractCodeError(f"{TONWEB_PACKAGE} has no {_SOURCE}")
            source = member.read().decode()
    match = _CONSTANT.search(source)
    if match is None:
        raise ContractCodeError(f"PAYMENT_CHANNEL_CODE_HEX not found in {TONWEB_PACKAGE}")
    return bytes.fromhex(match.group(1))
