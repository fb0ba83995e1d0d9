"""Client-controlled strings on their way to telemetry: through the redactor first.

A client chooses strings that telemetry copies to spans, the access log and OTLP logs:
the model it asks for, its user agent, the W3C `tracestate`, a few body fields (stop
sequences, service tier, encoding format) and error messages that quote them. Each goes
through the redactor once per request before any of those. Configured model names are
trusted config and skip it (a set lookup); values that repeat from request to request
(user agents, `"base64"`) are remembered, so the common case costs a dict hit.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from opentelemetry.trace import SpanContext
from opentelemetry.trace.span import TraceState

from gateway.pipeline.context import RequestContext

Redact = Callable[[Any], tuple[Any, dict[str, int]]]

WITHHELD = "[WITHHELD]"  # what is exported in place of a value the redactor failed on
MEMO_SIZE = 1024  # remembered values, at most; the memo starts over when full
MEMO_MAX_CHARS = 256  # longer values are redacted each time, never remembered


class Scrubber:
    """Redacts client strings for telemetry, counting what it masks in ctx.redactions.
    `on_error` is called when the redactor raises (the value is then WITHHELD)."""

    __slots__ = ("_memo", "_on_error", "_redact", "_trusted")

    def __init__(
        self, redact: Redact, trusted: Collection[str], on_error: Callable[[], None]
    ) -> None:
        self._redact = redact
        self._trusted = frozenset(trusted)
        self._on_error = on_error
        self._memo: dict[str, tuple[str, dict[str, int]]] = {}

    def __call__(self, ctx: RequestContext, value: str) -> str:
        found = self._memo.get(value)
        if found is None:
            try:
                found = self._redact(value)
            except Exception:
                self._on_error()
                return WITHHELD
            if len(value) <= MEMO_MAX_CHARS:
                if len(self._memo) >= MEMO_SIZE:
                    self._memo.clear()
                self._memo[value] = found
        safe, counts = found
        for kind, n in counts.items():
            ctx.redactions[kind] = ctx.redactions.get(kind, 0) + n
        return safe

    def model(self, ctx: RequestContext, name: str | None) -> str | None:
        """A model name: as it is when configured, else redacted."""
        if not name or name in self._trusted:
            return name
        return self(ctx, name)

    def optional(self, ctx: RequestContext, value: str | None) -> str | None:
        return None if value is None else self(ctx, value)

    def attributes(self, ctx: RequestContext, attributes: Mapping[str, Any]) -> dict[str, Any]:
        """Span attributes taken from the client's body: strings and tuples of strings
        redacted, numbers as they are."""
        out: dict[str, Any] = {}
        for key, value in attributes.items():
            if isinstance(value, str):
                value = self(ctx, value)
            elif isinstance(value, tuple) and value and isinstance(value[0], str):
                value = tuple(self(ctx, v) for v in value)
            out[key] = value
        return out

    def parent(self, ctx: RequestContext, parent: SpanContext) -> SpanContext:
        """An incoming parent without the `tracestate` entries the redactor finds
        anything in: the state is copied to our spans and sent upstream."""
        state = parent.trace_state
        if not state:
            return parent
        entries = [(k, v) for k, v in state.items() if self(ctx, f"{k}={v}") == f"{k}={v}"]
        if len(entries) == len(state):
            return parent
        return SpanContext(
            parent.trace_id,
            parent.span_id,
            is_remote=parent.is_remote,
            trace_flags=parent.trace_flags,
            trace_state=TraceState(entries),
        )
