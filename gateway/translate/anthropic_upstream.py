"""An OpenAI chat client in front of Anthropic's Messages API (the `anthropic` provider).

chat request → Messages request (`messages_request`), Message → chat completion
(`chat_completion`), Messages SSE events → chat chunks (`StreamTranslator`). Pure: no I/O.
The choices where the APIs differ are in docs/PROVIDERS.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from gateway.translate.anthropic_common import (
    FINISH_REASONS,
    TranslationError,
    dump_arguments,
    openai_error_from_anthropic,
    openai_usage,
    parse_arguments,
)

# The tool a response_format becomes (Anthropic's Messages API has no JSON mode that every
# model supports): forced when the client has no tools, its input returned as the content.
JSON_TOOL = "json_response"
# Anthropic request fields an OpenAI client may send as extra_body; passed as they are.
NATIVE_FIELDS = ("top_k", "thinking", "output_config", "cache_control")
MAX_TEMPERATURE = 1.0  # OpenAI allows 0..2, Anthropic 0..1


class MessagesRequest(NamedTuple):
    body: dict[str, Any]
    json_tool: str | None  # the response_format tool, when one was added
    include_usage: bool  # the client asked for a usage chunk (stream_options.include_usage)


# --- chat request → Messages request -----------------------------------------------------


def messages_request(body: Mapping[str, Any], default_max_tokens: int) -> MessagesRequest:
    """A chat completion request → a Messages request. `default_max_tokens`: Anthropic
    requires max_tokens; used when the client names no output cap (the model's max output).
    Raises TranslationError for what Anthropic cannot do (n > 1, audio input, ...)."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        raise TranslationError("anthropic deployments return one choice: 'n' must be 1.", "n")
    system, messages = convert_messages(body.get("messages"))
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if system:
        out["system"] = system
    out["max_tokens"] = output_cap(body) or default_max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = stop
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        out["temperature"] = min(temperature, MAX_TEMPERATURE)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    for name in NATIVE_FIELDS:
        if name in body:
            out[name] = body[name]
    json_tool = add_tools(out, body)
    stream = body.get("stream") is True
    if stream:
        out["stream"] = True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return MessagesRequest(out, json_tool, include_usage)


def output_cap(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def convert_messages(messages: Any) -> tuple[str | list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenAI messages → (Anthropic system, Anthropic messages).

    System and developer messages, wherever they are, become the system prompt in order.
    Tool results become tool_result blocks of a user turn; turns of the same role are
    merged (Anthropic wants them alternating), tool results first in a user turn."""
    if not isinstance(messages, list):
        raise TranslationError("'messages' must be a list.", "messages")
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise TranslationError(f"{where} must be an object.", where)
        role = message.get("role")
        if role in ("system", "developer"):
            blocks = content_blocks(message.get("content"), where, text_only=True)
            system.extend(with_cache_control(blocks, message))
        elif role == "user":
            blocks = content_blocks(message.get("content"), where)
            append_turn(out, "user", with_cache_control(blocks, message))
        elif role == "assistant":
            append_turn(
                out, "assistant", with_cache_control(assistant_blocks(message, where), message)
            )
        elif role == "tool":
            append_turn(out, "user", with_cache_control([tool_result(message, where)], message))
        else:
            raise TranslationError(
                f"{where}.role '{role}' is not supported by anthropic deployments.", f"{where}.role"
            )
    for turn in out:
        if turn["role"] == "user":  # Anthropic wants tool results before any other content
            turn["content"].sort(key=lambda block: block.get("type") != "tool_result")
    return simple_system(system), [simple_turn(turn) for turn in out]


def append_turn(out: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return
    if out and out[-1]["role"] == role:
        out[-1]["content"].extend(blocks)
    else:
        out.append({"role": role, "content": blocks})


def with_cache_control(
    blocks: list[dict[str, Any]], message: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """A message-level cache_control marks the message's last block (Anthropic's unit)."""
    marker = message.get("cache_control")
    if marker is not None and blocks:
        blocks[-1] = {**blocks[-1], "cache_control": marker}
    return blocks


def simple_system(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """The system prompt as one string when it is plain text in one piece, else blocks."""
    if len(blocks) == 1 and set(blocks[0]) == {"type", "text"}:
        return str(blocks[0]["text"])
    return blocks


def simple_turn(turn: dict[str, Any]) -> dict[str, Any]:
    blocks = turn["content"]
    if len(blocks) == 1 and set(blocks[0]) == {"type", "text"}:
        return {"role": turn["role"], "content": blocks[0]["text"]}
    return turn


def content_blocks(content: Any, where: str, *, text_only: bool = False) -> list[dict[str, Any]]:
    """OpenAI message content (a string or a list of parts) → Anthropic content blocks.
    Empty text is dropped: Anthropic refuses empty text blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(f"{where}.content must be a string or a list.", f"{where}.content")
    blocks = []
    for j, part in enumerate(content):
        block = content_block(part, f"{where}.content[{j}]")
        if block is None:
            continue
        if text_only and block["type"] != "text":
            raise TranslationError(f"{where}: only text is allowed here.", f"{where}.content")
        blocks.append(block)
    return blocks


def content_block(part: Any, where: str) -> dict[str, Any] | None:
    if isinstance(part, str):
        return {"type": "text", "text": part} if part else None
    if not isinstance(part, dict):
        raise TranslationError(f"{where} must be an object.", where)
    kind = part.get("type")
    if kind in ("text", "refusal"):
        text = part.get(kind)
        if not isinstance(text, str) or not text:
            return None
        block: dict[str, Any] = {"type": "text", "text": text}
    elif kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        block = {"type": "image", "source": media_source(url, where)}
    elif kind == "file":
        block = document_block(part.get("file"), where)
    else:
        raise TranslationError(
            f"{where}: content of type '{kind}' is not supported by anthropic deployments.", where
        )
    if part.get("cache_control") is not None:
        block["cache_control"] = part["cache_control"]
    return block


def media_source(url: Any, where: str) -> dict[str, Any]:
    """A data: URL → a base64 source; an http(s) URL → a url source."""
    if not isinstance(url, str):
        raise TranslationError(f"{where}: an image needs a URL.", where)
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        params = header.split(";")
        if not comma or "base64" not in params[1:]:
            raise TranslationError(f"{where}: a data URL must be base64-encoded.", where)
        return {"type": "base64", "media_type": params[0] or "image/png", "data": data}
    if url.startswith(("https://", "http://")):
        return {"type": "url", "url": url}
    raise TranslationError(f"{where}: the URL must be a data: or http(s) URL.", where)


def document_block(file: Any, where: str) -> dict[str, Any]:
    """An OpenAI file part (inline file_data) → a document block; file ids cannot travel."""
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str):
        raise TranslationError(
            f"{where}: anthropic deployments need files inline (file_data), not by file_id.", where
        )
    if not data.startswith("data:"):
        data = "data:application/pdf;base64," + data  # OpenAI also takes bare base64
    block: dict[str, Any] = {"type": "document", "source": media_source(data, where)}
    if isinstance(file.get("filename"), str):
        block["title"] = file["filename"]
    return block


def assistant_blocks(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    if message.get("function_call") is not None:
        raise TranslationError(
            f"{where}.function_call (legacy) is not supported by anthropic deployments: "
            "use tool_calls.",
            f"{where}.function_call",
        )
    blocks = content_blocks(message.get("content"), where)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise TranslationError(f"{where}.tool_calls must be a list.", f"{where}.tool_calls")
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise TranslationError(
                f"{where}.tool_calls[{k}] needs a function name.", f"{where}.tool_calls[{k}]"
            )
        blocks.append({
            "type": "tool_use",
            "id": call.get("id") or f"toolu_{k}",
            "name": fn["name"],
            "input": parse_arguments(fn.get("arguments")),
        })  # fmt: skip
    return blocks


def tool_result(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise TranslationError(f"{where}.tool_call_id is required.", f"{where}.tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    else:
        parts = content_blocks(content, where)
        if parts:
            block["content"] = parts
    return block


# --- tools, tool_choice, response_format -------------------------------------------------


def add_tools(out: dict[str, Any], body: Mapping[str, Any]) -> str | None:
    """tools, tool_choice, parallel_tool_calls and response_format → `out`.
    Returns the response_format tool's name when one was added."""
    tools = [anthropic_tool(t, i) for i, t in enumerate(body.get("tools") or [])]
    choice = tool_choice(body.get("tool_choice")) if tools else None
    json_tool = None
    schema = response_schema(body.get("response_format"))
    if schema is not None:
        json_tool = JSON_TOOL
        tools.append({
            "name": JSON_TOOL,
            "description": "Give the response: a JSON object matching this schema.",
            "input_schema": schema,
        })  # fmt: skip
        if not tools[:-1]:  # no tools of the client's: the answer must be this call
            choice = {"type": "tool", "name": JSON_TOOL}
    if not tools:
        return None
    out["tools"] = tools
    if choice is not None:
        if body.get("parallel_tool_calls") is False and choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
        out["tool_choice"] = choice
    elif body.get("parallel_tool_calls") is False:
        out["tool_choice"] = {"type": "auto", "disable_parallel_tool_use": True}
    return json_tool


def anthropic_tool(tool: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
        raise TranslationError(f"{where}: only function tools are supported.", where)
    if not isinstance(fn.get("name"), str):
        raise TranslationError(f"{where}.function.name is required.", f"{where}.function.name")
    out: dict[str, Any] = {"name": fn["name"]}
    if fn.get("description"):
        out["description"] = fn["description"]
    out["input_schema"] = fn.get("parameters") or {"type": "object", "properties": {}}
    marker = tool.get("cache_control", fn.get("cache_control"))
    if marker is not None:
        out["cache_control"] = marker
    return out


def tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None or choice == "auto":
        return {"type": "auto"} if choice else None
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return {"type": "tool", "name": name}
    raise TranslationError(
        "tool_choice must be 'auto', 'none', 'required' or a function.", "tool_choice"
    )


def response_schema(fmt: Any) -> dict[str, Any] | None:
    """The JSON schema a response_format asks for (json_object: any object), or None."""
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "object"}
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else {"type": "object"}
    return None


# --- Message → chat completion -----------------------------------------------------------


def chat_completion(
    message: Mapping[str, Any], *, created: int, json_tool: str | None = None
) -> dict[str, Any]:
    """A Messages API response → an OpenAI chat completion (one choice)."""
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "thinking":
            reasoning.append(block.get("thinking") or "")
        elif kind == "tool_use" and block.get("name") == json_tool:
            texts.append(dump_arguments(block.get("input")))
        elif kind == "tool_use":
            calls.append({
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": dump_arguments(block.get("input"))},
            })  # fmt: skip
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    if calls:
        reply["tool_calls"] = calls
    finish = finish_reason(message.get("stop_reason"), bool(calls))
    return {
        "id": message.get("id"),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [{"index": 0, "message": reply, "logprobs": None, "finish_reason": finish}],
        "usage": openai_usage(message.get("usage")),
    }


def finish_reason(stop_reason: Any, called_tools: bool) -> str:
    """stop_reason → finish_reason. A tool_use stop without a tool call of the client's
    (only the response_format tool was called) is a normal stop."""
    finish = FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"
    if finish == "tool_calls" and not called_tools:
        return "stop"
    return finish


# --- Messages SSE events → chat chunks ---------------------------------------------------


class StreamTranslator:
    """Fed Anthropic stream events (`feed`), gives OpenAI chat chunks.

    message_start → the role chunk; text deltas → content; a tool_use block → a tool call
    (its id and name, then its input_json_delta pieces as arguments); thinking deltas →
    reasoning_content; message_delta's stop_reason → the finish chunk; message_stop → the
    usage chunk (input and cache counts from message_start, output from message_delta),
    when the client asked for it; `error` → OpenAI's in-band error chunk. Unknown events
    and ping are ignored."""

    __slots__ = ("_blocks", "_finished", "_tools", "created", "done", "id", "include_usage",
                 "json_tool", "model", "usage")  # fmt: skip

    def __init__(self, *, created: int, include_usage: bool, json_tool: str | None = None):
        self.created = created
        self.include_usage = include_usage
        self.json_tool = json_tool
        self.id: str | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] = {}
        self.done = False  # message_stop or error: nothing more to say
        self._blocks: dict[int, tuple[str, int]] = {}  # block index → (kind, tool call index)
        self._tools = 0  # the client's tool calls so far
        self._finished = False  # the finish chunk went out

    def feed(self, event: str | None, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        if self.done:
            return []
        kind = data.get("type", event)
        handler = _HANDLERS.get(kind) if isinstance(kind, str) else None
        return handler(self, data) if handler is not None else []

    def close(self) -> list[dict[str, Any]]:
        """The upstream ended without message_stop: when the finish came, end as it would."""
        if self.done or not self._finished:
            return []
        return self._stop({})

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._obj([choice])

    def _obj(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def _start(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        message = data.get("message") or {}
        self.id, self.model = message.get("id"), message.get("model")
        self._merge_usage(message.get("usage"))
        return [self.chunk({"role": "assistant", "content": ""})]

    def _block_start(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        block = data.get("content_block") or {}
        index, kind = data.get("index"), block.get("type")
        if not isinstance(index, int):  # every content_block_start names its block's index
            return []
        if kind == "tool_use" and block.get("name") == self.json_tool:
            self._blocks[index] = ("json", 0)
        elif kind == "tool_use":
            self._blocks[index] = ("tool", self._tools)
            self._tools += 1
            call = {
                "index": self._tools - 1,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return [self.chunk({"tool_calls": [call]})]
        elif kind == "text" and block.get("text"):
            return [self.chunk({"content": block["text"]})]
        return []

    def _block_delta(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        delta = data.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self.chunk({"content": delta["text"]})]
        if kind == "thinking_delta" and delta.get("thinking"):
            return [self.chunk({"reasoning_content": delta["thinking"]})]
        if kind != "input_json_delta" or not delta.get("partial_json"):
            return []
        index = data.get("index")
        block, call = self._blocks.get(index, ("", 0)) if isinstance(index, int) else ("", 0)
        if block == "json":
            return [self.chunk({"content": delta["partial_json"]})]
        if block == "tool":
            piece = {"index": call, "function": {"arguments": delta["partial_json"]}}
            return [self.chunk({"tool_calls": [piece]})]
        return []

    def _message_delta(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        self._merge_usage(data.get("usage"))
        stop = (data.get("delta") or {}).get("stop_reason")
        if stop is None or self._finished:
            return []
        self._finished = True
        return [self.chunk({}, finish_reason(stop, self._tools > 0))]

    def _stop(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.done = True
        out = []
        if not self._finished:
            self._finished = True
            out.append(self.chunk({}, "stop"))
        if self.include_usage:
            out.append(self._obj([], usage=openai_usage(self.usage)))
        return out

    def _error(self, data: Mapping[str, Any]) -> list[dict[str, Any]]:
        self.done = True
        return [openai_error_from_anthropic(None, data)]

    def _merge_usage(self, usage: Any) -> None:
        """message_delta's counts are cumulative: a field it carries replaces the earlier."""
        if isinstance(usage, Mapping):
            self.usage.update((k, v) for k, v in usage.items() if v is not None)


_HANDLERS = {
    "message_start": StreamTranslator._start,
    "content_block_start": StreamTranslator._block_start,
    "content_block_delta": StreamTranslator._block_delta,
    "message_delta": StreamTranslator._message_delta,
    "message_stop": StreamTranslator._stop,
    "error": StreamTranslator._error,
}
