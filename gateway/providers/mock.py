"""mock: a deterministic provider inside the gateway (no network), for demos and load tests.

Echoes the last user message (or the configured ``text``), reports usage counted with
tiktoken, streams word by word, and waits ``latency_ms`` before answering. Chat, legacy
completions, embeddings and the Responses API, each in its own wire format.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import orjson

from gateway.config import ProviderConfig
from gateway.providers.base import JSON_HEADERS, OPERATION_PATHS, SSE_HEADERS, UpstreamResponse
from pricing.tokens import TokenCounter

if TYPE_CHECKING:
    from gateway.providers.http import UpstreamFactory

WORDS = re.compile(r"\S+\s*")


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def content_text(content: Any, kind: str = "text") -> str:
    """A message's text: the string, or its text parts (of type `kind`) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == kind and isinstance(p.get("text"), str)
        )
    return ""


def last_input_text(body: dict[str, Any]) -> str:
    """The Responses API's `input`: a string, or items whose last user message is echoed."""
    items = body.get("input")
    if isinstance(items, str):
        return items
    for item in reversed(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            return content_text(item.get("content"), "input_text")
    return ""


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return ""


def echoed(operation: str, body: dict[str, Any]) -> str:
    if operation == "chat":
        return last_user_text(body)
    if operation == "responses":
        return last_input_text(body)
    return prompt_text(body.get("prompt"))


def vector(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255 - 0.5, 6) for b in digest[:dims]]


class MockProvider:
    kind: ClassVar[str] = "mock"
    operations: ClassVar[frozenset[str]] = frozenset(OPERATION_PATHS)

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        *,
        counter: TokenCounter,
        upstream: UpstreamFactory | None = None,  # the registry's: no HTTP here
    ) -> None:
        self.name = name
        self.config = config
        self.counter = counter
        self.server_address: str | None = None
        self.server_port: int | None = None
        self._ids = itertools.count(1)

    async def aclose(self) -> None:
        return None

    async def send(
        self,
        operation: str,
        model: str,
        body: dict[str, Any],
        *,
        stream: bool,
        timeout_s: float,
        headers: Mapping[str, str],
    ) -> UpstreamResponse:
        if self.config.latency_ms:
            await asyncio.sleep(self.config.latency_ms / 1000)
        prompt = await self.counter.count_request(operation, model, body)
        if operation == "embeddings":
            return self._json(self._embeddings(model, body, prompt.tokens))
        reply = self.config.text if self.config.text is not None else echoed(operation, body)
        completion = self.counter.count_text(model, reply).tokens
        if operation == "responses":
            return self._response(model, body, reply, prompt.tokens, completion, stream)
        usage = {
            "prompt_tokens": prompt.tokens,
            "completion_tokens": completion,
            "total_tokens": prompt.tokens + completion,
        }
        rid = f"{'chatcmpl' if operation == 'chat' else 'cmpl'}-mock-{next(self._ids)}"
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = self._stream(operation, rid, model, reply, usage if include_usage else None)
            return UpstreamResponse(200, SSE_HEADERS, chunks=chunks)
        return self._json(self._whole(operation, rid, model, reply, usage))

    def _json(self, obj: dict[str, Any]) -> UpstreamResponse:
        return UpstreamResponse(200, JSON_HEADERS, body=orjson.dumps(obj))

    def _whole(
        self, operation: str, rid: str, model: str, reply: str, usage: dict[str, int]
    ) -> dict[str, Any]:
        created = int(time.time())
        if operation == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}
            obj = "text_completion"
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage,
        }

    def _embeddings(self, model: str, body: dict[str, Any], tokens: int) -> dict[str, Any]:
        inputs = body.get("input")
        items = (
            inputs
            if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
            else [inputs]
        )
        data = [
            {"object": "embedding", "index": i, "embedding": vector(str(item))}
            for i, item in enumerate(items)
        ]
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _stream(
        self, operation: str, rid: str, model: str, reply: str, usage: dict[str, int] | None
    ) -> AsyncIterator[bytes]:
        created = int(time.time())
        delay = self.config.chunk_delay_ms / 1000
        chat = operation == "chat"
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            obj = {
                "id": rid,
                "object": kind,
                "created": created,
                "model": model,
                "choices": choices,
                **extra,
            }
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        def piece(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text is not None:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

        if chat:
            yield event([piece(None, None, first=True)])
        for word in WORDS.findall(reply):
            if delay:
                await asyncio.sleep(delay)
            yield event([piece(word, None)])
        yield event([piece(None if chat else "", "stop")])
        if usage is not None:
            yield event([], usage=usage)
        yield b"data: [DONE]\n\n"

    # --- the Responses API ----------------------------------------------------------------

    def _response(
        self, model: str, body: dict[str, Any], reply: str, prompt: int, completion: int,
        stream: bool,
    ) -> UpstreamResponse:  # fmt: skip
        number = next(self._ids)
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        }
        response = response_object(f"resp_mock_{number}", model, body)
        message = output_message(f"msg_mock_{number}", reply)
        if not stream:
            done = {**response, "status": "completed", "output": [message], "usage": usage}
            return self._json(done)
        events = self._response_events(response, message, reply, usage)
        return UpstreamResponse(200, SSE_HEADERS, chunks=events)

    async def _response_events(
        self, response: dict[str, Any], message: dict[str, Any], reply: str,
        usage: dict[str, Any],
    ) -> AsyncIterator[bytes]:  # fmt: skip
        """The events OpenAI sends for one text answer, in its order, numbered."""
        delay = self.config.chunk_delay_ms / 1000
        sequence = itertools.count()
        item_id = message["id"]
        part = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def event(kind: str, **fields: Any) -> bytes:
            obj = {"type": kind, "sequence_number": next(sequence), **fields}
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

        yield event("response.created", response=response)
        yield event("response.in_progress", response=response)
        started = {**message, "status": "in_progress", "content": []}
        yield event("response.output_item.added", output_index=0, item=started)
        yield event("response.content_part.added", **where, part=part)
        for word in WORDS.findall(reply):
            if delay:
                await asyncio.sleep(delay)
            yield event("response.output_text.delta", **where, delta=word, logprobs=[])
        yield event("response.output_text.done", **where, text=reply, logprobs=[])
        yield event("response.content_part.done", **where, part={**part, "text": reply})
        yield event("response.output_item.done", output_index=0, item=message)
        done = {**response, "status": "completed", "output": [message], "usage": usage}
        yield event("response.completed", response=done)


def response_object(rid: str, model: str, body: dict[str, Any]) -> dict[str, Any]:
    """A Responses API `response` in progress, echoing the request's settings."""
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": None,
        "metadata": body.get("metadata") or {},
    }


def output_message(item_id: str, text: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }
