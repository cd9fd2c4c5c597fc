"""A chat request as an engine takes it, and the tool calls an engine answers with.

A worker that fronts an OpenAI-compatible engine can do more than continue a prompt:
given the chat's messages it applies its model's own chat template, constrains the
answer to JSON (``response_format``) and calls tools (``tools``/``tool_choice``).
:class:`ChatOptions` carries those fields in a generation job, as canonical JSON
(sorted keys, no spaces: the same bytes for the same request, which the job's receipt
digests); a backend that cannot honour them (our ONNX path) refuses the job rather than
ignoring them. :class:`ToolCall` is one call the engine's model made. Pure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cocoon_p2p.core.errors import LocalProtocolError, MalformedMessage
from cocoon_p2p.core.wire import expect_list, expect_str

MAX_OPTIONS_BYTES = 256 * 1024  # a chat's messages and tool definitions, as JSON
MAX_MESSAGES = 256
MAX_TOOLS = 128
MAX_TOOL_CALLS = 16
MAX_CALL_ID = 64
MAX_CALL_NAME = 64
MAX_ARGUMENTS = 32 * 1024  # characters of one call's JSON arguments
_KEYS = frozenset({"messages", "response_format", "tools", "tool_choice"})
BAD_OPTIONS = "bad-input"  # the job error code malformed options get (jobs.frames.BAD_INPUT)
TOO_LARGE = "too-large"  # and options too large to send (jobs.frames.TOO_LARGE)


@dataclass(frozen=True)
class ChatOptions:
    """The messages of a chat (OpenAI's shape) and the fields only an engine honours."""

    messages: tuple[dict[str, Any], ...]
    response_format: dict[str, Any] | None = None
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: Any = None

    def fields(self) -> dict[str, Any]:
        """The fields of an engine's ``/v1/chat/completions`` request these options fill."""
        out: dict[str, Any] = {"messages": list(self.messages)}
        if self.response_format is not None:
            out["response_format"] = self.response_format
        if self.tools:
            out["tools"] = list(self.tools)
        if self.tool_choice is not None:
            out["tool_choice"] = self.tool_choice
        return out

    def to_wire(self) -> bytes:
        """Canonical JSON: what a job carries (LocalProtocolError ``too-large`` above
        ``MAX_OPTIONS_BYTES``: the job is not sent, and its stream stays usable)."""
        data = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(data) > MAX_OPTIONS_BYTES:
            raise LocalProtocolError(f"chat options of {len(data)} bytes: at most {MAX_OPTIONS_BYTES}", code=TOO_LARGE)
        return data

    @classmethod
    def from_wire(cls, data: Any) -> ChatOptions:
        """Options from a job's bytes; MalformedMessage for anything that is not such JSON."""
        if not isinstance(data, bytes) or len(data) > MAX_OPTIONS_BYTES:
            raise MalformedMessage(f"chat options: at most {MAX_OPTIONS_BYTES} bytes of JSON", code=BAD_OPTIONS)
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise MalformedMessage("chat options: not JSON", code=BAD_OPTIONS) from exc
        if not isinstance(obj, dict) or not set(obj) <= _KEYS:
            raise MalformedMessage(f"chat options: a JSON object of {sorted(_KEYS)}", code=BAD_OPTIONS)
        messages, tools = obj.get("messages"), obj.get("tools", [])
        if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
            raise MalformedMessage(f"chat options: 1 to {MAX_MESSAGES} messages", code=BAD_OPTIONS)
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise MalformedMessage(f"chat options: at most {MAX_TOOLS} tools", code=BAD_OPTIONS)
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise MalformedMessage("chat options: each message an object with a role", code=BAD_OPTIONS)
        if not all(isinstance(t, dict) for t in tools):
            raise MalformedMessage("chat options: each tool an object", code=BAD_OPTIONS)
        response_format = obj.get("response_format")
        if response_format is not None and not isinstance(response_format, dict):
            raise MalformedMessage("chat options: response_format must be an object", code=BAD_OPTIONS)
        return cls(tuple(messages), response_format, tuple(tools), obj.get("tool_choice"))


@dataclass(frozen=True)
class ToolCall:
    """One function call an engine's model made: its id, the function's name and its
    arguments (a JSON text, as the model wrote it: a client parses it)."""

    id: str
    name: str
    arguments: str

    def to_wire(self) -> list[str]:
        return [self.id, self.name, self.arguments]

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        """OpenAI's ``tool_calls`` entry (with ``index`` in a stream's delta)."""
        call: dict[str, Any] = {"id": self.id, "type": "function"}
        call["function"] = {"name": self.name, "arguments": self.arguments}
        return call if index is None else {"index": index, **call}

    @classmethod
    def from_wire(cls, obj: Any) -> ToolCall:
        call_id, name, arguments = expect_list(obj, 3, "tool call")
        return cls(
            expect_str(call_id, "tool call id", max_len=MAX_CALL_ID),
            expect_str(name, "tool name", min_len=1, max_len=MAX_CALL_NAME),
            expect_str(arguments, "tool arguments", max_len=MAX_ARGUMENTS),
        )


def tool_calls_from_wire(obj: Any) -> tuple[ToolCall, ...]:
    """A result's tool calls (at most ``MAX_TOOL_CALLS``)."""
    if not isinstance(obj, list) or len(obj) > MAX_TOOL_CALLS:
        raise MalformedMessage(f"tool calls: a list of at most {MAX_TOOL_CALLS}")
    return tuple(ToolCall.from_wire(c) for c in obj)
