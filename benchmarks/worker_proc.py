"""A worker in its own process for the job benchmarks: ``python -m benchmarks.worker_proc KIND``.

Serves one model (``tiny``, ``minilm``, ``minilm-b1``, ``smollm2``) and prints its
multiaddr on stdout; runs until stdin closes. Separate processes are how workers
and clients really run, and they do not share one interpreter's time.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from tempfile import TemporaryDirectory

import trio

from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2
from cocoon_p2p.execution.models import ModelSpec, load_model
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.testing.tinymodel import build_tiny_model
from cocoon_p2p.transport.host import quiet_libp2p_logs


def spec_for(kind: str, tmp: Path) -> ModelSpec:
    if kind == "tiny":
        return load_model(build_tiny_model(tmp / "tiny.onnx"))
    if kind == "minilm":
        return replace(ensure_minilm(), max_batch=32)
    if kind == "minilm-b1":
        return replace(ensure_minilm(), max_batch=1)
    if kind == "smollm2":
        return ensure_smollm2()
    raise SystemExit(f"unknown model kind {kind}")


async def serve(kind: str) -> None:
    quiet_libp2p_logs()
    with TemporaryDirectory() as d:
        spec = spec_for(kind, Path(d))
        async with Node(NodeConfig(announce_interval_s=0.5, job_capacity=64)) as node:
            node.serve_model(spec, OnnxRuntimeBackend(spec.path), price_nanoton=1)
            print(node.addrs[0], flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the benchmark closes our stdin


if __name__ == "__main__":
    trio.run(serve, sys.argv[1])
