"""Metering: read what the upstream answered (ids, finish reasons, text, usage) once, as dicts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.context import RequestContext
from pricing.usage import Usage, read_openai_usage

if TYPE_CHECKING:
    from gateway.state import Gateway

# Model families that think before they answer and do not stream their thoughts: when no
# usage comes back, the visible text is not all that was billed.
HIDDEN_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5", "deepseek-reasoner", "deepseek-r1",
                             "magistral", "codex")  # fmt: skip


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
    if usage is not None:
        read_usage(ctx, usage)


def read_usage(ctx: RequestContext, usage: Any) -> None:
    """The upstream's usage report, read against the request's bound (pricing.usage)."""
    reading = read_openai_usage(usage, ctx.usage_bound)
    ctx.usage = reading.usage
    ctx.usage_anomalies = reading.anomalies


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
            read_usage(ctx, usage)

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
