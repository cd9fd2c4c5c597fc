"""cocoon-p2p: a decentralized, confidential AI-inference overlay on libp2p.

The package is layered; each subpackage imports only those below it:

* :mod:`.core`: errors, canonical encoding, framing, identity, clock, metrics;
* :mod:`.transport`: the libp2p host, Noise, yamux;
* :mod:`.overlay`: signed records, gossip discovery, the DHT, peer management;
* :mod:`.execution`: models, backends, the executor, text generation;
* :mod:`.jobs`: the job protocol, routing, the job client and worker;
* :mod:`.payments`: TON payment channels, vouchers, settlement;
* :mod:`.node`: :class:`Node`, the peer that composes them;
* :mod:`.api`: the OpenAI-compatible gateway and metrics over HTTP;
* :mod:`.testing`: a tiny model, the contract emulator, a local TON chain.

The names below are the ones most programs need. :class:`Node` and its
companions load lazily, so that the pure modules can be used without trio or
libp2p (the simulator does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .core.errors import CocoonError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .core.identity import Identity, load_or_create_identity
from .overlay.capability import CapabilityRecord
from .overlay.directory import WorkerDirectory, WorkerOffer

if TYPE_CHECKING:
    from .jobs.client import InferenceResult, JobFailed
    from .node import ModelCapability, Node, NodeConfig, open_node
    from .payments.service import PaymentConfig

__all__ = [
    "CapabilityRecord",
    "CocoonError",
    "Identity",
    "InferenceResult",
    "JobFailed",
    "LocalProtocolError",
    "ModelCapability",
    "Node",
    "NodeConfig",
    "PaymentConfig",
    "ProtocolError",
    "RemoteProtocolError",
    "WorkerDirectory",
    "WorkerOffer",
    "__version__",
    "load_or_create_identity",
    "open_node",
]

_LAZY = {
    "Node": "node",
    "NodeConfig": "node",
    "ModelCapability": "node",
    "open_node": "node",
    "InferenceResult": "jobs.client",
    "JobFailed": "jobs.client",
    "PaymentConfig": "payments.service",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module 'cocoon_p2p' has no attribute {name!r}")
