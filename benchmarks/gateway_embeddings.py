"""Embeddings through the gateway: where a request's time goes, and how many it sustains.
``python -m benchmarks.gateway_embeddings [--quick] [--profile-gateway FILE]``.

Issue 20's gateway benchmark. Processes on 127.0.0.1: ``cocoon-node worker --model minilm``
(onnxruntime) and ``cocoon-node gateway`` (API key checked, no payments), joined over
libp2p; this process drives them.

* **Latency** (one request at a time; rounds alternate the paths, the order rotating):
  ``direct``, a local in-process MiniLM call of the same text (the
  :class:`~cocoon_p2p.execution.executor.Executor` on onnxruntime, tokenizer included: the
  baseline); ``http``, a keep-alive ``http.client`` POST of the body the ``openai`` client
  sends (base64); ``openai``, the official client (base64, its default); ``openai-float``.
  From the gateway's ``/metrics`` (means over the same requests): its handler's time and its
  job's, so the end-to-end time splits into the model, the network and worker around it, the
  gateway's own work, the HTTP edge and the client library's own work.
* **Throughput curve**: N clients, each a keep-alive connection sending the same request as
  soon as its last answer came, for N in 1, 2, 4, 8, 16, 32; requests/s, p50, p99 and errors
  per N. The clients are a lean trio loop in this process (the ``openai`` client costs 2-5 ms
  of CPU a request, which on 2 cores would measure the client more than the gateway).

Goals (issue 20): ``openai`` p50 <= 1.5x ``direct``; >= 300 requests/s at 16 clients with one
worker. Writes benchmarks/results/gateway_embeddings.json, .md and (with matplotlib) .png;
``--profile-gateway FILE`` runs the gateway under cProfile and writes its stats there.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import trio

from cocoon_p2p.core.metrics import percentile
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.executor import Executor, RunRequest
from cocoon_p2p.execution.export import ensure_minilm

from .gateway_engine import SENTENCE, alternating, gateway_mean_ms, gateway_metrics, warm
from .gateway_engine_net import EMBED_MODEL, NODE_CLI, Child, Stack, wait_gateway_models
from .runmeta import RunMeta, load_1min

OUT = Path(__file__).parent / "results" / "gateway_embeddings.json"
ROUTE = "/v1/embeddings"
DIMS = 384
PATHS = ("direct", "http", "openai", "openai-float")
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Settings:
    rounds: int = 300  # latency rounds, one request per path each
    warmup: int = 20
    levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    level_s: float = 8.0  # each curve point's measured time (after 1 s unmeasured)


QUICK = Settings(rounds=20, warmup=3, levels=(1, 16), level_s=2.0)


def _say(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {msg}", file=sys.stderr, flush=True)


# ---- the processes ------------------------------------------------------------------------


@contextmanager
def open_stack(tmp: Path, capacity: int, profile: Path | None = None) -> Iterator[Stack]:
    """A MiniLM worker admitting ``capacity`` jobs at once and a gateway joined to it (the
    gateway under cProfile, writing ``profile`` when it stops, if given); stopped on exit."""
    key = f"sk-bench-{secrets.token_hex(16)}"
    (tmp / "api-keys").write_text(key + "\n")
    with ExitStack() as stack:
        worker = Child(
            "minilm worker",
            [*NODE_CLI, "worker", "--data-dir", str(tmp / "w"), "--model", EMBED_MODEL, "--backend", "onnxruntime",
             "--price-nanoton", "1", "--announce-interval-s", "0.5", "--capacity", str(capacity),
             "--log-level", "WARNING"],
        )  # fmt: skip
        stack.callback(worker.stop)
        worker.expect("serving ")
        addr = next(line for line in worker.tail if line.startswith("listening ")).split()[1]
        prefix = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "cocoon_p2p.nodes.cli"] if profile else []
        gw = Child(
            "gateway",
            [*(prefix or NODE_CLI), "gateway", "--data-dir", str(tmp / "gw"), "--http", "127.0.0.1:0",
             "--model", EMBED_MODEL, "--max-price-nanoton", "1000", "--api-key-file", str(tmp / "api-keys"),
             "--bootstrap", addr, "--log-level", "WARNING"],
        )  # fmt: skip
        stack.callback(gw.stop)
        url = gw.expect("gateway ").split()[1]
        wait_gateway_models(url, key, (EMBED_MODEL,))
        yield Stack(direct="", gateway=url, litellm=None, api_key=key)


# ---- latency, one request at a time ------------------------------------------------------


class RawClient:
    """A keep-alive HTTP/1.1 connection sending the embeddings request as bytes."""

    def __init__(self, stack: Stack) -> None:
        url = urlsplit(stack.gateway)
        self.conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
        self.path = url.path + "/embeddings"
        self.body = json.dumps({"model": EMBED_MODEL, "input": [SENTENCE], "encoding_format": "base64"}).encode()
        self.headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}

    def __call__(self) -> object:
        self.conn.request("POST", self.path, self.body, self.headers)
        reply = self.conn.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"http: {reply.status} {data[:200]!r}")
        vector = base64.b64decode(json.loads(data)["data"][0]["embedding"])
        if len(vector) != 4 * DIMS:
            raise RuntimeError(f"http: {len(vector) // 4} dimensions")
        return vector


def bench_latency(stack: Stack, s: Settings) -> dict[str, Any]:
    """Every path one request a round, alternating; the gateway's own split from its metrics."""
    spec = ensure_minilm()
    # The worker's backend at its default threads, spinning as onnxruntime does by default
    # (the faster setting for a bare call: the baseline at its best).
    ex = Executor(spec, OnnxRuntimeBackend(spec.path, spin=True))
    req = RunRequest(texts=(SENTENCE,))
    api = openai.OpenAI(base_url=stack.gateway, api_key=stack.api_key, max_retries=0, timeout=60)

    def via_openai(fmt: Any) -> Callable[[], object]:
        def call() -> object:
            reply = api.embeddings.create(model=EMBED_MODEL, input=SENTENCE, encoding_format=fmt)
            if len(reply.data[0].embedding) != DIMS:
                raise RuntimeError(f"openai: {len(reply.data[0].embedding)} dimensions")
            return reply

        return call

    # The openai client asks base64 when not told (and decodes it); "float" asks JSON numbers.
    calls: dict[str, Callable[[], object]] = {
        "direct": lambda: ex.run([req]),
        "http": RawClient(stack),
        "openai": via_openai(openai.NOT_GIVEN),
        "openai-float": via_openai("float"),
    }
    warm(calls, s.warmup)
    gw_before = gateway_metrics(stack)
    times, loads = alternating(calls, s.rounds, label="latency", every=50)
    gw_after = gateway_metrics(stack)
    gateway = {
        "request_ms_mean": gateway_mean_ms(gw_before, gw_after, "request", ROUTE),
        "job_ms_mean": gateway_mean_ms(gw_before, gw_after, "job", ROUTE),
    }
    return {
        "load_1min": loads,
        "gateway": gateway,
        "paths": {n: {**_summary(t), "mean": round(statistics.fmean(t), 3), "samples": t} for n, t in times.items()},
    }


def breakdown(lat: dict[str, Any]) -> dict[str, float]:
    """Where an ``openai`` request's time goes (ms, means; the gateway's counts its three
    gateway-bound paths alike). Differences of means over the same rounds."""
    p, gw = lat["paths"], lat["gateway"]
    http_mean = p["http"]["mean"]
    return {
        "model (direct call)": p["direct"]["mean"],
        "network + worker around the model": round(gw["job_ms_mean"] - p["direct"]["mean"], 3),
        "gateway's own work (parse, route, encode)": round(gw["request_ms_mean"] - gw["job_ms_mean"], 3),
        "HTTP edge (both ends' sockets, h11)": round(http_mean - gw["request_ms_mean"], 3),
        "openai client's own work": round(p["openai"]["mean"] - http_mean, 3),
    }


# ---- the throughput curve ----------------------------------------------------------------


async def _one_client(
    stream: trio.SocketStream, request: bytes, until: float, lat: list[float], errors: list[str]
) -> None:
    """Send ``request`` again as soon as each answer is read, until ``until``."""
    buf = b""
    while trio.current_time() < until:
        t = time.perf_counter()
        await stream.send_all(request)
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                raise RuntimeError("the gateway closed the connection")
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (x.partition(b":") for x in lines[1:]) if k.lower() == b"content-length")
        while len(buf) < length:
            buf += await stream.receive_some(65536)
        body, buf = buf[:length], buf[length:]
        if status != 200 or b'"embedding"' not in body:
            errors.append(f"{status} {body[:120]!r}")
            continue
        lat.append((time.perf_counter() - t) * 1000)


async def _level(stack: Stack, n: int, seconds: float) -> dict[str, Any]:
    url = urlsplit(stack.gateway)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    body = json.dumps({"model": EMBED_MODEL, "input": [SENTENCE], "encoding_format": "base64"}).encode()
    request = (
        f"POST {url.path}/embeddings HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {stack.api_key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    streams = [await trio.open_tcp_stream(host, port) for _ in range(n)]
    try:
        warm: list[float] = []
        errors: list[str] = []
        async with trio.open_nursery() as nursery:  # one unmeasured second: batches form, buffers grow
            for st in streams:
                nursery.start_soon(_one_client, st, request, trio.current_time() + 1.0, warm, errors)
        lat: list[float] = []
        t = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for st in streams:
                nursery.start_soon(_one_client, st, request, trio.current_time() + seconds, lat, errors)
        elapsed = time.perf_counter() - t
    finally:
        for st in streams:
            await st.aclose()
    return {
        "clients": n,
        "requests": len(lat),
        "requests_per_s": round(len(lat) / elapsed, 1),
        "p50_ms": round(statistics.median(lat), 3) if lat else None,
        "p99_ms": round(percentile(lat, 99), 3) if lat else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "load_1min": load_1min(),
    }


def bench_curve(stack: Stack, s: Settings) -> list[dict[str, Any]]:
    out = []
    for n in s.levels:
        point = trio.run(_level, stack, n, s.level_s)
        _say(f"curve: {n} clients: {point['requests_per_s']} req/s, p50 {point['p50_ms']} ms, "
             f"p99 {point['p99_ms']} ms, {point['errors']} errors; load {point['load_1min']}")  # fmt: skip
        out.append(point)
    return out


def model_batch16_texts_per_s() -> float:
    """The model alone on batches of 16 texts (what one worker could give 16 clients at most)."""
    spec = ensure_minilm()
    ex = Executor(spec, OnnxRuntimeBackend(spec.path, spin=True))
    req = RunRequest(texts=(SENTENCE,) * 16)
    ex.run([req])
    t, runs = time.perf_counter(), 20
    for _ in range(runs):
        ex.run([req])
    return round(16 * runs / (time.perf_counter() - t), 1)


# ---- the report -------------------------------------------------------------------------------


def _summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": round(statistics.median(values), 3), "p99": round(percentile(values, 99), 3)}


def goals(lat: dict[str, Any], curve: list[dict[str, Any]], model_texts_per_s: float) -> dict[str, Any]:
    """Issue 20's two checks, and the throughput at 16 clients as a share of what the model
    alone does on batches of 16 on this machine (no gateway can pass that)."""
    p = lat["paths"]
    ratio = p["openai"]["p50"] / p["direct"]["p50"]
    at16 = next((c for c in curve if c["clients"] == 16), None)
    return {
        "openai_vs_direct_p50": round(ratio, 3),
        "latency_met": ratio <= 1.5,
        "requests_per_s_at_16": at16["requests_per_s"] if at16 else None,
        "throughput_met": bool(at16 and at16["requests_per_s"] >= 300 and not at16["errors"]),
        "at_16_vs_model_alone": round(at16["requests_per_s"] / model_texts_per_s, 3) if at16 else None,
    }


def write_markdown(out: dict[str, Any], path: Path) -> str:
    meta, lat, curve, g = out["meta"], out["latency"], out["curve"], out["goals"]
    ok = {True: "met", False: "MISSED"}
    lines = [
        f"# gateway_embeddings ({meta['when']}, {meta['cpus']} CPUs, load {meta['load_avg_at_start']} -> "
        f"{meta['load_avg_at_end']}{', quick' if meta['quick'] else ''})",
        "",
        f"MiniLM, one sentence a request; one worker process (capacity {meta['settings']['worker_capacity']}), "
        "one gateway process, 127.0.0.1; "
        f"{meta['settings']['rounds']} latency rounds (paths alternating); openai {openai.__version__}.",
        "",
        "| path | p50 ms | p99 ms | mean ms |",
        "|---|---|---|---|",
        *(f"| {n} | {p['p50']:.2f} | {p['p99']:.2f} | {p['mean']:.2f} |" for n, p in lat["paths"].items()),
        "",
        "Where an `openai` request's time goes (means):",
        "",
        "| part | ms |",
        "|---|---|",
        *(f"| {k} | {v:.2f} |" for k, v in out["breakdown"].items()),
        "",
        f"Throughput, N keep-alive clients each sending its next request when its answer came "
        f"({meta['settings']['level_s']:g} s a point); the model alone on batches of 16: "
        f"{out['model_batch16_texts_per_s']:.0f} texts/s.",
        "",
        "| clients | requests/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|",
        *(
            f"| {c['clients']} | {c['requests_per_s']:.0f} | {c['p50_ms']} | {c['p99_ms']} | {c['errors']} |"
            for c in curve
        ),  # fmt: skip
        "",
        f"- `openai` p50 vs a direct local call: {g['openai_vs_direct_p50']:.2f}x, goal <= 1.5x: "
        f"{ok[g['latency_met']]}",
        f"- requests/s at 16 clients: {g['requests_per_s_at_16']}, goal >= 300: {ok[g['throughput_met']]} "
        f"({g['at_16_vs_model_alone']:.2f}x the model alone on batches of 16, which bounds any gateway)",
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def write_plot(out: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("no matplotlib: no plot")
        return
    curve = out["curve"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    n = [c["clients"] for c in curve]
    ax1.plot(n, [c["requests_per_s"] for c in curve], "o-", label="requests/s")
    ax1.axhline(300, color="grey", ls="--", lw=0.8, label="goal at 16 clients")
    ax1.set(xscale="log", xlabel="concurrent clients", ylabel="requests/s", title="Embeddings through the gateway")
    ax1.set_xticks(n, [str(x) for x in n])
    ax1b = ax1.twinx()
    ax1b.plot(n, [c["p99_ms"] for c in curve], "s--", color="tab:red", label="p99 ms")
    ax1b.set_ylabel("p99 latency, ms")
    ax1.legend(loc="upper left")
    ax1b.legend(loc="lower right")
    paths = out["latency"]["paths"]
    ax2.boxplot([paths[p]["samples"] for p in PATHS], showfliers=False)
    ax2.set_xticks(range(1, len(PATHS) + 1), list(PATHS))
    ax2.set(ylabel="ms", title="One request at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gateway_embeddings")
    ap.add_argument("--quick", action="store_true", help="20 latency rounds, 2 curve points of 2 s")
    ap.add_argument("--profile-gateway", type=Path, metavar="FILE", help="run the gateway under cProfile")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--worker-capacity", type=int, default=32,
        help="jobs the worker admits at once (default 32, MiniLM's batch; the node's default is 8)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    s = QUICK if args.quick else Settings()
    runmeta = RunMeta.start()
    with (
        tempfile.TemporaryDirectory(prefix="gateway-emb-") as tmp,
        open_stack(Path(tmp), args.worker_capacity, args.profile_gateway) as st,
    ):
        _say(f"gateway up at {st.gateway}")
        latency = bench_latency(st, s)
        curve = bench_curve(st, s)
    out: dict[str, Any] = {
        "meta": {
            **runmeta.finish(one_minute=True),
            "quick": args.quick,
            "settings": {
                "rounds": s.rounds,
                "levels": list(s.levels),
                "level_s": s.level_s,
                "worker_capacity": args.worker_capacity,
            },  # fmt: skip
        },
        "latency": latency,
        "breakdown": breakdown(latency),
        "curve": curve,
        "model_batch16_texts_per_s": model_batch16_texts_per_s(),
    }
    out["goals"] = goals(latency, curve, out["model_batch16_texts_per_s"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(write_markdown(out, args.out.with_suffix(".md")))
    write_plot(out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
