"""Job benchmarks: network jobs against direct local onnxruntime calls, in the same run.

* dispatch: the tiny model, one row, sequential jobs: network p50 minus local p50
  is what the overlay adds per job (goal <= 1 ms on loopback).
* minilm: one sentence per job, network vs a direct Executor call (goal <= 1.2x).
* batching: 32 clients' worth of concurrent MiniLM jobs, worker with max_batch 32 vs 1.
* generation: SmolLM2 tokens/s streamed over the network vs local greedy decoding
  (goal >= 0.9x), and the 4-bit variant's local decode speed vs fp32 (goal >= 2x).

Each worker runs in a process of its own (benchmarks/worker_proc.py), as in a
deployment; client and worker talk over 127.0.0.1. Local baselines run in this process.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.executor import Executor, RunRequest
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2, ensure_smollm2_q4
from cocoon_p2p.execution.generation import chatml_prompt, greedy_tokens
from cocoon_p2p.execution.models import ModelSpec, load_model
from cocoon_p2p.execution.tensors import from_numpy
from cocoon_p2p.jobs import InferenceResult
from cocoon_p2p.jobs.frames import JobChunk
from cocoon_p2p.node import Node, NodeConfig
from cocoon_p2p.testing.tinymodel import build_tiny_model

SENTENCE = "Decentralized inference spreads jobs over the GPUs that are free at that moment."


@asynccontextmanager
async def _pair(kind: str, model_id: bytes) -> AsyncIterator[Node]:
    """A client connected to a worker process serving ``kind``; yields the client."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "benchmarks.worker_proc", kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = b""
        with trio.fail_after(120):  # the first run may export the model
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                if not chunk:
                    raise RuntimeError(f"worker process for {kind} exited")
                line += chunk
        async with Node(NodeConfig(announce_interval_s=0.5, bootstrap=[line.decode().strip()])) as client:
            with trio.fail_after(30):
                while not client.directory.workers_for(model_id, now_ms=now_ms()):
                    await trio.sleep(0.05)
            yield client
        await proc.stdin.aclose()
        with trio.move_on_after(10):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _local(run: Callable[[], Any], n: int) -> list[float]:
    run()  # warm
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1000)
    return times


async def bench_dispatch(n: int) -> dict[str, float]:
    with TemporaryDirectory() as d:
        spec = load_model(build_tiny_model(Path(d) / "tiny.onnx"))
        x = (from_numpy("x", np.ones((1, 4), np.float32)),)
        backend = OnnxRuntimeBackend(spec.path, threads=1)
        local = _local(lambda: backend.run({"x": np.ones((1, 4), np.float32)}), n)
        async with _pair("tiny", spec.model_id) as client:
            await client.infer(spec.model_id, inputs=x, max_price_nanoton=1)  # opens the stream
            times = []
            for _ in range(n):
                t = time.perf_counter()
                await client.infer(spec.model_id, inputs=x, max_price_nanoton=1)
                times.append((time.perf_counter() - t) * 1000)
    return {
        "job_tiny_ms_p50": statistics.median(times),
        "job_tiny_ms_p99": percentile(times, 99),
        "job_tiny_local_ms_p50": statistics.median(local),
        "job_dispatch_overhead_ms_p50": statistics.median(times) - statistics.median(local),
    }


async def bench_minilm(n: int, rounds: int = 5) -> dict[str, float]:
    """One sentence per job, network vs a direct Executor call, ``n`` of each.

    The two alternate in ``rounds`` rounds (medians over all), as the throughput
    benchmark does: this machine's speed drifts by 10-20% within a minute. Each
    phase starts after a pause, so neither side's onnxruntime threads, still
    spinning after their last run, take CPU from the other's.
    """
    spec = ensure_minilm()
    ex = Executor(spec, OnnxRuntimeBackend(spec.path))
    req = RunRequest(texts=(SENTENCE,))
    local: list[float] = []
    times: list[float] = []
    per_round = max(1, n // rounds)
    async with _pair("minilm", spec.model_id) as client:
        await client.infer(spec.model_id, texts=(SENTENCE,), max_price_nanoton=1)
        for _ in range(rounds):
            await trio.sleep(0.1)
            local += _local(lambda: ex.run([req]), per_round)
            await trio.sleep(0.1)
            await client.infer(spec.model_id, texts=(SENTENCE,), max_price_nanoton=1)  # warm, as _local does
            for _ in range(per_round):
                t = time.perf_counter()
                await client.infer(spec.model_id, texts=(SENTENCE,), max_price_nanoton=1)
                times.append((time.perf_counter() - t) * 1000)
    return {
        "minilm_job_ms_p50": statistics.median(times),
        "minilm_local_ms_p50": statistics.median(local),
        "minilm_network_vs_local": statistics.median(times) / statistics.median(local),
    }


async def _throughput(kind: str, spec: ModelSpec, jobs: int, concurrency: int) -> tuple[float, float]:
    async with _pair(kind, spec.model_id) as client:
        await client.infer(spec.model_id, texts=(SENTENCE,), max_price_nanoton=1)
        remaining = [jobs]

        async def lane() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                await client.infer(spec.model_id, texts=(SENTENCE,), max_price_nanoton=1)

        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(lane)
        elapsed = time.perf_counter() - t
    return jobs / elapsed, elapsed


async def bench_batching(jobs: int) -> dict[str, float]:
    spec = ensure_minilm()
    batched, _ = await _throughput("minilm", spec, jobs, 32)
    single, _ = await _throughput("minilm-b1", spec, jobs, 32)
    return {
        "minilm_jobs_per_s_batched": batched,
        "minilm_jobs_per_s_unbatched": single,
        "batching_speedup": batched / single,
    }


async def bench_generation(tokens: int) -> dict[str, float]:
    spec = ensure_smollm2()
    prompt = chatml_prompt([{"role": "user", "content": "Write a long story about a lighthouse keeper."}])
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(spec.tokenizer)).encode(prompt, add_special_tokens=False).ids
    backend = OnnxRuntimeBackend(spec.path)
    kv = {"layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim}
    t = time.perf_counter()
    stream = greedy_tokens(backend.run, ids, tokens, eos=spec.eos, **kv)
    first = next(stream)
    t_first_local = time.perf_counter() - t
    t = time.perf_counter()
    local_n = 1 + sum(1 for _ in stream)
    local_decode = (local_n - 1) / (time.perf_counter() - t)
    async with _pair("smollm2", spec.model_id) as client:
        t0 = time.perf_counter()
        t_first = t_last = 0.0
        n = 0
        result: InferenceResult | None = None
        async for item in client.generate(spec.model_id, prompt, max_tokens=tokens, max_price_nanoton=1):
            if isinstance(item, JobChunk):
                n += 1
                t_last = time.perf_counter()
                if n == 1:
                    t_first = t_last
            else:
                result = item
        assert result is not None and result.token_ids[0] == first
    net_decode = (n - 1) / (t_last - t_first)
    q4 = ensure_smollm2_q4()
    stream = greedy_tokens(OnnxRuntimeBackend(q4.path).run, ids, tokens, eos=(), **kv)
    next(stream)
    t = time.perf_counter()
    q4_n = sum(1 for _ in stream)
    q4_decode = q4_n / (time.perf_counter() - t)
    return {
        "gen_q4_local_tok_s": q4_decode,
        "gen_q4_vs_fp32": q4_decode / local_decode,
        "gen_tokens": n,
        "gen_local_first_token_ms": t_first_local * 1000,
        "gen_network_first_token_ms": (t_first - t0) * 1000,
        "gen_local_tok_s": local_decode,
        "gen_network_tok_s": net_decode,
        "gen_network_vs_local": net_decode / local_decode,
    }


async def bench_router(workers: int, rounds: int) -> dict[str, float]:
    """The router's choice among ``workers`` offers (a gateway's every job), two thirds of
    them with learned job times: ours draws the sample by rejection above DRAW_ABOVE
    offers; the baseline weighs every offer (the router below DRAW_ABOVE, and before).
    Alternating rounds of 50 choices."""
    import random

    from cocoon_p2p.jobs import routing
    from cocoon_p2p.overlay.directory import WorkerOffer

    offers = [WorkerOffer(peer_id=i.to_bytes(38, "big"), model_id=bytes(32), addrs=(), backend="onnxruntime", gpu="cpu",
                          price_nanoton=1, unit="item", capacity=8, free_capacity=8, running_jobs=i % 8, issued_at_ms=0,
                          expires_at_ms=2**62, sources=frozenset({"gossip"})) for i in range(workers)]  # fmt: skip
    router = routing.Router(rng=random.Random(1))
    rng = random.Random(2)
    for o in offers[: 2 * workers // 3]:
        router.finished(o.peer_id, 0.1 + rng.random())
    drawn: list[float] = []
    weighed: list[float] = []
    above = routing.DRAW_ABOVE
    try:
        for r in range(2 * rounds):
            routing.DRAW_ABOVE = 10**9 if r % 2 else above
            t = time.perf_counter()
            for _ in range(50):
                router.choose(offers, max_price=10, now=0.0)
            (weighed if r % 2 else drawn).append((time.perf_counter() - t) / 50 * 1e6)
    finally:
        routing.DRAW_ABOVE = above
    return {
        f"router_{workers}_us_p50": statistics.median(drawn),
        f"router_{workers}_us_p50_weigh_all": statistics.median(weighed),
        f"router_{workers}_speedup": statistics.median(weighed) / statistics.median(drawn),
    }


BENCHES: list[tuple[str, Callable[[bool], Any]]] = [
    ("router_3000", lambda quick: bench_router(3000, 5 if quick else 20)),
    ("job_dispatch", lambda quick: bench_dispatch(100 if quick else 500)),
    ("job_minilm", lambda quick: bench_minilm(30 if quick else 1000, rounds=2 if quick else 10)),
    ("job_batching", lambda quick: bench_batching(128 if quick else 512)),
    ("job_generation", lambda quick: bench_generation(32 if quick else 128)),
]
