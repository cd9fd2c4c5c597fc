"""An OpenAI-compatible HTTP gateway: app developers' requests become overlay jobs.

Runs beside a client :class:`~.node.Node` (with payments, if enabled): each
request goes to a worker the router picks, paid by voucher like any job, and
the answer carries the cost in ``usage``. Serves ``/v1/models``,
``/v1/embeddings``, ``/v1/chat/completions`` (``stream: true`` as server-sent
events), and the node's Prometheus ``/metrics``. Models are named as the
gateway was configured (e.g. ``minilm``, ``smollm2``) or by their hex id.

Confidential jobs: a gateway made with ``require_tee`` runs every request on
workers attested under its node's TEE policy; otherwise a request asks for it
with the body field ``"cocoon": {"require_tee": true}`` (see :mod:`.openai`). No
attested worker: 503, code ``no-attested-workers``. An attested answer names the
worker's image: header ``x-cocoon-attested: <measurement hex>`` (not on streams,
whose headers leave with the first token, before the result names the worker) and
``usage.attestation`` (on streams, in the usage chunk).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID

from cocoon_p2p.core.metrics import CONTENT_TYPE, render
from cocoon_p2p.execution.generation import chatml_prompt
from cocoon_p2p.execution.models import ModelSpec
from cocoon_p2p.execution.tensors import to_numpy
from cocoon_p2p.jobs import InferenceResult, JobFailed
from cocoon_p2p.jobs import frames as jf

from . import openai as api
from .http import Request, Response, serve_http

if TYPE_CHECKING:  # no import cycle at run time
    from cocoon_p2p.node import Node

log = logging.getLogger(__name__)
INLINE_JSON_BYTES = 64 * 1024  # bodies up to this size are parsed on the event loop
ATTESTED_HEADER = "x-cocoon-attested"

# Job failures as HTTP statuses: the network's state, not the caller's fault, is 5xx.
_STATUS = {
    jf.NO_WORKERS: 503,
    jf.NO_ATTESTED_WORKERS: 503,
    jf.BUSY: 503,
    jf.SHUTTING_DOWN: 503,
    jf.PAYMENT: 402,
    jf.PAYMENT_SETUP: 402,
    jf.PRICE: 402,
    jf.BAD_INPUT: 400,
    jf.TOO_LARGE: 400,
    jf.UNKNOWN_MODEL: 404,
    jf.DEADLINE: 504,
}


@dataclass(frozen=True)
class GatewayModel:
    name: str
    model_id: bytes
    kind: str  # "embedding" | "generation"

    @classmethod
    def of(cls, spec: ModelSpec, name: str | None = None) -> GatewayModel:
        """The model ``spec`` as the API names it (``name``, else the spec's own name)."""
        return cls(name or spec.name, spec.model_id, spec.kind)


class Gateway:
    """The HTTP face of a client node. ``max_price_nanoton``: the most paid per unit of work;
    ``require_tee``: every request runs on an attested worker (else only those that ask)."""

    def __init__(
        self,
        node: Node,
        models: Iterable[GatewayModel],
        *,
        max_price_nanoton: int,
        timeout_s: float = 120.0,
        require_tee: bool = False,
    ) -> None:
        self.node = node
        self.models = {m.name: m for m in models}
        self.max_price = max_price_nanoton
        self.timeout_s = timeout_s
        self.require_tee = require_tee

    async def serve(
        self, host: str = "127.0.0.1", port: int = 8080, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the bound port when listening."""
        await serve_http(self.handle, host, port, task_status=task_status)

    async def handle(self, req: Request) -> Response:
        try:
            if req.path == "/metrics" and req.method == "GET":
                return Response(200, render(self.node.metrics()).encode(), CONTENT_TYPE)
            if req.path == "/v1/models" and req.method == "GET":
                return Response.of_json(await self._models())
            if req.path == "/v1/embeddings" and req.method == "POST":
                return await self._embeddings(api.parse_embeddings(await self._json(req)))
            if req.path == "/v1/chat/completions" and req.method == "POST":
                return await self._chat(api.parse_chat(await self._json(req)))
            if req.path in ("/v1/models", "/v1/embeddings", "/v1/chat/completions", "/metrics"):
                raise api.APIError(405, f"{req.method} is not allowed on {req.path}")
            raise api.APIError(404, f"no route {req.path}", code="not_found")
        except api.APIError as exc:
            return Response.of_json(exc.body(), exc.status)

    @staticmethod
    async def _json(req: Request) -> object:
        """The body's JSON: its nesting bounded before parsing (its size by the HTTP layer);
        a large body is parsed in a thread, so it does not stall other requests."""
        if len(req.body) <= INLINE_JSON_BYTES:
            return api.parse_json(req.body)
        return await trio.to_thread.run_sync(api.parse_json, req.body)

    def _model(self, name: str, kind: str) -> GatewayModel:
        model = self.models.get(name) or next((m for m in self.models.values() if m.model_id.hex() == name), None)
        if model is None:
            raise api.APIError(404, f"the model '{name}' does not exist", code="model_not_found", param="model")
        if model.kind != kind:
            raise api.APIError(400, f"'{name}' is a {model.kind} model", param="model")
        return model

    async def _models(self) -> dict[str, object]:
        listed = []
        for m in self.models.values():
            offers = await self.node.find_workers(m.model_id, use_dht=False)
            listed.append(
                {
                    "id": m.name,
                    "cocoon_model_id": m.model_id.hex(),
                    "kind": m.kind,
                    "workers": len(offers),
                    "tee_workers": sum(1 for o in offers if o.tee is not None),  # claims, verified when used
                    "min_price_nanoton": min((o.price_nanoton for o in offers), default=None),
                }
            )
        return api.models_response(listed)

    @staticmethod
    def _failed(exc: JobFailed) -> api.APIError:
        return api.APIError(_STATUS.get(exc.code, 502), str(exc), kind="cocoon_job_error", code=exc.code)

    @staticmethod
    def _usage(
        r: InferenceResult, *, completion: int = 0, attestation: dict[str, Any] | None = None
    ) -> dict[str, object]:
        worker = str(ID(r.worker))
        return api.usage(
            r.usage_units, r.cost_nanoton, r.price_nanoton, worker, completion=completion, attestation=attestation
        )

    async def _attestation(self, r: InferenceResult, required: bool) -> dict[str, Any] | None:
        """What admitted the worker of a TEE job: the verdict that still stands (asked again only
        if it ran out meanwhile)."""
        if not required:
            return None
        verdict = await self.node.check_attestation(r.worker)
        if not verdict.accepted or verdict.measurement is None:
            return None  # it ran out between the choice and now: claim nothing
        return {
            "tee": verdict.tee,
            "status": verdict.status,
            "measurement": verdict.measurement.hex(),
            "image": verdict.image or None,
        }

    @staticmethod
    def _attested_headers(attestation: dict[str, Any] | None) -> list[tuple[str, str]]:
        return [] if attestation is None else [(ATTESTED_HEADER, attestation["measurement"])]

    async def _embeddings(self, req: api.EmbeddingsRequest) -> Response:
        model = self._model(req.model, "embedding")
        tee = self.require_tee or req.require_tee
        try:
            r = await self.node.infer(
                model.model_id,
                texts=req.texts,
                max_price_nanoton=self.max_price,
                timeout_s=self.timeout_s,
                require_tee=tee,
            )
        except JobFailed as exc:
            raise self._failed(exc) from exc
        vectors = to_numpy(r.output())
        att = await self._attestation(r, tee)
        body = api.embeddings_response(model.name, vectors, req.encoding_format, self._usage(r, attestation=att))
        response = Response.of_json(body)
        response.headers += self._attested_headers(att)
        return response

    async def _chat(self, req: api.ChatRequest) -> Response:
        model = self._model(req.model, "generation")
        prompt = chatml_prompt(list(req.messages))
        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        items = self.node.generate(
            model.model_id,
            prompt,
            max_tokens=req.max_tokens,
            max_price_nanoton=self.max_price,
            timeout_s=self.timeout_s,
            require_tee=self.require_tee or req.require_tee,
        )
        if req.stream:
            # Wait for the first token before the headers: a job that fails before it (no
            # worker, none attested...) is still answered with its HTTP status.
            try:
                first = await anext(items, None)
            except JobFailed as exc:
                await items.aclose()
                raise self._failed(exc) from exc
            events = self._events(req, model, first, items, completion_id, created)
            return Response(
                200, content_type="text/event-stream", stream=events, headers=[("cache-control", "no-cache")]
            )
        text: list[str] = []
        result: InferenceResult | None = None
        try:
            async for item in items:
                if isinstance(item, InferenceResult):
                    result = item
                else:
                    text.append(item.text)
        except JobFailed as exc:
            raise self._failed(exc) from exc
        assert result is not None
        n = len(result.token_ids)
        finish = api.finish_reason(n, req.max_tokens)
        att = await self._attestation(result, self.require_tee or req.require_tee)
        usage = self._usage(result, completion=n, attestation=att)
        response = Response.of_json(api.chat_response(completion_id, created, model.name, "".join(text), finish, usage))
        response.headers += self._attested_headers(att)
        return response

    async def _events(
        self,
        req: api.ChatRequest,
        model: GatewayModel,
        first: jf.JobChunk | InferenceResult | None,
        items: AsyncGenerator[jf.JobChunk | InferenceResult, None],
        completion_id: str,
        created: int,
    ) -> AsyncGenerator[bytes, None]:
        async def all_items() -> AsyncGenerator[jf.JobChunk | InferenceResult, None]:
            if first is not None:
                yield first
            async for item in items:
                yield item

        yield api.chat_chunk(completion_id, created, model.name, delta={"role": "assistant", "content": ""})
        try:
            async with aclosing(all_items()) as stream:
                async for item in stream:
                    if isinstance(item, InferenceResult):
                        n = len(item.token_ids)
                        finish = api.finish_reason(n, req.max_tokens)
                        yield api.chat_chunk(completion_id, created, model.name, delta={}, finish=finish)
                        if req.include_usage:
                            att = await self._attestation(item, self.require_tee or req.require_tee)
                            usage = self._usage(item, completion=n, attestation=att)
                            yield api.chat_chunk(completion_id, created, model.name, usage_=usage)
                    elif isinstance(item, jf.JobChunk) and item.text:
                        yield api.chat_chunk(completion_id, created, model.name, delta={"content": item.text})
        except JobFailed as exc:  # headers are sent: the error goes in the stream, as OpenAI does
            yield api.sse_event(self._failed(exc).body())
        finally:
            await items.aclose()
        yield api.SSE_DONE
