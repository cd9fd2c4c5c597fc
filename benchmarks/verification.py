"""Verified results without a TEE: what an honest result varies by, what a cheat looks like,
and what a check costs. ``python -m benchmarks.verification [--quick] [--out FILE]``.

* Generation (SmolLM2 fp32): greedy tokens from ``greedy_tokens`` (128, or to EOS) at
  1 and 2 onnxruntime threads, each checked by :class:`GreedyVerifier` at 1 and 2
  threads. Honest tokens must agree everywhere; where float order could flip a
  near-tie we measure how close: the decode steps' top-2 margins against the
  verifier's, position by position.
* The 4-bit cheat: SmolLM2-q4's greedy tokens checked against the fp32 verifier.
* Cost: generating 128 tokens vs checking them once, alternating, same threads.
* Embeddings (MiniLM): cosine between runs of the same texts at batch sizes 1, 8, 32
  and 1 vs 2 threads, against a cheat (other texts, random vectors, an int8 MiniLM).

Prints a table and writes benchmarks/results/verification.json.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.executor import Executor, RunRequest
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2, ensure_smollm2_q4
from cocoon_p2p.execution.generation import chatml_prompt, greedy_tokens
from cocoon_p2p.execution.models import ModelSpec, load_model
from cocoon_p2p.execution.tensors import to_numpy
from cocoon_p2p.execution.verification import TIE_GAP, GreedyVerifier, cosine_agreement

from .runmeta import run_meta

OUT = Path(__file__).parent / "results" / "verification.json"
MAX_NEW = 128
PROMPTS = [
    "Explain how a payment channel works.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What is the capital of France?",
    "List five tips for staying focused while studying.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Translate into French: The train leaves at seven in the morning.",
    "Give me a recipe for a simple tomato soup.",
    "What are the main differences between TCP and UDP?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "Compute 17 times 23 and explain each step.",
    "Write a haiku about autumn rain.",
    "What causes inflation, and how do central banks respond to it?",
    "Describe the water cycle.",
    "Write a polite email declining a meeting invitation.",
    "How do vaccines train the immune system?",
    "Name three famous paintings and their painters.",
    "What is a hash function? Give an example of where one is used.",
    "Suggest a weekend itinerary for a first visit to Rome.",
    "Explain recursion with an example in JavaScript.",
]
SUBJECTS = [
    "The cat",
    "A young engineer",
    "Our team",
    "The old bridge",
    "Every validator",
    "She",
    "The market",
    "A storm",
]
VERBS = ["crossed", "repaired", "ignored", "measured", "celebrated", "announced", "rebuilt", "questioned"]
OBJECTS = ["the river", "a broken GPU", "the payment channel", "three new ideas", "the quiet village", "42 blocks"]
TAILS = ["before dawn", "with great care", "for the first time", "despite the rain", "in Zürich", "at 3 p.m.", ""]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sentences(n: int, rng: random.Random) -> list[str]:
    """Varied texts: one to eight clauses, numbers, accents, now and then a question."""
    out = []
    for _ in range(n):
        clauses = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(TAILS)}".strip()
            for _ in range(rng.choice([1, 1, 2, 3, 5, 8]))
        ]
        text = ", and ".join(clauses) + rng.choice([".", "?", "!", f" ({rng.randint(1, 9999)})."])
        out.append(text)
    return out


def _kv(spec: ModelSpec) -> dict[str, int]:
    return {"layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim}


def _margin(logits: np.ndarray[Any, Any]) -> float:
    top2 = np.partition(logits, -2)[-2:]
    return float(top2[1] - top2[0])


def _generate(backend: OnnxRuntimeBackend, spec: ModelSpec, ids: list[int]) -> tuple[list[int], list[float], float]:
    """Greedy tokens, the top-2 margin of each decode step, and the seconds it took."""
    margins: list[float] = []

    def run(feeds: dict[str, Any]) -> dict[str, Any]:
        out = backend.run(feeds)
        margins.append(_margin(out["logits"][0]))  # ~0.2 ms against a step of ~100 ms
        return out

    t = time.perf_counter()
    tokens = list(greedy_tokens(run, ids, MAX_NEW, eos=spec.eos, **_kv(spec)))
    return tokens, margins, time.perf_counter() - t


def bench_generation(spec: ModelSpec, prompts: list[list[int]], threads: tuple[int, ...]) -> dict[str, Any]:
    """Honest tokens at each thread count, checked by a verifier at each thread count."""
    verifiers = {t: GreedyVerifier(spec, threads=t) for t in threads}
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10  # peak so far, KiB on Linux
    res: dict[str, Any] = {"verifier_graph_bytes": verifiers[threads[0]].graph_path.stat().st_size}
    res["peak_rss_mb_after_verifiers"] = rss_mb
    tokens_by: dict[int, list[list[int]]] = {}
    agreements, mismatches, deviations, honest_margins, honest_accepted = [], [], [], [], 0
    for t in threads:
        backend = OnnxRuntimeBackend(spec.path, threads=t)
        _generate(backend, spec, prompts[0][:8])  # warm both sessions up
        verifiers[t].check(prompts[0], [1, 2, 3])
        gen_s, check_s, lengths, cpu_ratio = [], [], [], []
        tokens_by[t] = []
        for p, ids in enumerate(prompts):
            cpu = time.process_time()
            tokens, margins, g = _generate(backend, spec, ids)
            gen_cpu = time.process_time() - cpu
            tokens_by[t].append(tokens)
            for vt, verifier in verifiers.items():
                start, cpu = time.perf_counter(), time.process_time()
                check = verifier.check(ids, tokens, max_tokens=MAX_NEW)
                c = time.perf_counter() - start
                if vt == t:  # the cost pair: the same threads, measured back to back
                    gen_s.append(g)
                    check_s.append(c)
                    lengths.append(len(tokens))
                    if len(tokens) == MAX_NEW:
                        cpu_ratio.append((time.process_time() - cpu) / gen_cpu)
                agreements.append(check.agreement)
                honest_accepted += check.accepted
                run = verifier.greedy_pass(ids, tokens)
                deviations.append(float(np.max(np.abs(np.array(margins) - run.margins))))
                honest_margins += run.margins.tolist()
                mismatches += [
                    {"prompt": p, "gen_threads": t, "check_threads": vt, "position": i, "gap": check.gaps[i]}
                    for i, ok in enumerate(check.agree)
                    if not ok
                ]
            _say(f"  threads {t} prompt {p}: {len(tokens)} tokens in {g:.1f} s, check {c:.2f} s")
        full = [i for i, n in enumerate(lengths) if n == MAX_NEW]
        ratios = [check_s[i] / gen_s[i] for i in full]
        res[f"threads_{t}"] = {
            "generations": len(prompts),
            "of_128_tokens": len(full),
            "gen_s_median": round(statistics.median(gen_s[i] for i in full), 3) if full else None,
            "check_s_median": round(statistics.median(check_s[i] for i in full), 3) if full else None,
            "cost_ratio_median": round(statistics.median(ratios), 4) if ratios else None,
            "cost_ratio_max": round(max(ratios), 4) if ratios else None,
            "cost_ratio_cpu_time_median": round(statistics.median(cpu_ratio), 4) if cpu_ratio else None,
            "prompt_tokens_median": statistics.median(len(p) for p in prompts),
            "ms_per_generated_token": round(1000 * sum(gen_s) / sum(lengths), 1),
        }
    arr = np.array(honest_margins)
    res |= {
        "checks": len(agreements),
        "honest_min_agreement": min(agreements),
        "honest_accepted": honest_accepted,
        "honest_mismatches": mismatches,
        "positions_checked": int(arr.size),
        "max_margin_deviation_decode_vs_prefill": max(deviations),
        "min_honest_margin": float(arr.min()),
        "honest_margins_below_0_01": int((arr < 0.01).sum()),
        "honest_margins_below_tie_gap": int((arr < TIE_GAP).sum()),
    }
    if len(threads) > 1:
        res["same_tokens_across_threads"] = all(
            len({str(tokens_by[t][p]) for t in threads}) == 1 for p in range(len(prompts))
        )
    return res


def bench_q4(spec: ModelSpec, q4: ModelSpec, prompts: list[list[int]], threads: int) -> dict[str, Any]:
    """The cheat: 4-bit tokens presented as the fp32 model's."""
    verifier = GreedyVerifier(spec, threads=threads)
    backend = OnnxRuntimeBackend(q4.path, threads=threads)
    agreements, first, accepted, excused, mismatch_gaps = [], [], 0, 0, []
    for p, ids in enumerate(prompts):
        tokens, _, g = _generate(backend, q4, ids)
        check = verifier.check(ids, tokens, max_tokens=MAX_NEW)
        agreements.append(check.agreement)
        first.append(check.first_mismatch)
        accepted += check.accepted
        gaps = [gap for gap, ok in zip(check.gaps, check.agree, strict=True) if not ok]
        mismatch_gaps += gaps
        excused += sum(gap < TIE_GAP for gap in gaps)
        _say(f"  q4 prompt {p}: {len(tokens)} tokens in {g:.1f} s, agreement {check.agreement:.2f}")
    gaps_arr = np.array(mismatch_gaps) if mismatch_gaps else np.zeros(1)
    return {
        "generations": len(prompts),
        "agreement_mean": round(float(np.mean(agreements)), 4),
        "agreement_min": round(min(agreements), 4),
        "agreement_max": round(max(agreements), 4),
        "first_mismatch_median": statistics.median(f for f in first if f is not None)
        if any(f is not None for f in first)
        else None,
        "first_mismatch_max": max((f for f in first if f is not None), default=None),
        "caught": sum(f is not None for f in first),
        "accepted_within_tolerance": accepted,
        "mismatches": len(mismatch_gaps),
        "mismatches_excused_as_near_ties": excused,
        "mismatch_gap_median": round(float(np.median(gaps_arr)), 4),
        "mismatch_gap_min": round(float(gaps_arr.min()), 5),
    }


def _embedder(spec: ModelSpec, threads: int) -> Callable[[list[str], int], np.ndarray[Any, Any]]:
    ex = Executor(spec, OnnxRuntimeBackend(spec.path, threads=threads))

    def embed(texts: list[str], batch: int) -> np.ndarray[Any, Any]:
        parts = [ex.run([RunRequest(texts=tuple(texts[i : i + batch]))])[0] for i in range(0, len(texts), batch)]
        return np.concatenate([to_numpy(o.outputs[0]) for o in parts])

    return embed


def bench_embeddings(spec: ModelSpec, n_texts: int) -> dict[str, Any]:
    """Cosines between honest runs (batch, threads) and against cheats."""
    rng = random.Random(18)
    texts = _sentences(n_texts, rng)
    embedders = {t: _embedder(spec, t) for t in (1, 2)}
    reference = embedders[1](texts, 1)
    configs: dict[str, float] = {}
    cosines = []
    for threads in (1, 2):
        for batch in (1, 8, 32):
            cos = cosine_agreement(reference, embedders[threads](texts, batch))  # a repeat run at (1, 1)
            configs[f"batch_{batch}_threads_{threads}"] = float(cos.min())
            cosines.append(cos)
    honest = np.concatenate(cosines)
    worst = 1.0 - float(honest.min())
    shuffled = list(range(n_texts))
    rng.shuffle(shuffled)
    other = cosine_agreement(reference, reference[shuffled])
    other = other[np.array(shuffled) != np.arange(n_texts)]
    noise = np.random.default_rng(18).standard_normal(reference.shape)
    rand = cosine_agreement(reference, noise / np.linalg.norm(noise, axis=1, keepdims=True))
    int8 = cosine_agreement(reference, _variant(spec, "int8")(texts, 8))
    fp16 = cosine_agreement(reference, _variant(spec, "fp16")(texts, 8))
    ten_x = 1.0 - 10 * max(worst, 1e-9)
    ten_x_fp16 = 1.0 - 10 * (1.0 - float(fp16.min()))
    return {
        "texts": n_texts,
        "text_runs_compared": int(honest.size),
        "honest_min_cosine": float(honest.min()),
        "honest_worst_deviation": worst,
        "honest_min_by_config": configs,
        "cheat_other_text_max": float(other.max()),
        "cheat_other_text_median": float(np.median(other)),
        "cheat_random_unit_max": float(rand.max()),
        "cheat_int8_minilm_min": float(int8.min()),
        "cheat_int8_minilm_median": float(np.median(int8)),
        "cheat_int8_minilm_max": float(int8.max()),
        "honest_fp16_min_cosine": float(fp16.min()),
        "tolerance_10x_worst_fp32": ten_x,
        "tolerance_10x_worst_fp16": ten_x_fp16,
        "int8_rows_caught_by_10x_fp16": float(np.mean(int8 < ten_x_fp16)),
        "int8_rows_caught_by_0_999": float(np.mean(int8 < 0.999)),
    }


def _variant(spec: ModelSpec, kind: str) -> Callable[[list[str], int], np.ndarray[Any, Any]]:
    """MiniLM with int8 weights (onnxruntime's dynamic quantization: a cheaper model a cheat
    could run) or in fp16 (keeping fp32 inputs and outputs: the honest variation of a GPU
    worker that runs in half precision)."""
    import onnx

    folder = Path(tempfile.mkdtemp(prefix=f"minilm-{kind}-"))
    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(spec.path), str(folder / "model.onnx"), weight_type=QuantType.QInt8)
    else:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(onnx.load(str(spec.path)), keep_io_types=True)
        onnx.save(half, str(folder / "model.onnx"))
    variant = load_model(folder / "model.onnx", name=f"minilm-{kind}", kind="embedding", tokenizer=spec.tokenizer)
    embed = _embedder(variant, 2)
    shutil.rmtree(folder)  # the session holds the model now
    return embed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.verification")
    ap.add_argument("--quick", action="store_true", help="3 prompts, 2 threads only, 64 texts")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    spec, q4, minilm = ensure_smollm2(), ensure_smollm2_q4(), ensure_minilm()
    tok = Tokenizer.from_file(str(spec.tokenizer))
    chosen = PROMPTS[:3] if args.quick else PROMPTS
    prompts = [
        tok.encode(chatml_prompt([{"role": "user", "content": p}]), add_special_tokens=False).ids for p in chosen
    ]
    started = time.perf_counter()
    _say("generation: honest tokens, checked ...")
    gen = bench_generation(spec, prompts, (2,) if args.quick else (1, 2))
    _say("generation: the 4-bit cheat ...")
    cheat = bench_q4(spec, q4, prompts, 2)
    _say("embeddings ...")
    emb = bench_embeddings(minilm, 64 if args.quick else 340)
    results = {"generation": gen, "q4_cheat": cheat, "embeddings": emb}
    meta = {
        **run_meta(),
        "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 1),
        "tie_gap": TIE_GAP,
    }
    _table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


def _table(results: dict[str, Any]) -> None:
    gen, cheat, emb = results["generation"], results["q4_cheat"], results["embeddings"]
    rows: list[tuple[str, Any, str]] = []
    for key in sorted(k for k in gen if k.startswith("threads_")):
        g = gen[key]
        ratio = g["cost_ratio_median"]
        met = "" if ratio is None else ("met" if ratio <= 0.05 else "MISSED")
        rows += [
            (f"gen 128 tok s, {key}", g["gen_s_median"], ""),
            (f"check s, {key}", g["check_s_median"], ""),
            (f"check/gen cost, {key}", ratio, f"<= 0.05 {met}"),
            (f"check/gen CPU time, {key}", g["cost_ratio_cpu_time_median"], ""),
        ]
    rows += [
        ("honest min agreement", gen["honest_min_agreement"], "== 1.0"),
        ("honest mismatching positions", len(gen["honest_mismatches"]), f"of {gen['positions_checked']}"),
        ("max |margin decode - prefill|", gen["max_margin_deviation_decode_vs_prefill"], ""),
        ("min honest top-2 margin", gen["min_honest_margin"], ""),
        ("q4 agreement (mean)", cheat["agreement_mean"], "detection power"),
        ("q4 generations caught", f"{cheat['caught']}/{cheat['generations']}", ""),
        ("q4 accepted within tie_gap", cheat["accepted_within_tolerance"], "== 0"),
        ("emb honest min cosine", emb["honest_min_cosine"], f"{emb['text_runs_compared']} text-runs"),
        ("emb fp16 (honest GPU-like) min cosine", emb["honest_fp16_min_cosine"], ""),
        ("emb int8 cheat median cosine", emb["cheat_int8_minilm_median"], ""),
        ("emb int8 cheat max cosine", emb["cheat_int8_minilm_max"], ""),
        ("emb other-text max cosine", emb["cheat_other_text_max"], ""),
        ("emb random max cosine", emb["cheat_random_unit_max"], ""),
    ]
    print(f"\n{'metric':36} {'value':>14}  note")
    for name, value, note in rows:
        shown = f"{value:14.6g}" if isinstance(value, float) else f"{value!s:>14}"
        print(f"{name:36} {shown}  {note}")


if __name__ == "__main__":
    sys.exit(main())
