"""Model names: the catalog entry a worker puts on each offer, and how a name is asked for.

A model is identified on the network by its content address (the 32-byte digest of
its weights), which nobody types. Each offer may carry a :class:`CatalogEntry`: the
public name (``smollm2-135m-instruct``) and the variant (``fp32``, ``q4_1``...), so a
client resolves a name to ids from what workers announce, needing no copy of the
model. The id stays the identity: two files never share one, so a 4-bit variant can
never pass as the fp32 model, whatever it is called.

A reference (:func:`parse_ref`) is ``name``, ``name:variant``, ``name@<id prefix>``
or a model id in hex. Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core import wire
from cocoon_p2p.core.errors import LocalProtocolError, MalformedMessage

MAX_NAME = 64
MAX_VARIANT = 32
KINDS = frozenset({"tensor", "embedding", "generation"})  # what a model does (execution.models' kinds)
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*\Z")


def _check(value: str, what: str, max_len: int) -> str:
    if not 0 < len(value) <= max_len or not _NAME.match(value):
        raise MalformedMessage(f"{what} {value!r}: 1..{max_len} characters of a-z 0-9 . _ -, starting alphanumeric")
    return value


@dataclass(frozen=True)
class CatalogEntry:
    """The public name and variant under which a worker offers a model id, and the model's
    kind (``""``: not said, as older workers did not; on the wire a third, optional item)."""

    name: str
    variant: str
    kind: str = ""

    def __post_init__(self) -> None:
        _check(self.name, "model name", MAX_NAME)
        _check(self.variant, "model variant", MAX_VARIANT)
        if self.kind and self.kind not in KINDS:
            raise MalformedMessage(f"model kind {self.kind!r}: one of {sorted(KINDS)}")

    def fields(self) -> list[str]:
        return [self.name, self.variant, self.kind] if self.kind else [self.name, self.variant]

    @classmethod
    def parse(cls, obj: Any) -> CatalogEntry:
        """An entry from its wire form (MalformedMessage if it is not one)."""
        with_kind = isinstance(obj, list) and len(obj) == 3
        name, variant, *kind = wire.expect_list(obj, 2 + with_kind, "catalog entry")
        return cls(
            wire.expect_str(name, "model name", max_len=MAX_NAME),
            wire.expect_str(variant, "variant", max_len=MAX_VARIANT),
            wire.expect_str(kind[0], "model kind", min_len=1, max_len=16) if kind else "",
        )

    def __str__(self) -> str:
        return f"{self.name}:{self.variant}"


@dataclass(frozen=True)
class ModelRef:
    """What a caller asked for: a model id, or a name with an optional variant or id prefix."""

    model_id: bytes | None = None
    name: str | None = None
    variant: str | None = None
    id_prefix: str = ""

    def matches(self, model_id: bytes, entry: CatalogEntry | None) -> bool:
        """Whether an offer of ``model_id`` under ``entry`` is what was asked for."""
        if self.model_id is not None:
            return model_id == self.model_id
        if entry is None or entry.name != self.name:
            return False
        return (self.variant is None or entry.variant == self.variant) and model_id.hex().startswith(self.id_prefix)


def catalog_name(text: str, max_len: int = MAX_NAME) -> str:
    """``text`` made a valid name or variant: lower case, other characters as ``-``."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")[:max_len]
    return name or "model"


def parse_ref(text: str) -> ModelRef:
    """``name``, ``name:variant``, ``name@<hex prefix>`` or a 64-digit model id (LocalProtocolError if none)."""
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return ModelRef(model_id=bytes.fromhex(text))
    name, at, prefix = text.partition("@")
    name, colon, variant = name.partition(":")
    try:
        _check(name, "model name", MAX_NAME)
        if colon:
            _check(variant, "model variant", MAX_VARIANT)
    except MalformedMessage as exc:
        raise LocalProtocolError(str(exc)) from exc
    if at and not re.fullmatch(r"[0-9a-f]{1,64}", prefix.lower()):
        raise LocalProtocolError(f"model id prefix {prefix!r}: hex digits expected")
    return ModelRef(name=name, variant=variant or None, id_prefix=prefix.lower())
