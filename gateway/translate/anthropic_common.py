"""What both Anthropic translations share: errors, usage, stop reasons, tool arguments, SSE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from pricing.usage import read_openai_usage

# Anthropic's error types and the HTTP status each comes with (its errors page).
ANTHROPIC_ERROR_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_STATUS_ERROR_TYPE = {status: kind for kind, status in ANTHROPIC_ERROR_STATUS.items()}
_STATUS_ERROR_TYPE[503] = "overloaded_error"

# Anthropic error type → OpenAI's `type`; the Anthropic type itself goes in `code`.
_OPENAI_ERROR_TYPE = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "billing_error": "insufficient_quota",
    "permission_error": "permission_error",
    "not_found_error": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "rate_limit_error": "rate_limit_error",
}

# stop_reason → finish_reason; an unknown future reason reads as a normal stop.
FINISH_REASONS: Mapping[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
STOP_REASONS: Mapping[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

RAW_ARGUMENTS = "_raw_arguments"  # where tool arguments that are not a JSON object are kept
DONE = b"data: [DONE]\n\n"


class TranslationError(ValueError):
    """A request the other API cannot express: answered 400 invalid_request_error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --- errors ------------------------------------------------------------------------------


def anthropic_error_type(status: int) -> str:
    """The Anthropic error type for an HTTP status (Anthropic uses invalid_request_error
    for 4xx statuses it does not list; 503 is its overload)."""
    kind = _STATUS_ERROR_TYPE.get(status)
    if kind is not None:
        return kind
    return "api_error" if status >= 500 else "invalid_request_error"


def openai_error(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error(message: str, kind: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_message(body: Any, raw: bytes = b"") -> tuple[str | None, str | None]:
    """(type, message) from an Anthropic or OpenAI error body, whichever it is; for a body
    that is neither (an HTML page from a proxy), no type and the start of the text."""
    err = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(err, Mapping):
        kind = err.get("type")
        message = err.get("message")
        return (
            kind if isinstance(kind, str) else None,
            message if isinstance(message, str) else None,
        )
    text = raw[:500].decode("utf-8", "replace").strip()
    return None, text or None


def openai_error_from_anthropic(status: int | None, body: Any, raw: bytes = b"") -> dict[str, Any]:
    """An Anthropic error body (or any body with an error status) → OpenAI's error shape.

    `type` is OpenAI's name for the class (server_error for 5xx), `code` the Anthropic
    error type, so nothing is lost. `status` None: an `error` event inside a stream."""
    kind, message = error_message(body, raw)
    if kind is None:  # not an error body at all: the status says what it is
        kind = anthropic_error_type(status or 500)
    server_side = (status or ANTHROPIC_ERROR_STATUS.get(kind, 500)) >= 500
    openai_kind = "server_error" if server_side else _OPENAI_ERROR_TYPE.get(kind, kind)
    return openai_error(message or f"Anthropic answered HTTP {status}.", openai_kind, kind)


def anthropic_error_from_openai(status: int | None, body: Any, raw: bytes = b"") -> dict[str, Any]:
    """An OpenAI error body → Anthropic's error shape, the type from the status (or, inside
    a stream, from the error's own code or type when it is an Anthropic type)."""
    err = body.get("error") if isinstance(body, Mapping) else None
    _, message = error_message(body, raw)
    kind = None
    if isinstance(err, Mapping):
        for name in (err.get("code"), err.get("type")):
            if isinstance(name, str) and name in ANTHROPIC_ERROR_STATUS:
                kind = name
                break
    if status is not None:
        by_status = anthropic_error_type(status)
        # the body's own Anthropic type wins only where it agrees with the status class
        if kind is None or ANTHROPIC_ERROR_STATUS[kind] // 100 != status // 100:
            kind = by_status
    return anthropic_error(message or f"The upstream answered HTTP {status}.", kind or "api_error")


# --- usage -------------------------------------------------------------------------------


def _count(value: Any) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _sum(*values: Any) -> Any:
    """The sum of counts; a value that is not a count is returned as it is, so the usage
    reader downstream (pricing.usage) sees it and names the anomaly."""
    for value in values:
        if not _count(value):
            return value
    return sum(v for v in values if v is not None)


def openai_usage(u: Any) -> dict[str, Any]:
    """Anthropic usage → OpenAI usage. Anthropic's input_tokens exclude cache reads and
    writes; OpenAI's prompt_tokens include them, with the reads in
    prompt_tokens_details.cached_tokens. Writes go in a top-level
    cache_creation_input_tokens, which pricing.usage prices at the cache-write rate."""
    if not isinstance(u, Mapping):
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    read = u.get("cache_read_input_tokens")
    written = u.get("cache_creation_input_tokens")
    prompt = _sum(u.get("input_tokens"), read, written)
    completion = u.get("output_tokens")
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion or 0}
    total = _sum(prompt, completion) if _count(prompt) else None
    if total is not None and _count(total):
        out["total_tokens"] = total
    out["prompt_tokens_details"] = {"cached_tokens": read or 0}
    out["cache_creation_input_tokens"] = written or 0
    return out


def anthropic_usage(u: Any) -> dict[str, int]:
    """OpenAI usage (any variant pricing.usage reads) → Anthropic usage, input_tokens
    without the cache reads and writes."""
    usage = read_openai_usage(u).usage
    read, written = usage.cache_read_input_tokens, usage.cache_creation_input_tokens
    return {
        "input_tokens": max(usage.input_tokens - read - written, 0),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": read,
        "output_tokens": usage.output_tokens,
    }


# --- tool arguments, SSE -----------------------------------------------------------------


def parse_arguments(raw: Any) -> dict[str, Any]:
    """OpenAI's tool-call arguments (a JSON string) → Anthropic's tool input (an object).
    Empty → {}; a JSON object → itself; anything else (a model's truncated JSON sent back
    in the history) → {"_raw_arguments": raw}: kept for the model to see, never dropped."""
    if isinstance(raw, Mapping):
        return dict(raw)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    try:
        value = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError):
        value = None
    return value if isinstance(value, dict) else {RAW_ARGUMENTS: raw}


def dump_arguments(value: Any) -> str:
    """Anthropic's tool input → OpenAI's arguments string (compact JSON)."""
    if (
        isinstance(value, dict)
        and set(value) == {RAW_ARGUMENTS}
        and isinstance(value[RAW_ARGUMENTS], str)
    ):
        return str(value[RAW_ARGUMENTS])  # the round trip of parse_arguments
    return orjson.dumps(value if value is not None else {}).decode()


def sse_data(obj: Any) -> bytes:
    """One OpenAI-style event: `data: <json>`."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def sse_event(name: str, data: Any) -> bytes:
    """One Anthropic-style event: `event: <name>` and `data: <json>`."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def event_name(raw: bytes) -> str | None:
    """The `event:` field of one raw SSE event, if it has one."""
    for line in raw.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip().decode("utf-8", "replace")
    return None
