"""The gateway-vs-engine benchmark's smallest run (``python -m benchmarks.gateway_engine --quick``),
end to end: llama.cpp's OpenAI server, a worker fronting it, a MiniLM worker and the gateway,
each a process of its own. Its figures must hold together, and the answer streamed through
gateway, network and worker must be the engine's own, token for token.

LiteLLM's path joins only when ``$COCOON_LITELLM`` names an install (its proxy alone takes
~20-40 s to start here); otherwise the run skips it, as it does wherever it is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import llama_cpp  # noqa: F401  # the engine's package: CI installs the [engine] extra
except ImportError:
    pytest.skip("llama-cpp-python[server] is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_quick_gateway_engine_benchmark_runs_and_its_figures_hold_together(tmp_path: Path) -> None:
    out = tmp_path / "gateway_engine.json"
    with_litellm = bool(os.environ.get("COCOON_LITELLM"))
    cmd = [sys.executable, "-m", "benchmarks.gateway_engine", "--quick", "--out", str(out)]
    run = subprocess.run(
        cmd if with_litellm else [*cmd, "--no-litellm"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    doc = json.loads(out.read_text())
    res, goals, meta = doc["results"], doc["goals"], doc["meta"]
    chat, emb = res["chat"], res["embeddings"]
    rounds = meta["settings"]["chat_rounds"]
    assert chat["tokens"] == meta["settings"]["max_tokens"]  # greedy, and the story runs past 16 tokens
    for name in ("direct", "ours", "litellm") if with_litellm else ("direct", "ours"):
        p = chat[name]
        assert p["ttft_ms"]["n"] == p["e2e_ms"]["n"] == rounds
        assert 0 < p["ttft_ms"]["p50"] <= p["ttft_ms"]["p90"]
        assert p["ttft_ms"]["p50"] < p["e2e_ms"]["p50"]  # the first token came before the end
        assert p["tok_s"]["p50"] > 0
        assert p["same_text_as_direct"], name  # the engine's own answer, through every path
    if not with_litellm:
        assert chat["litellm"] is None and "skipped" in out.with_suffix(".md").read_text()
    assert goals["same_text_as_direct"]
    assert goals["ttft_ms_limit"] == pytest.approx(chat["direct"]["ttft_ms"]["p50"] * 1.1 + 5, abs=1e-3)
    for name in ("direct", "ours"):
        lat = emb[name]["latency_ms"]
        assert lat["n"] == meta["settings"]["emb_rounds"] and 0 < lat["p50"] <= lat["p90"]
    assert len(meta["load_avg_at_start"]) == 3
    assert "| ours |" in out.with_suffix(".md").read_text()
