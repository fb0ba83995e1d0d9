"""Metering: read what the upstream answered (ids, finish reasons, text, usage) once, as dicts.

One reader per API shape: a whole body (`observe_body`, `observe_response`,
`observe_message`) and a stream observer (`StreamObserver` for chat and legacy completions,
`ResponsesStreamObserver` for the Responses API, `MessagesStreamObserver` for Anthropic's
Messages API). An observer also knows its protocol's events: where a usage report sits,
and the in-band error event that ends a broken stream."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from gateway.pipeline.context import RequestContext
from gateway.translate.anthropic_common import FINISH_REASONS, anthropic_error, anthropic_error_type
from pricing.usage import Usage, read_anthropic_usage, read_openai_usage

if TYPE_CHECKING:
    from gateway.errors import GatewayError
    from gateway.state import Gateway

# Model families that think before they answer and do not stream their thoughts: when no
# usage comes back, the visible text is not all that was billed.
HIDDEN_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5", "deepseek-reasoner", "deepseek-r1",
                             "magistral", "codex")  # fmt: skip

# What a stream event carried, as flags an observer returns (0: nothing the relay acts on).
USAGE = 1  # a usage report: the event gets usage.cost, or is hidden when we asked for it
ERROR = 2  # an error reported by the upstream itself: relayed, and recorded


def observe_body(ctx: RequestContext, data: dict[str, Any]) -> None:
    """A whole (non-stream) chat completion or legacy completion."""
    ctx.response_id = data.get("id")
    ctx.response_model = data.get("model")
    read_service(ctx, data)
    for choice in data.get("choices") or ():
        if choice.get("finish_reason"):
            ctx.finish_reasons.append(choice["finish_reason"])
        message = choice.get("message")
        if message is not None:
            if isinstance(message.get("content"), str):
                ctx.output_text.append(message["content"])
            for call in message.get("tool_calls") or ():
                fn = call.get("function") or {}
                ctx.output_tool_calls.append(
                    {
                        "id": call.get("id"),
                        "name": fn.get("name"),
                        "arguments": fn.get("arguments") or "",
                    }
                )
        elif isinstance(choice.get("text"), str):
            ctx.output_text.append(choice["text"])
    usage = data.get("usage")
    if usage is not None:
        read_usage(ctx, usage)


def read_service(ctx: RequestContext, data: dict[str, Any]) -> None:
    """OpenAI's service tier and system fingerprint, when the answer gives them (for the
    attempt span's openai.response.* attributes)."""
    tier = data.get("service_tier")
    if isinstance(tier, str):
        ctx.response_service_tier = tier
    fingerprint = data.get("system_fingerprint")
    if isinstance(fingerprint, str):
        ctx.response_system_fingerprint = fingerprint


def read_usage(ctx: RequestContext, usage: Any) -> None:
    """The upstream's usage report, read against the request's bound (pricing.usage)."""
    reading = read_openai_usage(usage, ctx.usage_bound)
    ctx.usage = reading.usage
    ctx.usage_anomalies = reading.anomalies


def error_message(error: Any) -> str | None:
    """The message of an OpenAI error object, if it has one."""
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) else None


class StreamObserver:
    """Chat and legacy completion chunks folded into the context: the first id/model, finish
    reasons, text, tool calls, usage."""

    __slots__ = ("_calls", "ctx")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self._calls: dict[tuple[int, int], dict[str, Any]] = {}

    def chunk(self, data: dict[str, Any]) -> int:
        """Reads one chunk; returns its USAGE / ERROR flags."""
        ctx = self.ctx
        if ctx.response_id is None:
            ctx.response_id = data.get("id")
            ctx.response_model = data.get("model")
            read_service(ctx, data)
        for choice in data.get("choices") or ():
            delta = choice.get("delta")
            if delta is not None:
                content = delta.get("content")
                if content:
                    ctx.output_text.append(content)
                for call in delta.get("tool_calls") or ():
                    self._tool_call(choice.get("index", 0), call)
            else:
                text = choice.get("text")
                if text:
                    ctx.output_text.append(text)
            if choice.get("finish_reason"):
                ctx.finish_reasons.append(choice["finish_reason"])
        flags = ERROR if data.get("error") else 0
        usage = data.get("usage")
        if usage:
            read_usage(ctx, usage)
            flags |= USAGE
        return flags

    def _tool_call(self, choice: int, call: dict[str, Any]) -> None:
        key = (choice, call.get("index", 0))
        fn = call.get("function") or {}
        slot = self._calls.get(key)
        if slot is None:
            slot = self._calls[key] = {
                "id": call.get("id"),
                "name": fn.get("name"),
                "arguments": "",
            }
            self.ctx.output_tool_calls.append(slot)
        if fn.get("arguments"):
            slot["arguments"] += fn["arguments"]

    @staticmethod
    def usage_of(data: dict[str, Any]) -> Any:
        """The usage object of a chunk that has one (flagged USAGE)."""
        return data["usage"]

    @staticmethod
    def error_text(data: dict[str, Any]) -> str | None:
        """The message of an upstream error chunk (flagged ERROR)."""
        return error_message(data.get("error"))

    def error_event(self, err: GatewayError) -> bytes:
        """How a broken stream ends: one `data:` event with OpenAI's error object, which the
        SDKs raise (as OpenAI itself signals an error after the headers)."""
        return b"data: " + orjson.dumps(err.body()) + b"\n\n"


# --- the Responses API ------------------------------------------------------------------

TERMINAL_EVENTS = frozenset(("response.completed", "response.incomplete", "response.failed"))
STARTED_EVENTS = frozenset(("response.created", "response.in_progress", "response.queued"))
# why a response stopped (status, incomplete_details.reason) → the chat vocabulary, so
# gen_ai.response.finish_reasons means the same whichever API was used
INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}


def observe_response(ctx: RequestContext, data: dict[str, Any]) -> None:
    """A whole Responses API `response` object: id, model, output text and function calls,
    the finish reason (from status), usage."""
    ctx.response_id = data.get("id")
    ctx.response_model = data.get("model")
    read_service(ctx, data)
    read_output(ctx, data.get("output") or ())
    finish_reason(ctx, data)
    usage = data.get("usage")
    if usage is not None:
        read_usage(ctx, usage)


def read_output(ctx: RequestContext, output: Any) -> None:
    """Output items: message text (and refusals) and function calls. Other items (reasoning,
    hosted tool calls) carry no text the client sees; their tokens are in the usage."""
    for item in output:
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or ():
                text = (
                    part.get("text") if part.get("type") == "output_text" else part.get("refusal")
                )
                if isinstance(text, str):
                    ctx.output_text.append(text)
        elif kind == "function_call":
            ctx.output_tool_calls.append(function_call(item))


def function_call(item: dict[str, Any]) -> dict[str, Any]:
    arguments = item.get("arguments")
    return {
        "id": item.get("call_id"),
        "name": item.get("name"),
        "arguments": arguments if isinstance(arguments, str) else "",
    }


def finish_reason(ctx: RequestContext, response: dict[str, Any]) -> None:
    status = response.get("status")
    if status == "completed":
        ctx.finish_reasons.append("tool_calls" if ctx.output_tool_calls else "stop")
    elif status == "incomplete":
        details = response.get("incomplete_details") or {}
        reason = details.get("reason")
        ctx.finish_reasons.append(INCOMPLETE_REASONS.get(str(reason), "length"))
    elif status == "failed":
        ctx.finish_reasons.append("error")
    elif status == "cancelled":
        ctx.finish_reasons.append("cancelled")


class ResponsesStreamObserver:
    """Responses API stream events folded into the context: text deltas, function-call
    arguments, and the final response (status, usage) from response.completed, .incomplete
    or .failed. Remembers the last sequence_number, so an error event of ours continues it."""

    __slots__ = ("_calls", "ctx", "sequence")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self._calls: dict[Any, dict[str, Any]] = {}  # output item id → its tool call
        self.sequence = -1

    def chunk(self, data: dict[str, Any]) -> int:
        """Reads one event; returns its USAGE / ERROR flags."""
        kind = data.get("type")
        sequence = data.get("sequence_number")
        if isinstance(sequence, int):
            self.sequence = sequence
        if kind == "response.output_text.delta" or kind == "response.refusal.delta":
            delta = data.get("delta")
            if isinstance(delta, str) and delta:
                self.ctx.output_text.append(delta)
        elif kind == "response.function_call_arguments.delta":
            slot = self._calls.get(data.get("item_id"))
            delta = data.get("delta")
            if slot is not None and isinstance(delta, str):
                slot["arguments"] += delta
        elif kind in TERMINAL_EVENTS:
            return self._end(kind, data.get("response") or {})
        elif kind in STARTED_EVENTS:
            response = data.get("response") or {}
            if self.ctx.response_id is None:
                self.ctx.response_id = response.get("id")
                self.ctx.response_model = response.get("model")
                read_service(self.ctx, response)
        elif kind == "response.output_item.added" or kind == "response.output_item.done":
            self._item(data.get("item") or {})
        elif kind == "error":
            return ERROR
        return 0

    def _item(self, item: dict[str, Any]) -> None:
        if item.get("type") != "function_call":
            return
        slot = self._calls.get(item.get("id"))
        if slot is None:
            slot = self._calls[item.get("id")] = function_call(item)
            self.ctx.output_tool_calls.append(slot)
        elif isinstance(item.get("arguments"), str) and item["arguments"]:
            slot["arguments"] = item["arguments"]  # the whole, as it was finally sent

    def _end(self, kind: str, response: dict[str, Any]) -> int:
        ctx = self.ctx
        ctx.response_id = response.get("id") or ctx.response_id
        ctx.response_model = response.get("model") or ctx.response_model
        read_service(ctx, response)
        if not ctx.output_text and not ctx.output_tool_calls:  # no deltas came: the output
            read_output(ctx, response.get("output") or ())
        finish_reason(ctx, response)
        flags = ERROR if kind == "response.failed" else 0
        usage = response.get("usage")
        if usage:
            read_usage(ctx, usage)
            flags |= USAGE
        return flags

    @staticmethod
    def usage_of(data: dict[str, Any]) -> Any:
        return data["response"]["usage"]

    @staticmethod
    def error_text(data: dict[str, Any]) -> str | None:
        if data.get("type") == "error":  # documented flat; also seen nested under "error"
            return error_message(data) or error_message(data.get("error"))
        response = data.get("response")
        return error_message(response.get("error")) if isinstance(response, dict) else None

    def error_event(self, err: GatewayError) -> bytes:
        """The Responses API's own error event (`event: error`, type "error"), numbered after
        the last event relayed: the SDKs yield it as a ResponseErrorEvent."""
        self.sequence += 1
        event = {
            "type": "error",
            "code": err.code,
            "message": err.message,
            "param": err.param,
            "sequence_number": self.sequence,
        }
        return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"


# --- Anthropic's Messages API --------------------------------------------------------------


def observe_message(ctx: RequestContext, data: dict[str, Any]) -> None:
    """A whole Anthropic Message: id, model, text and tool_use blocks, the stop reason (in
    the chat vocabulary, as for the Responses API), usage. Anything else is unreadable."""
    if data.get("type") != "message":
        raise ValueError("not a Message")
    ctx.response_id = data.get("id")
    ctx.response_model = data.get("model")
    for block in data.get("content") or ():
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            ctx.output_text.append(block["text"])
        elif kind == "tool_use":
            ctx.output_tool_calls.append(tool_use(block, orjson.dumps(block.get("input") or {})))
    message_stop(ctx, data.get("stop_reason"))
    usage = data.get("usage")
    if usage is not None:
        read_message_usage(ctx, usage)


def tool_use(block: dict[str, Any], arguments: bytes = b"") -> dict[str, Any]:
    return {"id": block.get("id"), "name": block.get("name"), "arguments": arguments.decode()}


def message_stop(ctx: RequestContext, stop_reason: Any) -> None:
    if isinstance(stop_reason, str):
        ctx.finish_reasons.append(FINISH_REASONS.get(stop_reason, "stop"))


def read_message_usage(ctx: RequestContext, usage: Any) -> None:
    """An Anthropic usage report. One that counts no input at all is not a report: every
    request has input, and it is what the translation from an OpenAI-compatible server
    says when that server reported no usage; the gateway then counts the request itself
    rather than charge nothing."""
    reading = read_anthropic_usage(usage, ctx.usage_bound)
    if reading.usage.input_tokens == 0 and not reading.anomalies:
        return
    ctx.usage = reading.usage
    ctx.usage_anomalies = reading.anomalies


class MessagesStreamObserver:
    """Messages API stream events folded into the context: message_start (id, model, the
    input and cache usage), text and tool input deltas, message_delta (stop reason, the
    cumulative usage), `error`. The usage is read once the message_delta comes: until then
    the output count is a placeholder, and a stream cut before it is counted by us.

    Nothing is flagged USAGE: the events go to the client as they came (no usage.cost)."""

    __slots__ = ("_blocks", "_usage", "ctx")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self._blocks: dict[Any, dict[str, Any]] = {}  # content block index → its tool call
        self._usage: dict[str, Any] = {}

    def chunk(self, data: dict[str, Any]) -> int:
        """Reads one event; returns its ERROR flag. An event without a type is unreadable."""
        kind = data["type"]
        if kind == "content_block_delta":
            delta = data["delta"]
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = delta.get("text")
                if isinstance(text, str) and text:
                    self.ctx.output_text.append(text)
            elif dtype == "input_json_delta":
                slot = self._blocks.get(data.get("index"))
                piece = delta.get("partial_json")
                if slot is not None and isinstance(piece, str):
                    slot["arguments"] += piece
        elif kind == "content_block_start":
            block = data["content_block"]
            if block.get("type") == "tool_use":
                slot = self._blocks[data.get("index")] = tool_use(block)
                self.ctx.output_tool_calls.append(slot)
            elif block.get("type") == "text" and block.get("text"):
                self.ctx.output_text.append(block["text"])
        elif kind == "message_start":
            self._start(data["message"])
        elif kind == "message_delta":
            self._delta(data)
        elif kind == "error":
            return ERROR
        return 0

    def _start(self, message: dict[str, Any]) -> None:
        ctx = self.ctx
        ctx.response_id = message.get("id")
        ctx.response_model = message.get("model")
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._usage = dict(usage)

    def _delta(self, data: dict[str, Any]) -> None:
        delta = data.get("delta") or {}
        message_stop(self.ctx, delta.get("stop_reason"))
        usage = data.get("usage")
        if isinstance(usage, dict):  # cumulative: its counts replace message_start's
            self._usage.update((k, v) for k, v in usage.items() if v is not None)
        read_message_usage(self.ctx, self._usage)

    @staticmethod
    def usage_of(data: dict[str, Any]) -> Any:
        return data.get("usage")

    @staticmethod
    def error_text(data: dict[str, Any]) -> str | None:
        return error_message(data.get("error"))

    @staticmethod
    def error_event(err: GatewayError) -> bytes:
        """Anthropic's own error event (`event: error`), which the SDKs raise: its type from
        the status (api_error for the gateway's 502, timeout_error for 504)."""
        body = anthropic_error(err.message, anthropic_error_type(err.status))
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


def generated_text(ctx: RequestContext) -> str:
    """Everything the model generated, tool-call arguments included: what we count when the
    upstream reports no usage."""
    args = "".join(call["arguments"] or "" for call in ctx.output_tool_calls)
    return "".join(ctx.output_text) + args


def estimate_usage(
    gw: Gateway, ctx: RequestContext, model: str, prompt_tokens: int, output_cap: int
) -> Usage:
    """What we count ourselves when the upstream reports no usage (or a report we cannot
    trust): the admitted prompt count, and the generated text. A model that reasons out of
    sight is charged its whole output cap: its hidden tokens are unknown but within it."""
    output = 0
    if ctx.operation != "embeddings":
        text = generated_text(ctx)
        output = gw.counter.count_text(model, text).tokens if text else 0
        if hides_reasoning(model):
            output = max(output, output_cap)
    return Usage(input_tokens=prompt_tokens, output_tokens=output, estimated=True)


def hides_reasoning(model: str) -> bool:
    name = model.lower().rsplit("/", 1)[-1]
    return name.startswith(HIDDEN_REASONING_PREFIXES) and "chat" not in name
