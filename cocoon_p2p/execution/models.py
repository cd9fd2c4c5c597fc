"""Content-addressed models: a model's id is the sha256 of its ONNX file.

A worker serves a file only after hashing it and comparing with the id it will
advertise (:func:`load_model`); a client names models by id alone. Besides the
ONNX file, a text model has a tokenizer file (``tokenizer.json``); its hash is
not part of the id because it is fixed by the model's build.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from cocoon_p2p.core.errors import CocoonError

KINDS = ("tensor", "embedding", "generation")
# Billing units: a tensor model's row; an embedding model's or a generation's token (as
# OpenAI bills both).
UNITS = {"tensor": "item", "embedding": "token", "generation": "token"}


class ModelError(CocoonError):
    """A model file is missing, does not match its id, or is not servable."""


def file_sha256(path: Path, *, chunk: int = 1 << 20) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.digest()


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A model a worker can serve: the verified file and how to drive it."""

    name: str
    path: Path
    model_id: bytes
    kind: str = "tensor"
    tokenizer: Path | None = None
    max_batch: int = 8
    max_seq: int = 256
    # generation models: the KV-cache layout of the exported decoder
    layers: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    eos: tuple[int, ...] = ()
    max_context: int = 2048
    # How the network names it (overlay.catalog): the model's public name and this
    # file's variant (weights' precision or quantization).
    public_name: str = ""
    variant: str = "fp32"

    @property
    def unit(self) -> str:
        return UNITS[self.kind]

    @property
    def id_hex(self) -> str:
        return self.model_id.hex()


def load_model(
    path: Path,
    *,
    name: str | None = None,
    kind: str = "tensor",
    expected_id: bytes | None = None,
    tokenizer: Path | None = None,
    max_batch: int = 8,
) -> ModelSpec:
    """Hash ``path`` and describe it as a servable model.

    Raises ModelError when the file is missing, its hash differs from
    ``expected_id``, the kind is unknown, or a text model lacks its tokenizer.
    """
    if kind not in KINDS:
        raise ModelError(f"unknown model kind {kind!r} (one of {', '.join(KINDS)})")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    digest = file_sha256(path)
    if expected_id is not None and digest != expected_id:
        raise ModelError(f"{path}: sha256 {digest.hex()} is not the expected {expected_id.hex()}")
    if kind != "tensor" and (tokenizer is None or not tokenizer.is_file()):
        raise ModelError(f"a {kind} model needs its tokenizer.json")
    return ModelSpec(
        name=name or path.stem, path=path, model_id=digest, kind=kind, tokenizer=tokenizer, max_batch=max_batch
    )


def load_manifest(folder: Path) -> ModelSpec:
    """A model built by :mod:`cocoon_p2p.execution.export`: ``model.json`` beside the files, hash checked."""
    meta = json.loads((folder / "model.json").read_text())
    tok = folder / meta["tokenizer"] if meta.get("tokenizer") else None
    spec = load_model(
        folder / meta["onnx"],
        name=meta["name"],
        kind=meta["kind"],
        expected_id=bytes.fromhex(meta["sha256"]),
        tokenizer=tok,
        max_batch=int(meta.get("max_batch", 8)),
    )
    # Exports before names were announced lack these: a quantized export says how.
    variant = str(meta.get("variant") or ("q4" if "quantization" in meta else "fp32"))
    public = str(meta.get("public_name") or spec.name.removesuffix(f"-{variant}"))
    spec = replace(spec, public_name=public, variant=variant)
    if spec.kind == "generation":
        spec = replace(
            spec,
            layers=int(meta["layers"]),
            kv_heads=int(meta["kv_heads"]),
            head_dim=int(meta["head_dim"]),
            eos=tuple(int(t) for t in meta["eos"]),
        )
    return spec
