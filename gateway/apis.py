"""The inference APIs the gateway serves, and the few things each does its own way.

Every endpoint runs the one pipeline (gateway/pipeline.py); where a stage depends on the
protocol it asks the request's Api rather than which route it came from. Adding an
endpoint (Anthropic's /v1/messages, say) is one more Api here, its route in gateway/app.py,
its observers in gateway/metering.py and, if it needs one, its error shape."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import Response

from gateway.context import RequestContext
from gateway.errors import GatewayError, InvalidRequest
from gateway.metering import (
    ResponsesStreamObserver,
    StreamObserver,
    observe_body,
    observe_response,
)


class Observer(Protocol):
    """Reads a stream event by event (gateway/metering.py has one per protocol)."""

    def chunk(self, data: dict[str, Any]) -> int: ...
    def usage_of(self, data: dict[str, Any]) -> Any: ...
    def error_text(self, data: dict[str, Any]) -> str | None: ...
    def error_event(self, err: GatewayError) -> bytes: ...


def openai_error(exc: GatewayError, headers: Mapping[str, str]) -> Response:
    return exc.to_response(headers)


@dataclass(frozen=True, slots=True)
class Api:
    name: str  # the upstream operation: providers' OPERATION_PATHS key, token counting
    operation: str  # gen_ai.operation.name (semantic conventions' well-known values)
    required: str  # the body field it cannot do without
    required_list: bool = False  # ... which must then be a non-empty list
    streams: bool = True
    # a stream's usage must be asked for (stream_options.include_usage); else it comes anyway
    stream_usage: bool = False
    # the field a team's output cap is sent in when the client named none (None: by model)
    cap_field: str | None = None
    observe_body: Callable[[RequestContext, dict[str, Any]], None] = observe_body
    observer: Callable[[RequestContext], Observer] = StreamObserver
    check: Callable[[dict[str, Any]], None] | None = None  # the protocol's own 400s
    error_response: Callable[[GatewayError, Mapping[str, str]], Response] = openai_error


def check_responses(body: dict[str, Any]) -> None:
    """A background response answers before it has run: its usage would only come from a
    later GET /v1/responses/{id}, which no budget sees. Refused rather than left unmetered."""
    if body.get("background") is True:
        raise InvalidRequest(
            "Background responses are not supported through the gateway: their usage could "
            "not be metered. Send the request without 'background'.",
            param="background",
        )


CHAT = Api("chat", "chat", "messages", required_list=True, stream_usage=True)
TEXT_COMPLETION = Api("text_completion", "text_completion", "prompt", stream_usage=True)
EMBEDDINGS = Api("embeddings", "embeddings", "input", streams=False)
# The Responses API is a chat operation (as OpenAI's own instrumentation names it); the
# route (url.path) tells it apart. Its streams always end with the usage (response.completed).
RESPONSES = Api(
    "responses",
    "chat",
    "input",
    cap_field="max_output_tokens",
    observe_body=observe_response,
    observer=ResponsesStreamObserver,
    check=check_responses,
)

APIS = {api.name: api for api in (CHAT, TEXT_COMPLETION, EMBEDDINGS, RESPONSES)}
