"""An OpenAI-compatible HTTP gateway: app developers' requests become overlay jobs.

Runs beside a client :class:`~.node.Node` (with payments, if enabled): each
request goes to a worker the router picks, paid by voucher like any job, and
the answer carries the cost in ``usage``. Serves ``POST /v1/chat/completions`` and
``POST /v1/completions`` (whole, or ``stream: true`` as server-sent events; parameters in
:mod:`.params`), ``POST /v1/embeddings``, ``GET /v1/models`` (and ``/v1/models/{id}``),
``GET /health`` (status, peers, workers per model) and ``GET /metrics`` (the node's
Prometheus metrics and the gateway's own, :mod:`.metrics`). A request names a model as
workers announce it (``smollm2-135m-instruct``, ``...:q4``, ``...@<id prefix>``: resolved on
the network, so the gateway needs no copy of any model), by an alias it was configured
with (``minilm``, ``smollm2``), or by its hex id.

API keys (:mod:`.keys`): with keys, every route but ``/health`` needs
``Authorization: Bearer <key>`` (401 in OpenAI's shape otherwise), ``/metrics`` too.
:meth:`Gateway.serve` refuses a non-loopback address without keys, unless told
``insecure_no_auth``.

Confidential jobs: a gateway made with ``require_tee`` runs every request on
workers attested under its node's TEE policy; otherwise a request asks for it
with the body field ``"cocoon": {"require_tee": true}`` (see :mod:`.openai`). No
attested worker: 503, code ``no-attested-workers``. An attested answer names the
worker's image: header ``x-cocoon-attested: <measurement hex>`` (not on streams,
whose headers leave with the first token, before the result names the worker) and
``usage.attestation`` (on streams, in the usage chunk).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from cocoon_p2p.core.clock import now_ms
from cocoon_p2p.core.errors import LocalProtocolError
from cocoon_p2p.core.metrics import Metric
from cocoon_p2p.execution.tensors import to_numpy
from cocoon_p2p.jobs import JobFailed
from cocoon_p2p.overlay.catalog import parse_ref

from . import openai as api
from . import results
from .chat import ChatRequest
from .choices import Generation, Terms
from .http import Request, Response, serve_http
from .keys import ApiKeys, check_exposure, is_loopback
from .metrics import GatewayStats, route_of
from .models import GatewayModel, check_kind, find_model, from_catalog, not_found
from .params import Endpoint
from .prometheus import CONTENT_TYPE, exposition, node_registry

if TYPE_CHECKING:  # no import cycle at run time
    from cocoon_p2p.node import Node

__all__ = ["ATTESTED_HEADER", "Gateway", "GatewayModel"]

log = logging.getLogger(__name__)
INLINE_JSON_BYTES = 64 * 1024  # bodies up to this size are parsed on the event loop
RESOLVED_S = 1.0  # how long a name's resolution on the network is reused (workers come and go slower)
MAX_RESOLVED = 1024
ATTESTED_HEADER = results.ATTESTED_HEADER
EMBEDDINGS = "/v1/embeddings"
_POST = {"/v1/chat/completions", "/v1/completions", EMBEDDINGS}
_GET = {"/v1/models", "/health", "/metrics"}


class Gateway:
    """The HTTP face of a client node. ``max_price_nanoton``: the most paid per unit of work;
    ``require_tee``: every request runs on an attested worker (else only those that ask);
    ``api_keys``: who may use it (None or empty: anyone who can reach it, which
    :meth:`serve` allows on loopback only, or with ``insecure_no_auth``)."""

    def __init__(
        self,
        node: Node,
        models: Iterable[GatewayModel],
        *,
        max_price_nanoton: int,
        timeout_s: float = 120.0,
        require_tee: bool = False,
        api_keys: ApiKeys | None = None,
        insecure_no_auth: bool = False,
        aliases: Mapping[str, str] | None = None,
    ) -> None:
        self.node = node
        self.models = {m.name: m for m in models}
        self.aliases = dict(aliases or {})  # a name clients use -> the catalog reference it stands for
        self.max_price = max_price_nanoton
        self.timeout_s = timeout_s
        self.require_tee = require_tee
        self.api_keys = api_keys or ApiKeys(())
        self.insecure_no_auth = insecure_no_auth
        self.stats = GatewayStats()
        self._registry = node_registry(self.metrics)  # read at each scrape, with process metrics and build info
        self._resolved: dict[tuple[str, str], tuple[float, GatewayModel]] = {}  # (name, kind) -> (until, model)

    async def serve(
        self, host: str = "127.0.0.1", port: int = 8080, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the bound port when listening. ConfigError, before
        listening, for a non-loopback ``host`` without API keys (unless ``insecure_no_auth``)."""
        check_exposure(host, self.api_keys, insecure_no_auth=self.insecure_no_auth)
        if not self.api_keys and not is_loopback(host):
            log.warning("INSECURE: the gateway listens on %s WITHOUT API keys: anyone who reaches it spends "
                        "this node's money", host)  # fmt: skip
        await serve_http(self.handle, host, port, task_status=task_status)

    def metrics(self) -> list[Metric]:
        """The node's metrics and the gateway's requests'."""
        return self.node.metrics() + self.stats.metrics()

    async def handle(self, req: Request) -> Response:
        """Answer one request (errors in OpenAI's shape); counted in the request metrics."""
        started = time.perf_counter()
        route = route_of(req.path)
        try:
            response = await self._route(req, started)
        except api.APIError as exc:
            response = Response.of_json(exc.body(), exc.status)
            if exc.status == 401:
                response.headers.append(("www-authenticate", "Bearer"))
        if response.writer is None:  # a stream counts itself when its head goes out
            self.stats.answered(route, response.status)
            self.stats.took(route, time.perf_counter() - started)
        return response

    async def _route(self, req: Request, started: float) -> Response:
        if req.path == "/health" and req.method == "GET":
            return Response.of_json(await self._health())
        if self.api_keys and not self.api_keys.check(req.headers.get("authorization")):
            raise api.APIError(401, _NO_KEY if "authorization" not in req.headers else _BAD_KEY,
                               code="invalid_api_key")  # fmt: skip
        if req.method == "GET":
            if req.path == "/metrics":
                return Response(200, exposition(self._registry), CONTENT_TYPE)
            if req.path == "/v1/models":
                return Response.of_json(await self._models())
            if req.path.startswith("/v1/models/"):
                return Response.of_json(await self._model_entry(req.path.removeprefix("/v1/models/")))
        if req.method == "POST":
            if req.path == EMBEDDINGS:
                return await self._embeddings(api.parse_embeddings(await self._json(req)))
            if req.path == "/v1/chat/completions":
                chat = api.parse_chat(await self._json(req))
                return await self._generate(
                    Endpoint.CHAT, chat.model, (chat.prompt(),), chat.params, started, chat=chat
                )
            if req.path == "/v1/completions":
                text = api.parse_completion(await self._json(req))
                return await self._generate(Endpoint.COMPLETIONS, text.model, text.prompts, text.params, started)
        if req.path in _POST | _GET:
            raise api.APIError(405, f"{req.method} is not allowed on {req.path}")
        raise api.APIError(404, f"no route {req.path}", code="not_found")

    @staticmethod
    async def _json(req: Request) -> object:
        """The body's JSON: its nesting bounded before parsing (its size by the HTTP layer);
        a large body is parsed in a thread, so it does not stall other requests."""
        if len(req.body) <= INLINE_JSON_BYTES:
            return api.parse_json(req.body)
        return await trio.to_thread.run_sync(api.parse_json, req.body)

    def _find(self, name: str, kind: str) -> GatewayModel:
        """The model a request names: one the gateway was given, else the best-served match
        among those workers announce (an alias first turned into its catalog reference),
        remembered for RESOLVED_S (building the catalog costs ~0.4 ms a request)."""
        try:
            return find_model(self.models.values(), name, kind)
        except api.APIError as exc:
            if exc.status != 404:
                raise
        now = time.monotonic()
        hit = self._resolved.get((name, kind))
        if hit is not None and now < hit[0]:
            return hit[1]
        model = self._resolve(name, kind)
        if len(self._resolved) >= MAX_RESOLVED:  # names come from clients: keep it bounded
            self._resolved.clear()
        self._resolved[(name, kind)] = (now + RESOLVED_S, model)
        return model

    def _resolve(self, name: str, kind: str) -> GatewayModel:
        """``name`` looked up in what workers announce now (404 when nothing matches)."""
        try:
            ref = parse_ref(self.aliases.get(name, name))
        except LocalProtocolError:
            raise not_found(name) from None
        rows = {r.model_id: r for r in self.node.catalog() if ref.matches(r.model_id, r.entry)}
        ids = self.node.directory.resolve(ref, now_ms())
        if not rows or not ids:
            raise not_found(name)
        return check_kind(from_catalog(name, rows[ids[0]]), name, kind)

    def _listed(self) -> list[GatewayModel]:
        """What ``/v1/models`` lists: the models given, the aliases that resolve, and every
        named model workers announce (as ``name:variant``)."""
        listed = dict(self.models)
        for alias in self.aliases:
            for kind in ("generation", "embedding"):
                with contextlib.suppress(api.APIError):
                    listed.setdefault(alias, self._find(alias, kind))
        for row in self.node.catalog():
            listed.setdefault(str(row.entry), from_catalog(str(row.entry), row))
        return list(listed.values())

    async def _health(self) -> dict[str, Any]:
        workers = {m.name: len(await self.node.find_workers(m.model_id, use_dht=False)) for m in self._listed()}
        return {
            "status": "ok" if all(workers.values()) else "degraded",  # degraded: a model has no worker now
            "peers": len(self.node.connected_peers()),
            "workers_known": len(self.node.directory.known_peers(now_ms())),
            "models": workers,
        }

    async def _entry(self, m: GatewayModel) -> dict[str, Any]:
        offers = await self.node.find_workers(m.model_id, use_dht=False)
        return {
            "id": m.name,
            "cocoon_model_id": m.model_id.hex(),
            "kind": m.kind,
            "workers": len(offers),
            "tee_workers": sum(1 for o in offers if o.tee is not None),  # claims, verified when used
            "min_price_nanoton": min((o.price_nanoton for o in offers), default=None),
            "min_completion_price_nanoton": min((o.price.completion for o in offers), default=None),
            "billed_unit": m.unit,
        }

    async def _models(self) -> dict[str, Any]:
        return api.models_response([await self._entry(m) for m in self._listed()])

    async def _model_entry(self, name: str) -> dict[str, Any]:
        model = next((m for m in self._listed() if name in (m.name, m.model_id.hex())), None)
        if model is None:
            for kind in ("generation", "embedding"):
                with contextlib.suppress(api.APIError):
                    model = self._find(name, kind)
        if model is None:
            raise not_found(name)
        return api.model_object(await self._entry(model))

    async def _embeddings(self, req: api.EmbeddingsRequest) -> Response:
        model = self._find(req.model, "embedding")
        tee = self.require_tee or req.require_tee
        sent = time.perf_counter()
        try:
            r = await self.node.infer(
                model.model_id,
                texts=req.texts,
                max_price_nanoton=self.max_price,
                timeout_s=self.timeout_s,
                require_tee=tee,
            )
        except JobFailed as exc:
            raise results.failed(exc) from exc
        self.stats.job_took(EMBEDDINGS, time.perf_counter() - sent)
        vectors = to_numpy(r.output())
        att = await results.attestation(self.node, r, tee)
        # prompt_tokens are the units billed: tokens once the model's workers bill per token
        # (``billed_unit`` says which; texts while they bill per item).
        usage = results.usage_of(model, [r], attestation=att)
        response = Response.of_json(api.embeddings_response(model.name, vectors, req.encoding_format, usage))
        response.headers += results.attested_headers(att)
        return response

    async def _generate(
        self,
        endpoint: Endpoint,
        name: str,
        prompts: tuple[str, ...],
        params: api.Params,
        started: float,
        *,
        chat: ChatRequest | None = None,
    ) -> Response:
        """Run a chat or completions request. A chat for a model an engine serves carries
        its messages (and response_format, tools) to the engine, which applies its model's
        own chat template; the ChatML prompt then only bounds the bill."""
        model = self._find(name, "generation")
        options = chat.options() if chat is not None and model.features else None
        terms = Terms(
            max_price_nanoton=self.max_price,
            timeout_s=self.timeout_s,
            require_tee=self.require_tee or params.require_tee,
        )
        generation = Generation(
            self.node, endpoint, model, prompts, params, terms=terms, stats=self.stats, started_at=started,
            chat_options=options,
        )  # fmt: skip
        if params.stream:
            return Response(writer=generation.stream)
        return await generation.whole()


_NO_KEY = "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
_BAD_KEY = "Incorrect API key provided."
