"""msgpack helpers shared by every codec: hard limits and canonical encoding.

Signatures cover exact bytes, so each message has exactly one valid encoding
(BOLT 1's rule): a decoder re-encodes what it parsed and rejects the input when
the bytes differ. Limits are enforced by msgpack itself while parsing, so an
attacker cannot make us allocate more than the message's size limit.
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import MalformedMessage, MessageTooLarge


def pack(obj: Any) -> bytes:
    """Canonical msgpack encoding (smallest int/str/bin forms, bin for bytes)."""
    return bytes(msgpack.packb(obj, use_bin_type=True))


def unpack(data: bytes, *, max_size: int, what: str, canonical: bool = True) -> Any:
    """Decode one msgpack value of at most ``max_size`` bytes.

    Raises MessageTooLarge or MalformedMessage; never anything else, whatever
    the bytes (property-tested).
    """
    if len(data) > max_size:
        raise MessageTooLarge(f"{what}: {len(data)} bytes exceeds the {max_size} byte limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size // 2 + 1,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedMessage(f"{what}: not valid msgpack ({exc.__class__.__name__})") from exc
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"{what}: invalid UTF-8 in a string") from exc
    if canonical:
        try:
            again = pack(obj)
        except (ValueError, TypeError, OverflowError) as exc:
            raise MalformedMessage(f"{what}: cannot be re-encoded") from exc
        if again != data:
            raise MalformedMessage(f"{what}: not canonically encoded")
    return obj


def expect_list(obj: Any, length: int, what: str) -> list[Any]:
    """``obj`` as a list of exactly ``length`` items, else MalformedMessage."""
    if not isinstance(obj, list) or len(obj) != length:
        raise MalformedMessage(f"{what}: expected an array of {length} fields")
    return obj


def expect_int(obj: Any, what: str, *, lo: int = 0, hi: int = 2**64 - 1) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool) or not lo <= obj <= hi:
        raise MalformedMessage(f"{what}: expected an integer in [{lo}, {hi}]")
    return obj


def expect_bytes(obj: Any, what: str, *, min_len: int = 0, max_len: int) -> bytes:
    if not isinstance(obj, bytes) or not min_len <= len(obj) <= max_len:
        raise MalformedMessage(f"{what}: expected {min_len}..{max_len} bytes")
    return obj


def expect_str(obj: Any, what: str, *, max_len: int, min_len: int = 0) -> str:
    if not isinstance(obj, str) or not min_len <= len(obj) <= max_len:
        raise MalformedMessage(f"{what}: expected a string of {min_len}..{max_len} characters")
    return obj


def expect_str_list(obj: Any, what: str, *, max_items: int, max_len: int) -> tuple[str, ...]:
    if not isinstance(obj, list) or len(obj) > max_items:
        raise MalformedMessage(f"{what}: expected at most {max_items} strings")
    return tuple(expect_str(x, what, max_len=max_len, min_len=1) for x in obj)
