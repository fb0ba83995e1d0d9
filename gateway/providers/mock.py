"""mock: a deterministic provider inside the gateway (no network), for demos and load tests.

Echoes the last user message (or the configured ``text``), reports usage counted with
tiktoken, streams word by word, and waits ``latency_ms`` before answering.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import orjson

from gateway.config import ProviderConfig
from gateway.providers.base import UpstreamResponse
from pricing.tokens import TokenCounter

WORDS = re.compile(r"\S+\s*")
JSON_HEADERS = {"content-type": "application/json"}
SSE_HEADERS = {"content-type": "text/event-stream"}


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return ""


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return ""


def vector(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255 - 0.5, 6) for b in digest[:dims]]


class MockProvider:
    kind: ClassVar[str] = "mock"

    def __init__(self, name: str, config: ProviderConfig, *, counter: TokenCounter) -> None:
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
        reply = (
            self.config.text
            if self.config.text is not None
            else (last_user_text(body) if operation == "chat" else prompt_text(body.get("prompt")))
        )
        completion = self.counter.count_text(model, reply).tokens
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
