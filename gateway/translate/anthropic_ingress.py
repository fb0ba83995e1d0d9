"""An Anthropic client (`POST /v1/messages`) in front of an OpenAI-compatible deployment.

Messages request → chat request (`chat_request`), chat completion → Message (`message`),
chat chunks → Messages SSE events (`EventTranslator`). Pure: no I/O.
The choices where the APIs differ are in docs/PROVIDERS.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.translate.anthropic_common import (
    STOP_REASONS,
    TranslationError,
    anthropic_error,
    anthropic_error_from_openai,
    anthropic_usage,
    dump_arguments,
    parse_arguments,
    sse_event,
)

TOOL_ERROR_PREFIX = "Error: "  # how a tool_result's is_error reads to an OpenAI model
JSON_FORMAT_NAME = "response"  # response_format.json_schema.name for output_config.format

Event = tuple[str, dict[str, Any]]


# --- Messages request → chat request -----------------------------------------------------


def chat_request(body: Mapping[str, Any], *, cap_field: str = "max_tokens") -> dict[str, Any]:
    """A Messages request → a chat completion request. `cap_field`: the output-cap field
    the deployment takes (max_completion_tokens for OpenAI's reasoning models).
    A stream asks for usage (stream_options.include_usage): message_delta reports it.
    Raises TranslationError for what a chat completion cannot carry (server tools)."""
    messages: list[dict[str, Any]] = []
    system = system_message(body.get("system"))
    if system is not None:
        messages.append(system)
    turns = body.get("messages")
    if not isinstance(turns, list):
        raise TranslationError("'messages' must be a list.", "messages")
    for i, turn in enumerate(turns):
        where = f"messages.{i}"
        if not isinstance(turn, dict):
            raise TranslationError(f"{where}: must be an object.", where)
        role = turn.get("role")
        if role == "user":
            messages.extend(user_messages(turn.get("content"), where))
        elif role == "assistant":
            messages.append(assistant_message(turn.get("content"), where))
        else:
            raise TranslationError(f"{where}.role: must be 'user' or 'assistant'.", f"{where}.role")
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if isinstance(body.get("max_tokens"), int):
        out[cap_field] = body["max_tokens"]
    if body.get("stop_sequences"):
        out["stop"] = body["stop_sequences"]
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    add_tools(out, body)
    fmt = output_format(body.get("output_config"))
    if fmt is not None:
        out["response_format"] = fmt
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out


def output_format(config: Any) -> dict[str, Any] | None:
    """output_config.format (structured outputs) → response_format json_schema."""
    fmt = config.get("format") if isinstance(config, dict) else None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        return None
    spec = {"name": JSON_FORMAT_NAME, "schema": fmt.get("schema") or {}}
    return {"type": "json_schema", "json_schema": spec}


def system_message(system: Any) -> dict[str, Any] | None:
    if system is None or system == "" or system == []:
        return None
    if isinstance(system, str):
        return {"role": "system", "content": system}
    if not isinstance(system, list):
        raise TranslationError("system: must be a string or a list of text blocks.", "system")
    parts = [text_part(block, f"system.{i}") for i, block in enumerate(system)]
    return {"role": "system", "content": simple_content(parts)}


def text_part(block: Any, where: str) -> dict[str, Any]:
    if not isinstance(block, dict) or block.get("type") != "text":
        raise TranslationError(f"{where}: only text blocks are allowed here.", where)
    return {"type": "text", "text": block.get("text") or ""}


def simple_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One text part as a plain string (what every OpenAI-compatible server reads)."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return str(parts[0]["text"])
    return parts


def user_messages(content: Any, where: str) -> list[dict[str, Any]]:
    """A user turn → tool messages (its tool_result blocks, in order) then a user message
    with the rest (images from tool results included: a tool message holds only text)."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content: must be a string or a list.", f"{where}.content")
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        if isinstance(block, dict) and block.get("type") == "tool_result":
            message, images = tool_message(block, at)
            out.append(message)
            parts.extend(images)
        else:
            parts.append(user_part(block, at))
    if parts:
        out.append({"role": "user", "content": simple_content(parts)})
    return out


def user_part(block: Any, where: str) -> dict[str, Any]:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return {"type": "text", "text": block.get("text") or ""}
    if kind == "image":
        return {"type": "image_url", "image_url": {"url": source_url(block.get("source"), where)}}
    if kind == "document":
        return document_part(block, where)
    raise TranslationError(
        f"{where}: content of type '{kind}' cannot be sent to this deployment.", where
    )


def source_url(source: Any, where: str) -> str:
    """An Anthropic base64 or url source → a URL (base64 as a data: URL)."""
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if isinstance(source, dict) and source.get("type") == "url":
        return str(source.get("url"))
    raise TranslationError(f"{where}.source: must be a base64 or url source.", f"{where}.source")


def document_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "text":
        return {"type": "text", "text": source.get("data") or ""}
    if not isinstance(source, dict) or source.get("type") != "base64":
        raise TranslationError(
            f"{where}.source: a document must be inline (base64 or text) here.", f"{where}.source"
        )
    file = {
        "filename": block.get("title") or "document.pdf",
        "file_data": source_url(source, where),
    }
    return {"type": "file", "file": file}


def tool_message(block: dict[str, Any], where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    content = block.get("content")
    images: list[dict[str, Any]] = []
    if isinstance(content, list):
        texts: list[dict[str, Any]] = []
        for k, item in enumerate(content):
            part = user_part(item, f"{where}.content.{k}")
            (texts if part["type"] == "text" else images).append(part)
        text = "\n".join(str(p["text"]) for p in texts)
    else:
        text = content if isinstance(content, str) else ""
    if block.get("is_error"):
        text = TOOL_ERROR_PREFIX + text
    message = {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}
    return message, images


def assistant_message(content: Any, where: str) -> dict[str, Any]:
    """An assistant turn → one assistant message: its text, and tool_use blocks as
    tool_calls. Thinking blocks are dropped: no OpenAI-compatible server takes them back."""
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content: must be a string or a list.", f"{where}.content")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": block.get("text") or ""})
        elif kind == "tool_use":
            calls.append({
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": dump_arguments(block.get("input"))},
            })  # fmt: skip
        elif kind not in ("thinking", "redacted_thinking"):
            raise TranslationError(
                f"{where}.content.{j}: content of type '{kind}' cannot be sent to this deployment.",
                f"{where}.content.{j}",
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": simple_content(parts) if parts else None,
    }
    if calls:
        message["tool_calls"] = calls
    elif not parts:
        message["content"] = ""
    return message


def add_tools(out: dict[str, Any], body: Mapping[str, Any]) -> None:
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise TranslationError("tools: must be a list.", "tools")
    functions = [function_tool(tool, f"tools.{i}") for i, tool in enumerate(tools)]
    if not functions:
        return
    out["tools"] = functions
    choice = body.get("tool_choice")
    if not isinstance(choice, dict):
        return
    kind = choice.get("type")
    if kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif kind in ("auto", "any", "none"):
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    if choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False


def function_tool(tool: Any, where: str) -> dict[str, Any]:
    """A client tool → an OpenAI function. Anthropic's server tools (web search, code
    execution, bash, ...) run inside Anthropic and cannot be sent elsewhere."""
    if not isinstance(tool, dict) or tool.get("type") not in (None, "custom"):
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise TranslationError(
            f"{where}: the tool type '{kind}' runs only on Anthropic deployments.", where
        )
    fn: dict[str, Any] = {"name": tool.get("name")}
    if tool.get("description"):
        fn["description"] = tool["description"]
    fn["parameters"] = tool.get("input_schema") or {"type": "object", "properties": {}}
    return {"type": "function", "function": fn}


# --- chat completion → Message -----------------------------------------------------------


def message(completion: Mapping[str, Any], *, model: str | None = None) -> dict[str, Any]:
    """An OpenAI chat completion → a Message (its first choice). `model`: the name the
    client asked for, reported back as Anthropic does (default: the upstream's)."""
    choices = completion.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    reply = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if reply.get("reasoning_content"):
        content.append(
            {"type": "thinking", "thinking": reply["reasoning_content"], "signature": ""}
        )
    text = content_text(reply.get("content")) or reply.get("refusal") or ""
    if text:
        content.append({"type": "text", "text": text})
    calls = reply.get("tool_calls") or []
    for call in calls:
        fn = call.get("function") or {}
        content.append({
            "type": "tool_use",
            "id": call.get("id"),
            "name": fn.get("name"),
            "input": parse_arguments(fn.get("arguments")),
        })  # fmt: skip
    return {
        "id": completion.get("id"),
        "type": "message",
        "role": "assistant",
        "model": model or completion.get("model"),
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason"), bool(calls)),
        "stop_sequence": None,
        "usage": anthropic_usage(completion.get("usage") or {}),
    }


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def stop_reason(finish: Any, called_tools: bool) -> str:
    """finish_reason → stop_reason. Tool calls always stop as tool_use: some compatible
    servers say "stop", and an Anthropic client runs its tools only on tool_use."""
    if called_tools:
        return "tool_use"
    return STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"


# --- chat chunks → Messages SSE events ---------------------------------------------------


class EventTranslator:
    """Fed OpenAI chat chunks (`feed`), gives Anthropic stream events as (name, data).

    message_start comes with the first chunk; each run of text, reasoning or one tool
    call's arguments is a content block (start, deltas, stop), indexed in order; at the
    end (`finish`, for [DONE] or the stream's end) message_delta carries the stop reason
    and the usage (OpenAI reports it last), then message_stop. An in-band error chunk, or
    `fail`, ends the stream with an `error` event. Only the first choice is followed."""

    __slots__ = ("_blocks", "_calls", "_open", "_stop", "_usage", "done", "message_id", "model",
                 "started")  # fmt: skip

    def __init__(self, *, model: str | None = None, message_id: str | None = None) -> None:
        self.model = model
        self.message_id = message_id
        self.started = False
        self.done = False
        self._blocks = 0  # content blocks started
        self._open: tuple[str, int] | None = None  # the open block: (kind, its index)
        self._calls: dict[int, int] = {}  # OpenAI tool call index → block index
        self._stop: str | None = None
        self._usage: Any = None

    def feed(self, chunk: Mapping[str, Any]) -> list[Event]:
        if self.done:
            return []
        if chunk.get("error"):
            err = anthropic_error_from_openai(None, chunk)["error"]
            return self.fail(err["message"], err["type"])
        events = self._ensure_started(chunk)
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content"):
                events += self._text("thinking", "thinking_delta", delta["reasoning_content"])
            if delta.get("content"):
                events += self._text("text", "text_delta", delta["content"])
            for call in delta.get("tool_calls") or ():
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self._stop = stop_reason(choice["finish_reason"], bool(self._calls))
        return events

    @property
    def stopped(self) -> bool:
        """A finish reason came: the answer is complete (whether or not [DONE] follows)."""
        return self._stop is not None

    def finish(self) -> list[Event]:
        """The upstream stream ended well ([DONE]): close the message."""
        if self.done:
            return []
        events = self._ensure_started({}) + self._close()
        stop = "tool_use" if self._calls else (self._stop or "end_turn")
        usage = anthropic_usage(self._usage) if self._usage else {"output_tokens": 0}
        delta = {"stop_reason": stop, "stop_sequence": None}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        self.done = True
        return events

    def fail(self, message: str, kind: str = "api_error") -> list[Event]:
        """The stream broke (an upstream error, a cut connection): Anthropic's error event."""
        if self.done:
            return []
        self.done = True
        return [("error", anthropic_error(message, kind))]

    def _ensure_started(self, chunk: Mapping[str, Any]) -> list[Event]:
        if self.started:
            return []
        self.started = True
        message: dict[str, Any] = {
            "id": self.message_id or chunk.get("id"),
            "type": "message",
            "role": "assistant",
            "model": self.model or chunk.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def _begin(self, kind: str, block: dict[str, Any]) -> list[Event]:
        events = self._close()
        index = self._blocks
        self._blocks += 1
        self._open = (kind, index)
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return [*events, ("content_block_start", start)]

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        index = self._open[1]
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _text(self, kind: str, delta_kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._open is None or self._open[0] != kind:
            empty = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {
                "type": "text", "text": ""}  # fmt: skip
            events = self._begin(kind, empty)
        assert self._open is not None
        field = "thinking" if kind == "thinking" else "text"
        delta = {"type": delta_kind, field: text}
        events.append(("content_block_delta", self._delta(self._open[1], delta)))
        return events

    def _tool_call(self, call: Any) -> list[Event]:
        if not isinstance(call, dict):
            return []
        position = call.get("index", 0)
        fn = call.get("function") or {}
        events: list[Event] = []
        index = self._calls.get(position)
        if index is None:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{position}",
                "name": fn.get("name"),
                "input": {},
            }
            events = self._begin("tool", block)
            assert self._open is not None
            index = self._calls[position] = self._open[1]
        if fn.get("arguments"):
            delta = {"type": "input_json_delta", "partial_json": fn["arguments"]}
            events.append(("content_block_delta", self._delta(index, delta)))
        return events

    @staticmethod
    def _delta(index: int, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": index, "delta": delta}


def encode(events: list[Event]) -> bytes:
    """Events as the bytes of an Anthropic SSE stream (`event:` and `data:` lines)."""
    return b"".join(sse_event(name, data) for name, data in events)
