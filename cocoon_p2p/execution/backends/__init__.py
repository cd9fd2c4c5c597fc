"""Execution backends: one interface, the same job semantics on GPU and CPU.

* ``onnxruntime`` (:mod:`.ort`): CPU, or CUDA when onnxruntime-gpu is installed.
* ``tensorrt`` (:mod:`.trt`): NVIDIA GPUs; an optional extra, imported only when chosen.

``open_backend("auto", ...)`` picks TensorRT when it is importable and a GPU is
visible, else onnxruntime, and says why in :func:`backend_choice`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cocoon_p2p.core.errors import CocoonError, MalformedMessage
from cocoon_p2p.execution.tensors import dtype_name

if TYPE_CHECKING:
    import numpy as np

BACKENDS = ("auto", "tensorrt", "onnxruntime")


class BackendError(CocoonError):
    """The backend failed to load a model or to run it (fails that job only)."""


@dataclass(frozen=True)
class IOSpec:
    """One model input or output: numpy dtype name and shape (None: dynamic dim)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]


class Backend(Protocol):
    """A loaded model ready to run. ``run`` is synchronous; callers run it in a thread.
    ``release``: after this (large) run, give the memory the backend keeps for reuse
    back to the system, so one large job does not raise the worker's memory for good."""

    name: str
    device: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]

    def run(
        self, feeds: dict[str, np.ndarray[Any, Any]], *, release: bool = False
    ) -> dict[str, np.ndarray[Any, Any]]: ...

    def close(self) -> None: ...


def check_feeds(inputs: tuple[IOSpec, ...], feeds: dict[str, Any], *, max_dim: int = 1 << 16) -> None:
    """Names, dtypes and ranks as the model declares; fixed dims equal. MalformedMessage (bad-input) if not."""
    want = {s.name for s in inputs}
    if set(feeds) != want:
        raise MalformedMessage(f"inputs {sorted(feeds)} but the model takes {sorted(want)}", code="bad-input")
    for spec in inputs:
        a = feeds[spec.name]
        if dtype_name(a.dtype) != spec.dtype:
            raise MalformedMessage(f"input {spec.name}: dtype {a.dtype}, model wants {spec.dtype}", code="bad-input")
        if a.ndim != len(spec.shape):
            raise MalformedMessage(f"input {spec.name}: rank {a.ndim}, model wants {len(spec.shape)}", code="bad-input")
        for got, dim in zip(a.shape, spec.shape, strict=True):
            if (dim is not None and got != dim) or got > max_dim or got == 0:
                raise MalformedMessage(
                    f"input {spec.name}: shape {a.shape} does not fit {spec.shape}", code="bad-input"
                )


def backend_choice(requested: str) -> tuple[str, str]:
    """(backend name, reason) for ``requested`` in BACKENDS."""
    if requested not in BACKENDS:
        raise BackendError(f"unknown backend {requested!r} (one of {', '.join(BACKENDS)})")
    if requested != "auto":
        return requested, "requested"
    from .trt import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is None:
        return "tensorrt", "TensorRT and a CUDA GPU are present"
    return "onnxruntime", reason


def open_backend(requested: str, path: Path, *, model_id: bytes, cache_dir: Path, max_batch: int = 8) -> Backend:
    """Load the ONNX file at ``path`` on the chosen backend."""
    name, _why = backend_choice(requested)
    if name == "tensorrt":
        from .trt import TensorRTBackend

        return TensorRTBackend(path, model_id=model_id, cache_dir=cache_dir, max_batch=max_batch)
    from .ort import OnnxRuntimeBackend

    return OnnxRuntimeBackend(path)
