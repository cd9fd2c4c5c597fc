"""``POST /v1/chat/completions``, sans-IO: messages in, ChatML prompt out, and the response
and stream-chunk shapes (with ``logprobs.content``).

Messages: roles ``system``, ``developer`` (treated as system, as OpenAI does for models
without a developer role), ``user``, ``assistant``, ``tool`` (after an assistant message
with ``tool_calls``, as OpenAI requires) and the legacy ``function``. ``content`` is a
string or a list of parts; text parts are joined with newlines (as vLLM joins them), and
any other part (image, audio, file) is refused with 400 naming it. An assistant message's
``tool_calls`` are rendered as JSON lines after its text: SmolLM2's ChatML template knows no
tools, so each role is one ``<|im_start|>role`` block. ``name`` and ``tool_call_id`` are
accepted and not rendered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.execution.chat_options import ChatOptions, ToolCall
from cocoon_p2p.execution.generation import chatml_prompt
from cocoon_p2p.execution.sampling import TokenLogprob

from . import wire
from .params import Endpoint, Params, parse_params
from .wire import APIError

MAX_MESSAGES = 256
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
_RENDERED_AS = {"developer": "system"}
_MESSAGE_KEYS = {
    "system": {"content", "name"},
    "developer": {"content", "name"},
    "user": {"content", "name"},
    "assistant": {"content", "name", "tool_calls", "function_call", "refusal", "audio"},
    "tool": {"content", "tool_call_id"},
    "function": {"content", "name"},
}


@dataclass(frozen=True)
class Message:
    """One message as the chat template renders it."""

    role: str
    content: str


@dataclass(frozen=True)
class ChatRequest:
    """A parsed chat completion request."""

    model: str
    messages: tuple[Message, ...]
    params: Params
    engine_messages: tuple[dict[str, Any], ...] = ()  # as an engine takes them (see :meth:`options`)

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def stream(self) -> bool:
        return self.params.stream

    @property
    def include_usage(self) -> bool:
        return self.params.include_usage

    def prompt(self) -> str:
        """The model input: SmolLM2's ChatML, ready for the assistant's reply."""
        return chatml_prompt([{"role": m.role, "content": m.content} for m in self.messages])

    def options(self) -> ChatOptions:
        """The chat as an engine takes it: its messages (the engine applies its model's own
        template) with the fields only an engine honours (response_format, tools; legacy
        functions as tools)."""
        e = self.params.engine
        tools = e.tools or tuple({"type": "function", "function": f} for f in e.functions)
        choice = e.tool_choice
        if choice is None and e.function_call is not None:
            call = e.function_call
            choice = {"type": "function", "function": call} if isinstance(call, dict) else call
        return ChatOptions(self.engine_messages, e.response_format, tools, choice)


def parse_chat(body: Any) -> ChatRequest:
    """Check a chat completion body strictly (APIError 400 naming the field)."""
    b = wire.obj(body)
    params = parse_params(b, Endpoint.CHAT)
    messages = b.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise APIError(400, f"'messages' must be a list of 1 to {MAX_MESSAGES} messages", param="messages")
    parsed: list[Message] = []
    for i, m in enumerate(messages):
        parsed.append(_message(m, f"messages[{i}]", parsed[-1] if parsed else None, messages[i - 1] if i else None))
    return ChatRequest(wire.model_name(b), tuple(parsed), params, tuple(_engine_message(m) for m in messages))


def _engine_message(m: dict[str, Any]) -> dict[str, Any]:
    """A checked message as an engine takes it: text content joined, ``developer`` as
    ``system`` (not every engine knows it), the calls and ids a tool exchange needs."""
    role = _RENDERED_AS.get(m["role"], m["role"])
    content = m.get("content")
    if isinstance(content, list):
        content = "\n".join(str(part.get(part.get("type"), "")) for part in content)
    out: dict[str, Any] = {"role": role, "content": content}
    for key in ("name", "tool_calls", "tool_call_id", "function_call"):
        if m.get(key) is not None:
            out[key] = m[key]
    return out


def _message(m: Any, where: str, previous: Message | None, raw_previous: Any) -> Message:
    m = wire.obj(m, where)
    role = m.get("role")
    if role not in ROLES:
        raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)}", param=f"{where}.role")
    for key in sorted(set(m) - _MESSAGE_KEYS[role] - {"role"}):
        raise APIError(400, f"'{where}' has an unknown field '{key}'", param=f"{where}.{key}")
    if m.get("audio") is not None:
        raise wire.unsupported(f"{where}.audio", "audio is not supported")
    if role == "tool" and not (
        previous is not None and (previous.role == "tool" or _has_tool_calls(raw_previous))
    ):  # OpenAI's rule: a tool's answer follows the assistant's call
        raise APIError(400, f"a 'tool' message must follow an assistant message with 'tool_calls' ({where})",
                       param=f"{where}.role")  # fmt: skip
    content = _content(m.get("content"), where, optional=role == "assistant")
    if role == "assistant":
        content = "\n".join(part for part in (content, *_calls(m, where)) if part)
    return Message(_RENDERED_AS.get(role, role), content)


def _has_tool_calls(raw: Any) -> bool:
    return isinstance(raw, dict) and raw.get("role") == "assistant" and bool(raw.get("tool_calls"))


def _content(value: Any, where: str, *, optional: bool) -> str:
    if value is None and optional:  # an assistant turn that only called tools
        return ""
    if isinstance(value, str):
        return wire.text(value, f"{where}.content")
    if not isinstance(value, list):
        raise APIError(400, f"'{where}.content' must be a string or a list of content parts", param=f"{where}.content")
    texts = []
    for j, part in enumerate(value):
        at = f"{where}.content[{j}]"
        kind = wire.obj(part, at).get("type")
        if kind in ("text", "refusal"):
            texts.append(wire.text(part.get(kind), f"{at}.{kind}"))
        elif kind in ("image_url", "input_audio", "file", "input_image"):
            raise wire.unsupported(at, f"'{kind}' content parts are not supported by this model (text only)")
        else:
            raise APIError(400, f"'{at}.type' must be 'text'", param=f"{at}.type")
    return wire.text("\n".join(texts), f"{where}.content")


def _calls(m: dict[str, Any], where: str) -> list[str]:
    """An assistant message's tool (or legacy function) calls, one JSON line each."""
    calls = m.get("tool_calls") or []
    if m.get("function_call") is not None:
        calls = [*calls, {"type": "function", "function": m["function_call"]}]
    if not isinstance(calls, list):
        raise APIError(400, f"'{where}.tool_calls' must be a list", param=f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        fn = wire.obj(call, f"{where}.tool_calls[{j}]").get("function")
        fn = wire.obj(fn, f"{where}.tool_calls[{j}].function")
        name = wire.text(fn.get("name"), f"{where}.tool_calls[{j}].function.name")
        arguments = wire.text(fn.get("arguments", ""), f"{where}.tool_calls[{j}].function.arguments")
        out.append(json.dumps({"name": name, "arguments": arguments}))
    return out


# ---- responses ----------------------------------------------------------------------------------


def _token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": wire.finite_logprob(logprob), "bytes": list(token.encode("utf-8"))}


def logprobs_content(logprobs: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[i].logprobs`` of a chat completion: one entry per generated token."""
    content = [{**_token(lp.token, lp.logprob), "top_logprobs": [_token(t, v) for t, v in lp.top]} for lp in logprobs]
    return {"content": content, "refusal": None}


@dataclass(frozen=True)
class Choice:
    """One finished choice: its text, finish reason and (when asked) logprobs."""

    index: int
    text: str
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()


def chat_response(
    completion_id: str,
    created: int,
    model: str,
    choices: Sequence[Choice],
    usage: dict[str, Any],
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """A whole chat completion."""
    return {
        **wire.envelope("chat.completion", completion_id, created, model, fingerprint),
        "choices": [
            {
                "index": c.index,
                "message": _message_out(c),
                "logprobs": None if c.logprobs is None else logprobs_content(c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage,
    }


def _message_out(c: Choice) -> dict[str, Any]:
    """The assistant's message: its text, or (calls made, no text) null content and the calls."""
    message: dict[str, Any] = {"role": "assistant", "content": c.text or None, "refusal": None}
    if c.tool_calls:
        message["tool_calls"] = [call.as_openai() for call in c.tool_calls]
    else:
        message["content"] = c.text
    return message


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    *,
    index: int = 0,
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    logprobs: Sequence[TokenLogprob] | None = None,
    usage: dict[str, Any] | None = None,
    with_usage: bool = False,
    fingerprint: str | None = None,
) -> bytes:
    """One server-sent event of a streamed chat completion: choice ``index``'s ``delta``,
    or (``delta`` None) the usage-only chunk with no choices. ``with_usage``: the stream
    asked for usage, so every chunk carries ``"usage": null`` until the last, as OpenAI's."""
    chunk = wire.envelope("chat.completion.chunk", completion_id, created, model, fingerprint)
    if delta is None:
        chunk["choices"] = []
    else:
        lp = None if logprobs is None else logprobs_content(logprobs)
        chunk["choices"] = [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]
    if usage is not None or with_usage:
        chunk["usage"] = usage
    return wire.sse_event(chunk)
