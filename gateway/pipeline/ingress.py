"""The Anthropic Messages ingress: one attempt of POST /v1/messages at any deployment.

The choice is made per attempt, so one model's deployments may mix kinds (an Anthropic
deployment that falls back to an OpenAI one):

- a provider that speaks the Messages API (`send_native`: the `anthropic` kind) gets the
  client's body with only `model` rewritten, and the client's anthropic-version and
  anthropic-beta headers; its answer comes back byte for byte;
- any other gets the body translated to a chat completion request
  (gateway.translate.anthropic_ingress), and its answer translated back: a Message, a
  stream of Anthropic events, errors in Anthropic's shape.

Either way the stages after forwarding (relay, metering, settlement, telemetry) see one
protocol, the client's. The translation wraps the provider's response here, so nothing
downstream knows which way an answer came.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import orjson

from gateway.pipeline.metering import hides_reasoning
from gateway.pipeline.sse import SSEDecoder, is_sse
from gateway.providers.base import JSON_HEADERS, SSE_HEADERS, UpstreamResponse, rewritten_headers
from gateway.translate.anthropic_common import (
    TranslationError,
    anthropic_error,
    anthropic_error_from_openai,
)
from gateway.translate.anthropic_ingress import EventTranslator, chat_request, encode, message

ANTHROPIC_CLIENT_HEADERS = ("anthropic-version", "anthropic-beta")
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
# what reading a chat completion of the wrong shape raises (gateway.pipeline.responses.UNREADABLE)
_UNREADABLE = (AttributeError, TypeError, ValueError, KeyError)
ENDED_EARLY = "The upstream's stream ended before its answer was complete."


def speaks_messages(provider: object) -> bool:
    """A provider that serves Anthropic's Messages API as it is."""
    return callable(getattr(provider, "send_native", None))


async def send_messages(
    provider: Any, model: str, body: dict[str, Any], *, stream: bool, timeout_s: float,
    headers: Mapping[str, str], client_headers: Mapping[str, str],
) -> UpstreamResponse:  # fmt: skip
    """A Messages request to `provider`; the answer in the Messages API's shape."""
    if speaks_messages(provider):
        return await provider.send_native(  # type: ignore[no-any-return]
            MESSAGES_PATH, body, {**client_headers, **headers}, stream=stream, timeout_s=timeout_s
        )
    try:
        request = chat_request(body, cap_field=cap_field(model))
    except TranslationError as exc:
        return refused(exc.message)
    up = await provider.send(
        "chat", model, request, stream=stream, timeout_s=timeout_s, headers=headers
    )
    if stream and up.status == 400 and up.body and b"stream_options" in up.body:
        # A server that does not know stream_options: asked again as the client would have
        # asked it (its usage, if any, is read; else the gateway counts it).
        request.pop("stream_options", None)
        up = await provider.send(
            "chat", model, request, stream=stream, timeout_s=timeout_s, headers=headers
        )
    if up.chunks is not None:
        chunks = anthropic_events(up.chunks)
        return UpstreamResponse(
            up.status, rewritten_headers(up.headers, SSE_HEADERS), chunks=chunks, close=up.close
        )
    return whole_message(up)


async def send_count_tokens(
    provider: Any, model: str, body: dict[str, Any], *, stream: bool, timeout_s: float,
    headers: Mapping[str, str], client_headers: Mapping[str, str],
) -> UpstreamResponse:  # fmt: skip
    """A count_tokens request, to a provider that speaks the Messages API (only those are
    asked; gateway/pipeline/count_tokens.py counts for the others)."""
    return await provider.send_native(  # type: ignore[no-any-return]
        COUNT_TOKENS_PATH, body, {**client_headers, **headers}, stream=False, timeout_s=timeout_s
    )


def cap_field(model: str) -> str:
    """The field an OpenAI-compatible deployment takes the output cap in (OpenAI's
    reasoning models refuse max_tokens)."""
    return "max_completion_tokens" if hides_reasoning(model) else "max_tokens"


def refused(message_text: str) -> UpstreamResponse:
    """A request the deployment cannot be sent (an Anthropic server tool to an OpenAI
    model): Anthropic's 400, nothing sent upstream, nothing charged."""
    body = anthropic_error(message_text, "invalid_request_error")
    return UpstreamResponse(400, JSON_HEADERS, body=orjson.dumps(body))


def whole_message(up: UpstreamResponse) -> UpstreamResponse:
    """A chat completion → a Message; an error → Anthropic's error shape, same status. A
    success body that is not a chat completion is left as it is, for the pipeline to
    report as unreadable (502)."""
    raw = up.body or b""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if up.status >= 400:
        out = anthropic_error_from_openai(up.status, data, raw)
    else:
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            return up
        try:
            out = message(data)
        except _UNREADABLE:
            return up
    return UpstreamResponse(
        up.status, rewritten_headers(up.headers, JSON_HEADERS), body=orjson.dumps(out)
    )


async def anthropic_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """OpenAI chat chunk SSE → Anthropic's events, as they arrive. Transport errors
    propagate (the relay ends the stream with Anthropic's error event); bytes that are not
    chat chunks go through untouched, for the relay to report as unreadable."""
    translator = EventTranslator()
    decoder = SSEDecoder()
    async for piece in chunks:
        out = translate_chunks(translator, decoder.feed(piece))
        if out:
            yield out
    out = translate_chunks(translator, decoder.feed(b"\n\n")) if decoder.tail().strip() else b""
    if not translator.done:
        # No [DONE]: an answer that had finished is closed; one cut short is an error.
        out += encode(translator.finish() if translator.stopped else translator.fail(ENDED_EARLY))
    if out:
        yield out


def translate_chunks(
    translator: EventTranslator, events: Iterable[tuple[bytes, bytes | None]]
) -> bytes:
    out = []
    for raw, data in events:
        if translator.done:
            continue
        if data is None:
            if not is_sse(raw):
                out.append(raw)
            continue
        if data == b"[DONE]":
            out.append(encode(translator.finish()))
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = None
        if not isinstance(chunk, dict):
            out.append(raw)
            continue
        try:
            out.append(encode(translator.feed(chunk)))
        except _UNREADABLE:
            out.append(raw)  # an Anthropic reader cannot read it either: the relay says so
    return b"".join(out)
