"""The parameters chat and text completions share, and which OpenAI parameters the gateway
accepts, ignores or refuses: a request never has a parameter silently dropped.

Decoding: ``temperature`` (0..2, default **1.0**, as OpenAI: a request without it samples;
0 is greedy), ``top_p`` (0..1; 0 keeps only the most likely token), ``seed`` (any 64-bit
integer: the same seed, model and request give the same text), ``presence_penalty`` and
``frequency_penalty`` (-2..2), ``stop`` (a string or up to 4, of 1..64 characters; the
text is cut before it), ``max_tokens`` (1..2048; default 128 for chat, which also takes
``max_completion_tokens``, and 16 for completions, OpenAI's), ``n`` (1..8 choices, each
its own job; with a seed, choice i uses seed + i), ``logprobs`` (chat: true, with
``top_logprobs`` 0..20; completions: 0..20), ``stream`` and
``stream_options.include_usage``.

Accepted and ignored, because they change nothing a caller receives: ``user``,
``safety_identifier`` and ``prompt_cache_key`` (labels for OpenAI's own abuse and caching
systems), ``metadata`` and ``store`` (the gateway stores nothing, so nothing is there to
tag or to list later), ``service_tier`` (one tier here), ``parallel_tool_calls`` (only
meaningful with ``tools``, which are refused), ``prediction`` (a latency hint; the output
is the same with or without it), ``stream_options.include_obfuscation`` (nothing to pad).

Passed to engines that honour them (:class:`Feature`), else 400 naming the parameter:
``response_format`` other than ``{"type": "text"}``, ``tools``, ``tool_choice``,
``functions``, ``function_call``. Always 400: a non-empty ``logit_bias``, ``modalities``
other than ``["text"]``, ``audio``, ``reasoning_effort``, ``web_search_options``,
``verbosity``, and any parameter OpenAI does not define (``"Unrecognized request argument
supplied"``, as OpenAI answers).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from cocoon_p2p.core.errors import MalformedMessage
from cocoon_p2p.execution.sampling import MAX_SEED, MAX_STOP, MAX_STOP_CHARS, MAX_TOP_LOGPROBS, Sampling

from . import wire
from .wire import APIError, unsupported

MAX_TOKENS_CAP = 2048
MAX_N = 8
MIN_TOP_P = 0.001  # the smallest nucleus the job protocol carries (thousandths): the top token alone
MAX_LOGPROBS = MAX_TOP_LOGPROBS  # OpenAI's limit for chat; its legacy completions allow 5, vLLM more
INT64 = 2**63


class Endpoint(enum.Enum):
    """Which OpenAI endpoint a generation request came through."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"


class Feature(enum.Enum):
    """What only some backends honour (an engine behind a worker does, our ONNX path does not)."""

    RESPONSE_FORMAT = "response_format"  # json_object / json_schema
    TOOLS = "tools"  # tools, tool_choice, functions, function_call


IGNORED = frozenset(
    {"user", "safety_identifier", "prompt_cache_key", "metadata", "store", "service_tier", "parallel_tool_calls",
     "prediction"}
)  # fmt: skip
_COMMON = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "seed", "n", "stop", "presence_penalty", "frequency_penalty",
     "logprobs", "stream", "stream_options", "logit_bias", "user", "cocoon"}
)  # fmt: skip
KNOWN = {
    Endpoint.CHAT: _COMMON
    | IGNORED
    | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice", "functions",
       "function_call", "modalities", "audio", "reasoning_effort", "web_search_options", "verbosity"},
    Endpoint.COMPLETIONS: _COMMON | {"prompt", "suffix", "echo", "best_of"},
}  # fmt: skip
_NEVER = {  # parameters no backend here honours: refused whenever they ask for something
    "audio": "audio output is not supported",
    "reasoning_effort": "the models served here do not reason",
    "web_search_options": "web search is not supported",
    "verbosity": "the models served here have no verbosity setting",
}
COCOON_OPTIONS = frozenset({"require_tee"})


@dataclass(frozen=True)
class EngineOptions:
    """Fields only an engine backend can honour, kept as the client sent them, for the job
    to carry to a worker that fronts such an engine. Empty: nothing beyond plain text."""

    response_format: dict[str, Any] | None = None  # None: {"type": "text"}
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: Any = None
    functions: tuple[dict[str, Any], ...] = ()
    function_call: Any = None

    def needs(self) -> list[tuple[Feature, str]]:
        """Each feature these options need, with the parameter that asked for it."""
        out = []
        if self.response_format is not None:
            out.append((Feature.RESPONSE_FORMAT, "response_format"))
        for param in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, param) not in (None, ()):
                out.append((Feature.TOOLS, param))
        return out


@dataclass(frozen=True, kw_only=True)
class Params:
    """A generation request's parameters. ``sampling`` is choice 0's; :meth:`sampling_for`
    gives each choice's (its own seed when one was given)."""

    max_tokens: int
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    engine: EngineOptions = field(default_factory=EngineOptions)
    require_tee: bool = False

    def sampling_for(self, choice: int) -> Sampling:
        """Choice ``choice``'s sampling: seed + choice when a seed was given."""
        seed = self.sampling.seed
        if seed is None or choice == 0:
            return self.sampling
        return replace(self.sampling, seed=(seed + choice) % (MAX_SEED + 1))


def check_keys(body: dict[str, Any], endpoint: Endpoint) -> None:
    """400 for a parameter OpenAI does not define on ``endpoint``, and for those never honoured."""
    unknown = sorted(set(body) - KNOWN[endpoint])
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    for key, why in _NEVER.items():
        if body.get(key) is not None:
            raise unsupported(key, why)
    if body.get("logit_bias"):
        raise unsupported("logit_bias", "token biases are not supported")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise unsupported("modalities", 'only ["text"] is supported')


def parse_params(body: dict[str, Any], endpoint: Endpoint) -> Params:
    """The decoding, streaming and engine parameters of a chat or completions body."""
    check_keys(body, endpoint)
    if endpoint is Endpoint.CHAT:
        limit = wire.integer(body, "max_completion_tokens", None, 1, MAX_TOKENS_CAP)
        limit = limit or wire.integer(body, "max_tokens", 128, 1, MAX_TOKENS_CAP)
    else:
        limit = wire.integer(body, "max_tokens", 16, 1, MAX_TOKENS_CAP)  # OpenAI's default for completions
    assert limit is not None
    n = wire.integer(body, "n", 1, 1, MAX_N)
    assert n is not None
    seed = wire.integer(body, "seed", None, -INT64, INT64 - 1)
    try:
        sampling = Sampling(
            temperature=wire.number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=max(MIN_TOP_P, wire.number(body, "top_p", 1.0, 0.0, 1.0)),
            seed=None if seed is None else seed % (MAX_SEED + 1),  # negative seeds too, as OpenAI takes them
            presence_penalty=wire.number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=wire.number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            stop=_stop(body.get("stop")),
            logprobs=_logprobs(body, endpoint),
        )
    except MalformedMessage as exc:  # the checks above are the same: kept as a backstop
        raise APIError(400, str(exc)) from exc
    stream = wire.boolean(body, "stream")
    return Params(
        max_tokens=limit,
        sampling=sampling,
        n=n,
        stream=stream,
        include_usage=_include_usage(body.get("stream_options"), stream),
        engine=_engine_options(body) if endpoint is Endpoint.CHAT else EngineOptions(),
        require_tee=require_tee(body),
    )


def _stop(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if value is None:
        return ()
    if stops is None or len(stops) > MAX_STOP or not all(isinstance(s, str) for s in stops):
        raise APIError(400, f"'stop' must be a string or a list of up to {MAX_STOP} strings", param="stop")
    if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"each stop string must have 1 to {MAX_STOP_CHARS} characters", param="stop")
    return tuple(dict.fromkeys(stops))  # a repeated string stops at the same place


def _logprobs(body: dict[str, Any], endpoint: Endpoint) -> int | None:
    if endpoint is Endpoint.COMPLETIONS:  # legacy: an integer, the alternatives per position
        return wire.integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    wanted = wire.boolean(body, "logprobs")
    top = wire.integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not wanted:
        raise APIError(400, "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    return (top or 0) if wanted else None


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    options = wire.obj(options, "stream_options")
    for key in sorted(set(options) - {"include_usage", "include_obfuscation"}):
        raise APIError(
            400, f"Unrecognized request argument supplied: stream_options.{key}", param=f"stream_options.{key}"
        )
    wire.boolean(options, "include_obfuscation")  # checked, then ignored: nothing here is padded
    return wire.boolean(options, "include_usage")


def _engine_options(body: dict[str, Any]) -> EngineOptions:
    fmt = body.get("response_format")
    if fmt is not None:
        kind = wire.obj(fmt, "response_format").get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise APIError(400, "'response_format.type' must be text, json_object or json_schema",
                           param="response_format.type")  # fmt: skip
        fmt = None if kind == "text" else fmt
    lists = {}
    for key in ("tools", "functions"):
        value = body.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(t, dict) for t in value)):
            raise APIError(400, f"'{key}' must be a list of objects", param=key)
        lists[key] = tuple(value or ())
    return EngineOptions(fmt, lists["tools"], body.get("tool_choice"), lists["functions"], body.get("function_call"))


def require_tee(body: dict[str, Any]) -> bool:
    """``cocoon.require_tee`` of a request body (the extension field; see :mod:`.openai`)."""
    options = body.get("cocoon")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise APIError(400, "'cocoon' must be an object", param="cocoon")
    unknown = sorted(set(options) - COCOON_OPTIONS)
    if unknown:
        known = ", ".join(sorted(COCOON_OPTIONS))
        raise APIError(400, f"unknown option 'cocoon.{unknown[0]}' (known: {known})", param=f"cocoon.{unknown[0]}")
    required = options.get("require_tee", False)
    if not isinstance(required, bool):
        raise APIError(400, "'cocoon.require_tee' must be true or false", param="cocoon.require_tee")
    return required
