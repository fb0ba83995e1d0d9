"""The access log: one line per request (JSON, or logfmt text), with its trace and span ids.

The line never carries content (prompts, completions) nor an API key: only the key's
name from config. The client's own strings in it (the model it asked for, an error
message quoting it) come in already redacted (`ClientStrings`); the request id was
checked on arrival (gateway/pipeline/request_ids.py). It is written with a single write() so
concurrent requests (and workers sharing stdout) never interleave within a line.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import orjson

from gateway.iso_time import iso_utc
from gateway.pipeline.context import RequestContext
from pricing.cost import format_usd

FIELDS = (
    "timestamp",
    "request_id",
    "trace_id",
    "span_id",
    "method",
    "path",
    "team",
    "key",
    "model",
    "deployment",
    "upstream_model",
    "status",
    "latency_ms",
    "ttft_ms",
    "attempts",
    "input_tokens",
    "output_tokens",
    "tokens_estimated",
    "cost_usd",
    "overhead_ms",
    "error_type",
    "error_message",  # redacted: it may quote the prompt or the model asked for
    "cancelled",
)


@dataclass(frozen=True, slots=True)
class ClientStrings:
    """The line's fields that a client controls, after the redactor (gateway.telemetry.record)."""

    model: str | None
    error_message: str | None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def access_record(
    ctx: RequestContext,
    *,
    trace_id: str | None,
    span_id: str | None,
    end_unix: float,
    latency_s: float,
    ttft_s: float | None,
    overhead_ms: float,
    client: ClientStrings | None = None,
) -> dict[str, Any]:
    """The access line's fields, in FIELDS order. The figures come from the request's
    telemetry record, which computed them once for every signal: `end_unix` (the
    timestamp), `latency_s`, `ttft_s`, `overhead_ms`. `client`: the redacted model and
    error message; None takes ctx's as they are (for callers whose ctx holds no client
    input)."""
    if client is None:
        client = ClientStrings(ctx.requested_model, ctx.error_message)
    principal = ctx.principal
    attempt = ctx.attempt
    usage = ctx.usage
    cost = ctx.cost_nano
    return {
        "timestamp": iso_utc(end_unix, ms=True),
        "request_id": ctx.request_id,
        "trace_id": trace_id,
        "span_id": span_id,
        "method": ctx.method,
        "path": ctx.path,
        "team": principal.team if principal else None,
        "key": principal.key_name if principal else None,
        "model": client.model,
        "deployment": attempt.deployment if attempt else None,
        "upstream_model": attempt.upstream_model if attempt else None,
        "status": ctx.status,
        "latency_ms": _ms(latency_s),
        "ttft_ms": _ms(ttft_s),
        "attempts": len(ctx.attempts),
        "input_tokens": usage.input_tokens if usage else None,
        "output_tokens": usage.output_tokens if usage else None,
        "tokens_estimated": usage.estimated if usage else None,
        "cost_usd": None if cost is None else format_usd(cost, fixed=True),  # as documented
        "overhead_ms": overhead_ms,
        "error_type": ctx.error_type,
        "error_message": client.error_message,
        "cancelled": ctx.cancelled,
    }


def format_json(record: dict[str, Any]) -> str:
    return orjson.dumps(record).decode() + "\n"


_NEEDS_QUOTES = frozenset(' "=\\\n\t')


def _logfmt_value(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    text = str(value)
    if not text or not _NEEDS_QUOTES.isdisjoint(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def format_text(record: dict[str, Any]) -> str:
    """logfmt: `key=value` pairs, empty fields left out, values quoted when needed."""
    return " ".join(f"{k}={_logfmt_value(v)}" for k, v in record.items() if v is not None) + "\n"


class AccessLog:
    """Writes access records to a text stream, one whole line per record.

    To an OS file (stdout) on a running loop, lines are gathered and written together at
    most every FLUSH_DELAY_S (one write and one flush per batch instead of per line: a
    syscall costs ~0.1 ms here); they still leave within 50 ms, whole and in order. Without a
    loop, or to an in-memory stream, each is written at once."""

    FLUSH_DELAY_S = 0.05
    __slots__ = ("_batch", "_format", "_pending", "_stream")

    def __init__(self, stream: TextIO, log_format: Literal["json", "text"] = "json") -> None:
        self._stream = stream
        self._format = format_json if log_format == "json" else format_text
        self._pending: list[str] = []
        self._batch = _is_os_file(stream)

    def write(self, record: dict[str, Any]) -> str:
        line = self._format(record)
        if self._pending:
            self._pending.append(line)
            return line
        try:
            loop = asyncio.get_running_loop() if self._batch else None
        except RuntimeError:
            loop = None
        if loop is None:  # no loop (a CLI), or an in-memory stream: write now
            self._emit(line)
            return line
        self._pending.append(line)
        loop.call_later(self.FLUSH_DELAY_S, self.flush)
        return line

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if lines:
            self._emit("".join(lines))

    def _emit(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stdout must not fail anything
            pass


def _is_os_file(stream: TextIO) -> bool:
    try:
        stream.fileno()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return False
    return True
