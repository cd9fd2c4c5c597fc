"""TON smart-contract address forms (sans-IO): raw ``wc:hex`` and user-friendly base64.

The forms follow TEP-2 (ton-blockchain/TEPs, 0002-address.md):

* raw: ``<workchain>:<64 hex digits>`` (``0:ca6e...2a3e``), what the chain and
  this package's chain client speak;
* user-friendly: 36 bytes, a tag (0x11 bounceable, 0x51 non-bounceable, plus
  0x80 for an address meant for testnet only), the workchain as one signed byte,
  the 32-byte account id and the CRC16-XMODEM of those 34 bytes, in 48
  characters of base64url (``UQDK...PuwA``). Wallet apps accept only this form,
  refuse a testnet address on mainnet, and check the checksum, so it is the
  form shown to people.

A wallet that may not be deployed yet is shown non-bounceable: a bounceable
transfer to an uninitialised account comes back to the sender.

Every malformed input raises :class:`MalformedAddress`, never a codec's error.
"""

from __future__ import annotations

import base64
import enum
import re
from dataclasses import dataclass

from pytoniq_core import Address
from pytoniq_core.boc.address import AddressError

from cocoon_p2p.core.errors import CocoonError

__all__ = ["AddressForm", "MalformedAddress", "TonAddress", "friendly", "parse", "raw"]

FRIENDLY_LEN = 48  # characters: 36 bytes in base64 without padding
_TAG_BOUNCEABLE = 0x11
_TAG_NON_BOUNCEABLE = 0x51
_TAG_TEST_ONLY = 0x80
_RAW = re.compile(r"(-?\d{1,4}):([0-9a-fA-F]{64})")
_FRIENDLY = re.compile(rf"[A-Za-z0-9_+/-]{{{FRIENDLY_LEN}}}")  # either base64 alphabet, as @ton/core reads it


class MalformedAddress(CocoonError):
    """The text is not a TON address in raw or user-friendly form (or its checksum is wrong)."""


class AddressForm(enum.Enum):
    """How an address was written."""

    RAW = "raw"
    FRIENDLY = "friendly"


@dataclass(frozen=True, kw_only=True)
class TonAddress:
    """One parsed address. ``bounceable`` and ``testnet`` are the user-friendly form's
    flags (None for a raw address, which carries none)."""

    workchain: int
    account: bytes
    form: AddressForm
    bounceable: bool | None = None
    testnet: bool | None = None

    def __post_init__(self) -> None:
        if not -128 <= self.workchain <= 127:  # the user-friendly form holds it in one signed byte
            raise MalformedAddress(f"workchain {self.workchain} is outside -128..127")
        if len(self.account) != 32:
            raise MalformedAddress(f"an account id is 32 bytes, not {len(self.account)}")

    @property
    def raw(self) -> str:
        """``<workchain>:<64 lowercase hex digits>``."""
        return f"{self.workchain}:{self.account.hex()}"

    def friendly(self, *, testnet: bool, bounceable: bool = False, url_safe: bool = True) -> str:
        """The 48-character user-friendly form with these flags."""
        return str(
            Address((self.workchain, self.account)).to_str(
                is_user_friendly=True, is_url_safe=url_safe, is_bounceable=bounceable, is_test_only=testnet
            )
        )


def parse(text: str) -> TonAddress:
    """An address in any standard form: raw, or user-friendly in base64url or base64.
    Raises MalformedAddress for anything else (a wrong length or tag, a bad checksum)."""
    if not isinstance(text, str):
        raise MalformedAddress(f"an address is text, not {type(text).__name__}")
    m = _RAW.fullmatch(text)
    if m is not None:
        return TonAddress(workchain=int(m.group(1)), account=bytes.fromhex(m.group(2)), form=AddressForm.RAW)
    if _FRIENDLY.fullmatch(text) is None:
        raise MalformedAddress(f"{_shown(text)} is neither <workchain>:<64 hex digits> nor a 48-character address")
    # 48 characters of either alphabet always decode, to 36 bytes
    tag = base64.b64decode(text.replace("-", "+").replace("_", "/"))[0]
    testnet = bool(tag & _TAG_TEST_ONLY)
    if tag & ~_TAG_TEST_ONLY not in (_TAG_BOUNCEABLE, _TAG_NON_BOUNCEABLE):
        raise MalformedAddress(f"{_shown(text)} has the unknown tag 0x{tag:02x}")
    try:
        decoded = Address(text)  # checks the CRC16
    except (AddressError, ValueError, IndexError) as exc:
        raise MalformedAddress(f"{_shown(text)}: wrong checksum (a mistyped character?)") from exc
    return TonAddress(
        workchain=decoded.wc,
        account=bytes(decoded.hash_part),
        form=AddressForm.FRIENDLY,
        bounceable=(tag & ~_TAG_TEST_ONLY) == _TAG_BOUNCEABLE,
        testnet=testnet,
    )


def friendly(raw_or_any: str, *, testnet: bool, bounceable: bool = False) -> str:
    """``raw_or_any`` in the user-friendly base64url form, with the testnet flag when
    ``testnet`` and non-bounceable unless ``bounceable`` (the flags of the input, if it
    had any, are replaced). Raises MalformedAddress."""
    return parse(raw_or_any).friendly(testnet=testnet, bounceable=bounceable)


def raw(any_form: str) -> str:
    """``any_form`` as ``<workchain>:<64 lowercase hex digits>``. Raises MalformedAddress."""
    return parse(any_form).raw


def _shown(text: str) -> str:
    """The input quoted for an error message, cut short (it may be anything a user pasted)."""
    return repr(text if len(text) <= 80 else text[:77] + "...")
