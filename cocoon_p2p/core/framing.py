"""Length-prefixed framing shared by the job and pay protocols.

A frame on a stream is a 4-byte big-endian length, then that many bytes of
payload. :class:`FrameBuffer` only buffers and slices (no I/O, no decoding):
each protocol decodes the payloads it returns and checks the length against its
own limit before any allocation, so a 4 GiB length prefix costs nothing.
"""

from __future__ import annotations

from typing import Final

from .errors import MessageTooLarge

HEADER: Final = 4


class NeedData:
    """Sentinel: more bytes are needed before the next frame (h11's NEED_DATA)."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


def frame(payload: bytes) -> bytes:
    """``payload`` with its 4-byte big-endian length in front."""
    return len(payload).to_bytes(HEADER, "big") + payload


class FrameBuffer:
    """Bytes in, length-prefixed payloads out.

    ``feed`` only buffers; ``next_payload`` returns the next whole payload or
    :data:`NEED_DATA`. A length above ``max_size`` raises :class:`MessageTooLarge`
    as soon as the 4-byte prefix is in, before the payload is buffered.
    """

    def __init__(self, max_size: int, *, what: str = "frame") -> None:
        self.max_size = max_size
        self.what = what
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as payloads."""
        return len(self._buf)

    def next_payload(self) -> bytes | NeedData:
        if len(self._buf) < HEADER:
            return NEED_DATA
        size = int.from_bytes(self._buf[:HEADER], "big")
        if size > self.max_size:
            raise MessageTooLarge(f"{self.what} of {size} bytes exceeds {self.max_size}")
        if len(self._buf) < HEADER + size:
            return NEED_DATA
        body = bytes(self._buf[HEADER : HEADER + size])
        del self._buf[: HEADER + size]
        return body
