"""The report of :mod:`benchmarks.gateway_engine`: summaries, issue 19's goal checks, a
Markdown table and a plot of the latency distributions."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from cocoon_p2p.core.metrics import percentile


def summarize(values: list[float]) -> dict[str, float]:
    """Median, p90 (nearest rank, as every benchmark here reports) and count."""
    if not values:
        return {"n": 0, "p50": float("nan"), "p90": float("nan")}
    return {"n": len(values), "p50": round(statistics.median(values), 3), "p90": round(percentile(values, 90), 3)}


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """Issue 19's checks on the medians: TTFT, tokens/s, and added latency against LiteLLM."""
    chat, emb = results["chat"], results["embeddings"]
    direct, ours, lite = chat["direct"], chat["ours"], chat.get("litellm")
    d_ttft = direct["ttft_ms"]["p50"]
    limit = d_ttft + 5 + 0.1 * d_ttft
    out: dict[str, Any] = {
        "ttft_ms_ours": ours["ttft_ms"]["p50"],
        "ttft_ms_limit": round(limit, 3),
        "ttft_met": ours["ttft_ms"]["p50"] <= limit,
        "tok_s_ratio_ours_vs_direct": round(ours["tok_s"]["p50"] / direct["tok_s"]["p50"], 4),
        "tok_s_met": ours["tok_s"]["p50"] >= 0.95 * direct["tok_s"]["p50"],
        "added_ttft_ms_ours": round(ours["ttft_ms"]["p50"] - d_ttft, 3),
        "added_e2e_ms_ours": round(ours["e2e_ms"]["p50"] - direct["e2e_ms"]["p50"], 3),
        # Per round (the two ran back to back): the machine's drift between rounds cancels out.
        "added_ttft_ms_ours_paired_p50": _paired(ours, direct, "ttft_ms"),
        "same_text_as_direct": all(p["same_text_as_direct"] for p in (ours, lite) if p),
        "embedding_added_ms_ours": round(emb["ours"]["latency_ms"]["p50"] - emb["direct"]["latency_ms"]["p50"], 3),
    }
    if lite:
        out["added_ttft_ms_litellm"] = round(lite["ttft_ms"]["p50"] - d_ttft, 3)
        out["added_e2e_ms_litellm"] = round(lite["e2e_ms"]["p50"] - direct["e2e_ms"]["p50"], 3)
        out["added_ttft_ms_litellm_paired_p50"] = _paired(lite, direct, "ttft_ms")
        out["tok_s_ratio_litellm_vs_direct"] = round(lite["tok_s"]["p50"] / direct["tok_s"]["p50"], 4)
        out["ours_adds_no_more_than_litellm"] = (
            out["added_ttft_ms_ours"] <= out["added_ttft_ms_litellm"]
            and out["added_e2e_ms_ours"] <= out["added_e2e_ms_litellm"]
        )
    return out


def _paired(a: dict[str, Any], b: dict[str, Any], what: str) -> float:
    """The median of round-by-round differences ``a - b`` of a figure."""
    pairs = zip(a["samples"][what], b["samples"][what], strict=True)
    return round(float(statistics.median(x - y for x, y in pairs)), 3)


def write_markdown(meta: dict[str, Any], checks: dict[str, Any], results: dict[str, Any], path: Path) -> str:
    """The tables, as Markdown, to ``path``; returns them."""
    chat, emb = results["chat"], results["embeddings"]
    s = meta["settings"]
    lines = [
        f"# gateway_engine ({meta['when']}, {meta['cpus']} CPUs, load {meta['load_avg_at_start'][0]} -> "
        f"{meta['load_avg_at_end'][0]}{', quick' if meta['quick'] else ''})",
        "",
        f"Chat: SmolLM2-135M-Instruct Q4_1 in llama.cpp (llama-cpp-python, 1 thread), greedy, {chat['tokens']} "
        f"tokens, {s['chat_rounds']} rounds; openai {meta['openai_client']}, LiteLLM {meta['litellm']}.",
        "",
        "| path | TTFT p50 ms | TTFT p90 ms | tokens/s p50 | request p50 ms | request p90 ms | after last token p50 ms "
        "| same text |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("direct", "ours", "litellm"):
        p = chat.get(name)
        if p is None:
            lines.append(f"| {name} | {meta['litellm']} | | | | | | |")
            continue
        t, r, same = p["ttft_ms"], p["e2e_ms"], "yes" if p["same_text_as_direct"] else "NO"
        lines.append(f"| {name} | {t['p50']:.1f} | {t['p90']:.1f} | {p['tok_s']['p50']:.1f} | {r['p50']:.0f} | "
                     f"{r['p90']:.0f} | {p['tail_ms']['p50']:.1f} | {same} |")  # fmt: skip
    ok = {True: "met", False: "MISSED"}
    lines += [
        "",
        f"- TTFT: ours {checks['ttft_ms_ours']:.1f} ms, goal <= direct + 5 ms + 10% = {checks['ttft_ms_limit']:.1f} ms:"
        f" {ok[checks['ttft_met']]}",
        f"- tokens/s: ours {checks['tok_s_ratio_ours_vs_direct']:.3f}x direct, goal >= 0.95x: "
        f"{ok[checks['tok_s_met']]}",
        f"- added to the engine's own TTFT / request (medians): ours {checks['added_ttft_ms_ours']:+.1f} / "
        f"{checks['added_e2e_ms_ours']:+.1f} ms; TTFT round by round {checks['added_ttft_ms_ours_paired_p50']:+.1f} ms",
    ]
    if "added_ttft_ms_litellm" in checks:
        lines.append(
            f"- LiteLLM adds {checks['added_ttft_ms_litellm']:+.1f} / {checks['added_e2e_ms_litellm']:+.1f} ms "
            f"(TTFT round by round {checks['added_ttft_ms_litellm_paired_p50']:+.1f} ms): "
            f"ours adds no more: {ok[checks['ours_adds_no_more_than_litellm']]}"
        )
    o = chat["ours"]
    lines.append(
        f"- ours, mean TTFT {o['client_ttft_ms_mean']:.1f} ms at the client, {o['gateway_ttft_ms_mean']:.1f} ms "
        "by the gateway's clock (from the request read to the first token out: network, worker, engine)"
    )
    e_d, e_o = emb["direct"]["latency_ms"], emb["ours"]["latency_ms"]
    lines += [
        "",
        f"Embeddings: MiniLM, one sentence, {s['emb_rounds']} rounds.",
        "",
        "| path | p50 ms | p90 ms |",
        "|---|---|---|",
        f"| direct onnxruntime (Executor, in process) | {e_d['p50']:.2f} | {e_d['p90']:.2f} |",
        f"| ours (openai client + gateway + network + worker) | {e_o['p50']:.2f} | {e_o['p90']:.2f} |",
        "",
        f"Ours, mean: {emb['ours']['client_request_ms_mean']:.2f} ms at the client, "
        f"{emb['ours']['gateway_request_ms_mean']:.2f} ms by the gateway's clock.",
        "",
        f"Load average (1 min) during chat: {chat['load_1min']}; embeddings: {emb['load_1min']}.",
        "",
    ]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def write_plot(results: dict[str, Any], path: Path) -> Path | None:
    """TTFT per chat path and embedding latency per path, as box plots; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    chat, emb = results["chat"], results["embeddings"]
    names = [n for n in ("direct", "ours", "litellm") if chat.get(n)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.boxplot([chat[n]["samples"]["ttft_ms"] for n in names], showfliers=True)
    a.set_xticks(range(1, len(names) + 1), names)
    a.set_ylabel("time to first token (ms)")
    a.set_title(f"chat, SmolLM2 Q4 in llama.cpp ({chat['tokens']} tokens)")
    b.boxplot([emb[n]["samples"]["latency_ms"] for n in ("direct", "ours")], showfliers=True)
    b.set_xticks([1, 2], ["direct onnxruntime", "ours (gateway)"])
    b.set_ylabel("request latency (ms)")
    b.set_title("embeddings, MiniLM, one sentence")
    for ax in (a, b):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
