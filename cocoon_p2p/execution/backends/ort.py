"""The onnxruntime backend: CPU everywhere, CUDA where onnxruntime-gpu finds a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import BackendError, IOSpec

# onnxruntime type strings -> numpy dtype names
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _spec(arg: Any) -> IOSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise BackendError(f"{arg.name}: unsupported type {arg.type}")
    return IOSpec(arg.name, dtype, tuple(d if isinstance(d, int) else None for d in arg.shape))


class OnnxRuntimeBackend:
    """One onnxruntime InferenceSession. ``threads`` 0: onnxruntime's default (all cores).
    ``spin``: its threads spin-wait between runs (onnxruntime's default; off here: in a node
    they would spin on the cores its event loop needs to send the result and take the next
    job, which costs more than the microseconds of wake-up they save)."""

    name = "onnxruntime"

    def __init__(self, path: Path, *, threads: int = 0, spin: bool = False) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.log_severity_level = 3
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BackendError(f"onnxruntime cannot load {path}: {exc}") from exc
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        # The arena keeps small runs fast, but keeps a large run's peak for good (MiniLM,
        # 256 texts of 256 tokens: 4.9 GB): after a large run it shrinks back.
        self._release = ort.RunOptions()
        arenas = "cpu:0;gpu:0" if self.device == "cuda" else "cpu:0"
        self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        self.inputs = tuple(_spec(a) for a in self.session.get_inputs())
        self.outputs = tuple(_spec(a) for a in self.session.get_outputs())

    def run(self, feeds: dict[str, np.ndarray[Any, Any]], *, release: bool = False) -> dict[str, np.ndarray[Any, Any]]:
        try:
            results = self.session.run(None, feeds, self._release if release else None)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed: {exc}") from exc
        return {spec.name: np.asarray(r) for spec, r in zip(self.outputs, results, strict=True)}

    def close(self) -> None:
        del self.session
