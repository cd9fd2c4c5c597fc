"""cocoon-p2p: a decentralized, confidential AI-inference overlay on libp2p.

The protocol logic lives in pure (sans-IO) modules: :mod:`.capability`,
:mod:`.announcement`, :mod:`.directory`, :mod:`.peerscore`, :mod:`.peerset`.
The trio side is :class:`Node` (:mod:`.node`), imported lazily so that the pure
modules can be used without trio or libp2p (the simulator does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cocoon_p2p.core.errors import CocoonError, LocalProtocolError, ProtocolError, RemoteProtocolError
from cocoon_p2p.core.identity import Identity, load_or_create_identity
from cocoon_p2p.overlay.capability import CapabilityRecord
from cocoon_p2p.overlay.directory import WorkerDirectory, WorkerOffer

if TYPE_CHECKING:
    from cocoon_p2p.node import ModelCapability, Node, NodeConfig, open_node

__all__ = [
    "CapabilityRecord",
    "CocoonError",
    "Identity",
    "LocalProtocolError",
    "ModelCapability",
    "Node",
    "NodeConfig",
    "ProtocolError",
    "RemoteProtocolError",
    "WorkerDirectory",
    "WorkerOffer",
    "load_or_create_identity",
    "open_node",
]

_LAZY = {"Node", "NodeConfig", "ModelCapability", "open_node"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import node

        return getattr(node, name)
    raise AttributeError(f"module 'cocoon_p2p' has no attribute {name!r}")
