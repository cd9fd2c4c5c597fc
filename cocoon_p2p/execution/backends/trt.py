"""The TensorRT backend: ONNX -> serialized engine (cached) -> execute_async_v3.

Needs the ``tensorrt`` Python package (TensorRT 10 or 11) and a CUDA GPU; device
buffers and the stream come from torch, which the ``[tensorrt]`` extra installs.
Engines and timing caches are cached under ``cache_dir``, keyed by model id,
TensorRT version and GPU compute capability, because an engine is only valid
for the exact build and GPU it was made for.

Dynamic axes get one optimisation profile: the batch axis (axis 0) spans
1..max_batch, other dynamic axes 1..max_seq, optimised for the middle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import BackendError, IOSpec


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT can run here, else why not (for logs and skipped tests)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (NVIDIA ships it outside PyPI's real wheels)"
    try:
        import torch
    except ImportError:
        return "torch (for CUDA buffers) is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


class TensorRTBackend:
    name = "tensorrt"
    device = "cuda"

    def __init__(self, path: Path, *, model_id: bytes, cache_dir: Path, max_batch: int = 8, max_seq: int = 512) -> None:
        reason = tensorrt_unavailable_reason()
        if reason is not None:
            raise BackendError(f"TensorRT backend unavailable: {reason}")
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        major, minor = torch.cuda.get_device_capability()
        tag = f"{model_id.hex()[:16]}-trt{trt.__version__}-sm{major}{minor}-b{max_batch}-s{max_seq}"
        cache_dir.mkdir(parents=True, exist_ok=True)
        engine_path = cache_dir / f"{tag}.engine"
        timing_path = cache_dir / f"trt{trt.__version__}-sm{major}{minor}.timing"
        if engine_path.is_file():
            blob = engine_path.read_bytes()
        else:
            blob = self._build(path, timing_path, max_batch, max_seq)
            tmp = engine_path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            tmp.replace(engine_path)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        ins: list[IOSpec] = []
        outs: list[IOSpec] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name
            shape = tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(name))
            spec = IOSpec(name, dtype, shape)
            (ins if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outs).append(spec)
        self.inputs, self.outputs = tuple(ins), tuple(outs)

    def _build(self, path: Path, timing_path: Path, max_batch: int, max_seq: int) -> bytes:
        trt = self._trt
        builder = trt.Builder(self.logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # precision from the ONNX types
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendError(f"TensorRT cannot parse {path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 2 << 30)
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            dims = list(tensor.shape)
            lo: list[int] = []
            opt: list[int] = []
            hi: list[int] = []
            for axis, d in enumerate(dims):
                top = max_batch if axis == 0 else max_seq
                lo.append(d if d >= 0 else 1)
                opt.append(d if d >= 0 else max(1, top // 2))
                hi.append(d if d >= 0 else top)
            profile.set_shape(tensor.name, lo, opt, hi)
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BackendError(f"TensorRT failed to build an engine for {path}")
        timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        return bytes(blob)

    def run(self, feeds: dict[str, np.ndarray[Any, Any]], *, release: bool = False) -> dict[str, np.ndarray[Any, Any]]:
        torch = self._torch
        keep: list[Any] = []
        with torch.cuda.stream(self.stream):
            for spec in self.inputs:
                t = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to("cuda", non_blocking=True)
                keep.append(t)
                self.context.set_input_shape(spec.name, tuple(t.shape))
                self.context.set_tensor_address(spec.name, t.data_ptr())
            outs = {}
            for spec in self.outputs:
                shape = tuple(self.context.get_tensor_shape(spec.name))
                o = torch.empty(shape, dtype=getattr(torch, spec.dtype), device="cuda")
                outs[spec.name] = o
                self.context.set_tensor_address(spec.name, o.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise BackendError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        result = {name: o.cpu().numpy() for name, o in outs.items()}
        if release:  # torch's caching allocator would keep this run's peak on the GPU
            del keep, outs
            torch.cuda.empty_cache()
        return result

    def close(self) -> None:
        del self.context, self.engine
