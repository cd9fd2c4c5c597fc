"""The OpenAI-compatible gateway, driven by the official ``openai`` client, over real peers
and the two real models."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import trio

from cocoon_p2p.api.gateway import Gateway, GatewayModel
from cocoon_p2p.attestation.gate import ClientAttestation
from cocoon_p2p.attestation.keeper import WorkerAttestation
from cocoon_p2p.attestation.policy import parse_policy
from cocoon_p2p.attestation.sources import FileSource
from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.metrics import parse, total
from cocoon_p2p.execution.backends.ort import OnnxRuntimeBackend
from cocoon_p2p.execution.export import ensure_minilm, ensure_smollm2
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import to_numpy
from cocoon_p2p.node import Node

from .netutil import fast_config, wait_for

PRICE = 7


@pytest.fixture(scope="module")
def models() -> tuple[ModelSpec, ModelSpec]:
    return ensure_minilm(), ensure_smollm2()


@asynccontextmanager
async def gateway(models: tuple[ModelSpec, ModelSpec]) -> AsyncIterator[tuple[str, Node, Node]]:
    """A worker serving both models, and a gateway node in front of the network."""
    async with Node(fast_config()) as worker, Node(fast_config(bootstrap=[worker.addrs[0]])) as gw_node:
        for spec in models:
            worker.serve_model(spec, OnnxRuntimeBackend(spec.path, threads=1), price_nanoton=PRICE)
        await wait_for(lambda: all(gw_node.directory.workers_for(m.model_id, now_ms=now_ms()) for m in models))
        offered = [GatewayModel.of(m, name) for m, name in zip(models, ("minilm", "smollm2"), strict=True)]
        gw = Gateway(gw_node, offered, max_price_nanoton=PRICE)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(gw.serve, "127.0.0.1", 0)
            yield f"http://127.0.0.1:{port}", worker, gw_node
            nursery.cancel_scope.cancel()


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=60)


async def in_thread(fn: Any, *args: Any, **kw: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kw))


async def test_models_and_embeddings_with_the_openai_client(models: tuple[ModelSpec, ModelSpec]) -> None:
    minilm, _ = models
    texts = ["The cat sits on the mat.", "Toncoin pays for GPU time."]
    async with gateway(models) as (base, worker, gw_node):
        c = client(base)
        listed = await in_thread(c.models.list)
        # the models it was given, and those the network names (as name:variant)
        assert {m.id: m.workers for m in listed.data} == {  # type: ignore[attr-defined]
            "minilm": 1,
            "smollm2": 1,
            "all-minilm-l6-v2:fp32": 1,
            "smollm2-135m-instruct:fp32": 1,
        }
        emb = await in_thread(c.embeddings.create, model="minilm", input=texts)  # the client asks for base64
        got = np.array([d.embedding for d in emb.data], dtype=np.float32)
        direct = await gw_node.infer(minilm.model_id, texts=tuple(texts), max_price_nanoton=PRICE)
        np.testing.assert_allclose(got, to_numpy(direct.output()), atol=1e-6)
        assert got.shape == (2, 384) and emb.model == "minilm"
        assert emb.usage.prompt_tokens == direct.usage_units > 2  # tokens, not texts
        assert emb.usage.cost_nanoton == direct.usage_units * PRICE  # type: ignore[attr-defined]
        assert emb.usage.worker == worker.peer_id_str  # type: ignore[attr-defined]
        floats = await in_thread(c.embeddings.create, model=minilm.id_hex, input="one", encoding_format="float")
        assert len(floats.data[0].embedding) == 384  # also by model id, as plain floats

        with pytest.raises(openai.NotFoundError):
            await in_thread(c.embeddings.create, model="no-such-model", input="x")
        with pytest.raises(openai.BadRequestError) as err:
            await in_thread(c.embeddings.create, model="smollm2", input="x")
        assert "generation model" in str(err.value)
        with pytest.raises(openai.BadRequestError):
            await in_thread(c.embeddings.create, model="minilm", input=[])

        metrics = parse(await in_thread(lambda: urllib.request.urlopen(f"{base}/metrics").read().decode()))
        assert total(metrics, "cocoon_client_jobs_total", outcome="ok") == 3  # over the model label
        assert total(metrics, "cocoon_client_job_seconds_count") == 3


async def test_chat_whole_and_streamed_with_the_openai_client(models: tuple[ModelSpec, ModelSpec]) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    async with gateway(models) as (base, _worker, _gw):
        c = client(base)
        whole = await in_thread(
            c.chat.completions.create, model="smollm2", messages=messages, max_tokens=12, temperature=0
        )
        text = whole.choices[0].message.content
        assert "Paris" in text and whole.choices[0].finish_reason in ("stop", "length")
        u = whole.usage
        assert 0 < u.completion_tokens <= 12 and u.prompt_tokens > 0
        assert u.cost_nanoton == u.total_tokens * PRICE  # type: ignore[attr-defined]

        def stream() -> tuple[list[str], Any, str | None]:
            pieces, usage, finish = [], None, None
            chunks = c.chat.completions.create(
                model="smollm2",
                messages=messages,
                max_tokens=12,
                temperature=0,  # OpenAI's default is 1.0: sampled
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in chunks:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    pieces.append(choice.delta.content or "")
                    finish = choice.finish_reason or finish
            return pieces, usage, finish

        pieces, usage, finish = await in_thread(stream)
        assert "".join(pieces) == text  # greedy decoding: the same answer, token by token
        assert len([p for p in pieces if p]) > 3 and finish == whole.choices[0].finish_reason
        assert usage is not None and usage.cost_nanoton == u.cost_nanoton


SAMPLES = Path(__file__).resolve().parent / "vectors" / "attestation"  # real quotes: see its README
SAMPLE_MEASUREMENT = "8ef444fda246f7e0d5f9a3ba0a2822ae0be7dbec5e321277d03b73b198fa2545"


@asynccontextmanager
async def tee_gateway(
    specs: tuple[ModelSpec, ...], *, worker_tee: bool, require_tee: bool = False
) -> AsyncIterator[str]:
    """A gateway in front of one MiniLM worker, that serves the real sample TDX evidence when
    ``worker_tee`` (with the two test-only relaxations: no TDX machine can make a quote bound
    to its key here) and claims no TEE otherwise."""
    wcfg = fast_config()
    if worker_tee:
        wcfg.tee = WorkerAttestation(
            source=FileSource(SAMPLES / "tdx_quote"),
            collateral_file=SAMPLES / "tdx_quote_collateral.json",
            insecure_serve_unbound_for_tests=True,
        )
    gcfg = fast_config()
    policy = {"insecure_skip_binding_for_tests": True, "insecure_fixed_time_for_tests": 1750331763}
    gcfg.attestation = ClientAttestation(policy=parse_policy(policy, source="test"), ask_timeout_s=5.0)
    async with Node(wcfg) as worker:
        gcfg.bootstrap = [worker.addrs[0]]
        async with Node(gcfg) as gw_node:
            for spec in specs:
                worker.serve_model(spec, OnnxRuntimeBackend(spec.path, threads=1), price_nanoton=PRICE)
            await wait_for(lambda: all(gw_node.directory.workers_for(m.model_id, now_ms=now_ms()) for m in specs))
            offered = [GatewayModel.of(m, name) for m, name in zip(specs, ("minilm", "smollm2"), strict=False)]
            gw = Gateway(gw_node, offered, max_price_nanoton=PRICE, require_tee=require_tee)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(gw.serve, "127.0.0.1", 0)
                yield f"http://127.0.0.1:{port}"
                nursery.cancel_scope.cancel()


TEE = {"cocoon": {"require_tee": True}}


async def test_a_request_that_requires_a_tee_gets_503_when_no_worker_claims_one(
    models: tuple[ModelSpec, ModelSpec],
) -> None:
    async with tee_gateway(models, worker_tee=False) as base:
        c = client(base)
        plain = await in_thread(c.embeddings.create, model="minilm", input="x")  # not asked: any worker
        assert plain.usage.worker and not hasattr(plain.usage, "attestation")
        with pytest.raises(openai.APIStatusError) as err:
            await in_thread(c.embeddings.create, model="minilm", input="x", extra_body=TEE)
        assert err.value.status_code == 503
        body: Any = err.value.body
        assert body["code"] == "no-attested-workers" and body["type"] == "cocoon_job_error"
        with pytest.raises(openai.BadRequestError) as bad:  # a misspelt option is refused, not ignored
            await in_thread(c.embeddings.create, model="minilm", input="x", extra_body={"cocoon": {"require_te": 1}})
        assert "cocoon.require_te" in str(bad.value)
        messages = [{"role": "user", "content": "Hi"}]
        with pytest.raises(openai.APIStatusError) as streamed:  # a stream fails before its headers
            await in_thread(
                lambda: list(c.chat.completions.create(model="smollm2", messages=messages, stream=True, extra_body=TEE))
            )
        assert streamed.value.status_code == 503 and "no-attested-workers" in str(streamed.value)


async def test_a_gateway_that_requires_a_tee_names_the_attested_image() -> None:
    async with tee_gateway((ensure_minilm(),), worker_tee=True, require_tee=True) as base:
        c = client(base)
        raw = await in_thread(c.embeddings.with_raw_response.create, model="minilm", input="x")
        assert raw.headers["x-cocoon-attested"] == SAMPLE_MEASUREMENT
        usage: Any = raw.parse().usage
        assert usage.attestation == {
            "tee": "tdx",
            "status": "UpToDate",
            "measurement": SAMPLE_MEASUREMENT,
            "image": None,
        }
