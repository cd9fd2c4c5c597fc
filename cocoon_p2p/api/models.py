"""The models a gateway offers, by the names its clients use, and what each one's backend
honours beyond plain text.

A model is found by its name or by its hex model id: among those the gateway was given, then
among those the network's workers announce (:func:`from_catalog`: ``name``, ``name:variant``,
``name@<id prefix>``); a request for the wrong kind (chat on an embedding model) is 400, an
unknown name 404 (``model_not_found``, as OpenAI answers).
A request that needs a :class:`~.params.Feature` its model lacks is 400 naming the
parameter that asked for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cocoon_p2p.execution.engine import BACKEND_PREFIX
from cocoon_p2p.execution.models import UNITS, ModelSpec
from cocoon_p2p.overlay.directory import CatalogRow

from .params import EngineOptions, Feature
from .wire import APIError, unsupported

# What a model an OpenAI-compatible engine serves honours (the job carries the chat to it).
ENGINE_FEATURES = frozenset(Feature)


@dataclass(frozen=True)
class GatewayModel:
    """One model the gateway offers. ``kind``: "embedding" or "generation"; ``unit``: what
    its workers bill per (``token``); ``features``: what its backend
    honours beyond plain text, for which the job protocol carries the request's options
    (:data:`ENGINE_FEATURES` for a model an engine serves; none for the ONNX path)."""

    name: str
    model_id: bytes
    kind: str
    unit: str = ""  # "" : the kind's default unit
    features: frozenset[Feature] = frozenset()

    def __post_init__(self) -> None:
        if not self.unit:
            object.__setattr__(self, "unit", UNITS.get(self.kind, "item"))

    @classmethod
    def of(cls, spec: ModelSpec, name: str | None = None) -> GatewayModel:
        """The model ``spec`` as the API names it (``name``, else the spec's own name)."""
        return cls(name or spec.name, spec.model_id, spec.kind, spec.unit)

    @property
    def fingerprint(self) -> str:
        """``system_fingerprint``: the model's content address names its exact weights."""
        return f"cocoon-{self.model_id.hex()[:16]}"

    def check_options(self, options: EngineOptions) -> None:
        """400 naming the first parameter of ``options`` this model's backend cannot honour."""
        for feature, param in options.needs():
            if feature not in self.features:
                raise unsupported(param, f"the backend of '{self.name}' does not support it")


def find_model(models: Iterable[GatewayModel], name: str, kind: str) -> GatewayModel:
    """The model called ``name`` (or with that hex id), of ``kind`` (APIError 404/400)."""
    models = list(models)
    model = next((m for m in models if m.name == name), None) or next(
        (m for m in models if m.model_id.hex() == name.lower()), None
    )
    if model is None:
        raise not_found(name)
    return check_kind(model, name, kind)


def not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist", code="model_not_found", param="model")


def from_catalog(name: str, row: CatalogRow) -> GatewayModel:
    """The model a catalog row announces, under the name a request used for it, of the kind
    its workers say (older workers said none: theirs billed only generation per token)."""
    kind = row.entry.kind or ("generation" if row.unit == UNITS["generation"] else "embedding")
    engine = kind == "generation" and any(b.startswith(BACKEND_PREFIX) for b in row.backends)
    return GatewayModel(name, row.model_id, kind, row.unit, ENGINE_FEATURES if engine else frozenset())


def check_kind(model: GatewayModel, name: str, kind: str) -> GatewayModel:
    """``model`` if it is of ``kind``; else 400 naming ``model``."""
    if model.kind != kind:
        raise APIError(400, f"'{name}' is a {model.kind} model", param="model")
    return model
