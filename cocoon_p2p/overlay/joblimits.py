"""What one job may ask of a worker's model, as the worker advertises it (pure).

A worker refuses a job beyond its model's input limits (``too-large``) before
any work starts; advertising the limits in its gossip offers lets a client send
a job only to workers that take it, and say at once when none does instead of
collecting refusals. The worker's own check stays authoritative: an offer may be
stale, or lie.

Wire form: ``[max_items, max_text_chars, max_total_chars, max_new_tokens]``, the
optional last field of an announcement's offer (see :mod:`.announcement`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core import wire

_FIELDS = 4
_MAX = 1 << 32


@dataclass(frozen=True)
class JobSize:
    """What a job asks: texts or rows, characters (longest text and all), tokens to generate."""

    items: int
    text_chars: int = 0
    total_chars: int = 0
    new_tokens: int = 0

    @classmethod
    def of(cls, *, texts: tuple[str, ...] = (), rows: int = 0, new_tokens: int = 0) -> JobSize:
        """The size of a job of ``texts`` (or of ``rows`` tensor rows) generating ``new_tokens``."""
        lengths = [len(t) for t in texts]
        return cls(len(texts) or rows, max(lengths, default=0), sum(lengths), new_tokens)


@dataclass(frozen=True)
class JobLimits:
    """The most one job may ask of a model (``max_new_tokens`` 0: it does not generate)."""

    max_items: int
    max_text_chars: int
    max_total_chars: int
    max_new_tokens: int = 0

    def refusal(self, size: JobSize) -> str | None:
        """Why a job of ``size`` is beyond these limits, or None if it is within them."""
        if size.items > self.max_items:
            return f"{size.items} items: at most {self.max_items}"
        if size.text_chars > self.max_text_chars:
            return f"a text of {size.text_chars} characters: at most {self.max_text_chars}"
        if size.total_chars > self.max_total_chars:
            return f"{size.total_chars} characters in all: at most {self.max_total_chars}"
        if self.max_new_tokens and size.new_tokens > self.max_new_tokens:
            return f"{size.new_tokens} new tokens: at most {self.max_new_tokens}"
        return None

    def fields(self) -> list[int]:
        return [self.max_items, self.max_text_chars, self.max_total_chars, self.max_new_tokens]

    @classmethod
    def parse(cls, obj: Any) -> JobLimits:
        """Limits from their wire form (MalformedMessage if they are not)."""
        f = wire.expect_list(obj, _FIELDS, "job limits")
        return cls(
            max_items=wire.expect_int(f[0], "max_items", lo=1, hi=_MAX),
            max_text_chars=wire.expect_int(f[1], "max_text_chars", lo=1, hi=_MAX),
            max_total_chars=wire.expect_int(f[2], "max_total_chars", lo=1, hi=_MAX),
            max_new_tokens=wire.expect_int(f[3], "max_new_tokens", hi=_MAX),
        )
