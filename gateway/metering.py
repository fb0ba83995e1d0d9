"""Metering: read what the upstream answered (ids, finish reasons, text, usage) once, as dicts."""

from __future__ import annotations

from typing import Any

from gateway.context import RequestContext
from pricing.usage import usage_from_openai


def observe_body(ctx: RequestContext, data: dict[str, Any]) -> None:
    """A whole (non-stream) OpenAI-format response."""
    ctx.response_id = data.get("id")
    ctx.response_model = data.get("model")
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
    if isinstance(usage, dict):
        ctx.usage = usage_from_openai(usage)


class StreamObserver:
    """Folds stream chunks into the context: the first id/model, finish reasons, text, tool calls."""

    __slots__ = ("_calls", "ctx")

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self._calls: dict[tuple[int, int], dict[str, Any]] = {}

    def chunk(self, data: dict[str, Any]) -> None:
        ctx = self.ctx
        if ctx.response_id is None:
            ctx.response_id = data.get("id")
            ctx.response_model = data.get("model")
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
        usage = data.get("usage")
        if usage:
            ctx.usage = usage_from_openai(usage)

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


def generated_text(ctx: RequestContext) -> str:
    """Everything the model generated, tool-call arguments included: what we count when the
    upstream reports no usage."""
    args = "".join(call["arguments"] or "" for call in ctx.output_tool_calls)
    return "".join(ctx.output_text) + args
