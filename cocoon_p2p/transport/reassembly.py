"""Bytes that arrive in pieces, for parsers that read whole units in place.

A socket read ends anywhere: mid-message, mid-frame. The Noise and yamux
parsers read every complete unit from what arrived, straight from the bytes
they were given, and keep only the cut-short tail for the next call, so a
read that ends on a boundary (the usual case) is never copied.
"""

from __future__ import annotations


class Reassembly:
    """``src = r.join(data)``, parse complete units of ``src`` up to ``pos``,
    release any memoryview of ``src``, then ``r.keep(src, pos)``."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = bytearray()

    def __len__(self) -> int:
        return len(self._tail)

    def join(self, data: bytes) -> bytes | bytearray:
        """``data`` after the tail kept last time (``data`` itself when there is none)."""
        if not self._tail:
            return data
        self._tail += data
        return self._tail

    def keep(self, src: bytes | bytearray, pos: int) -> None:
        """Keep ``src[pos:]`` (what the parser could not use yet) for the next join."""
        if src is self._tail:
            del self._tail[:pos]  # needs every view of src released
        elif pos < len(src):
            self._tail += memoryview(src)[pos:]
