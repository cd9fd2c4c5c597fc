"""Reassembly: parse in place, keep only the cut-short tail."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cocoon_p2p.transport.reassembly import Reassembly


def _units(r: Reassembly, data: bytes) -> list[bytes]:
    """A parser of 1-byte-length-prefixed units, in the shape the real ones use."""
    src = r.join(data)
    out, pos = [], 0
    while pos < len(src) and pos + 1 + src[pos] <= len(src):
        out.append(bytes(src[pos + 1 : pos + 1 + src[pos]]))
        pos += 1 + src[pos]
    r.keep(src, pos)
    return out


def test_whole_reads_are_parsed_without_a_copy_and_tails_are_kept() -> None:
    r = Reassembly()
    data = b"\x02ab\x01c"
    assert r.join(data) is data  # nothing kept: the caller's own bytes
    assert _units(r, data) == [b"ab", b"c"] and len(r) == 0
    assert _units(r, b"\x03xy") == [] and len(r) == 3  # cut short: kept
    assert _units(r, b"z\x01") == [b"xyz"] and len(r) == 1
    assert _units(r, b"q") == [b"q"] and len(r) == 0


@given(st.lists(st.binary(max_size=20), max_size=20), st.data())
def test_any_split_gives_the_same_units(units: list[bytes], data: st.DataObject) -> None:
    wire = b"".join(bytes([len(u)]) + u for u in units)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    r, got, start = Reassembly(), [], 0
    for cut in [*cuts, len(wire)]:
        got += _units(r, wire[start:cut])
        start = cut
    assert got == units and len(r) == 0
