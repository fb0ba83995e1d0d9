"""The gateway's own spans: recorded as plain data, handed to the span processor as SDK
ReadableSpans when they end.

The SDK's live Span validates and copies every attribute under a lock as it is set, and
starting one asks a sampler and a metrics hook: ~30 µs for a span with two dozen
attributes, against ~3 µs to build the same ReadableSpan at the end. The gateway makes
two spans per request and knows every attribute it sets (gateway/genai_attributes.py
builds them from typed values), so it records them itself. What reaches processors and
exporters is the SDK's own ReadableSpan, exactly what a live span would have produced;
ids, sampling (the SDK's default inline, any other sampler asked) and trace flags follow
the SDK.

Spans made by other instrumentation (the httpx one, with `telemetry.http_spans`) still go
through the SDK's TracerProvider and the same processor.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.sampling import DEFAULT_ON, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN_ID,
    INVALID_TRACE_ID,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

_UNSET = Status(StatusCode.UNSET)
# W3C trace context level 2 "random trace id" flag, set by the SDK on ids it generates
_RANDOM = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
_getrandbits = random.getrandbits


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """As the SDK stores them: None dropped, lists as tuples."""
    out = {}
    for key, value in attributes.items():
        if value is None:
            continue
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


class LiteTracer:
    """Starts LiteSpans. Without a processor nothing is recorded, but spans still get ids
    (for the access log and the upstream traceparent)."""

    def __init__(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        processor: SpanProcessor | None,
        sampler: Sampler | None = None,
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.processor = processor
        # the SDK's default (parent-based, always on at the root) is decided inline; any
        # other (OTEL_TRACES_SAMPLER, e.g. parentbased_traceidratio) is asked, as the SDK does
        self.sampler = None if sampler is None or sampler is DEFAULT_ON else sampler

    def start_span(
        self,
        name: str,
        *,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, Any] | None,
        start_time: int,
    ) -> LiteSpan:
        if parent is not None and parent.is_valid:
            trace_id = parent.trace_id
            sampled = bool(parent.trace_flags & TraceFlags.SAMPLED)
            flags = parent.trace_flags & _RANDOM
            trace_state = parent.trace_state
        else:
            parent = None
            trace_id = _getrandbits(128)
            while trace_id == INVALID_TRACE_ID:
                trace_id = _getrandbits(128)
            sampled = True
            flags = _RANDOM
            trace_state = None
        if self.sampler is not None:
            result = self.sampler.should_sample(
                set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None,
                trace_id, name, kind, attributes,
            )  # fmt: skip
            sampled = result.decision.is_sampled()
            trace_state = result.trace_state
            if result.attributes:
                attributes = {**(attributes or {}), **result.attributes}
        recording = sampled and self.processor is not None
        if recording:
            flags |= TraceFlags.SAMPLED
        span_id = _getrandbits(64)
        while span_id == INVALID_SPAN_ID:
            span_id = _getrandbits(64)
        context = SpanContext(
            trace_id, span_id, is_remote=False, trace_flags=TraceFlags(flags),
            trace_state=trace_state,
        )  # fmt: skip
        return LiteSpan(self, name, kind, context, parent, attributes, start_time, recording)


class LiteSpan:
    """The subset of the Span API the gateway uses, recording into plain fields."""

    __slots__ = (
        "_attributes", "_context", "_events", "_kind", "_name", "_parent", "_recording",
        "_start", "_status", "_tracer", "end_time",
    )  # fmt: skip

    def __init__(
        self,
        tracer: LiteTracer,
        name: str,
        kind: SpanKind,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: Mapping[str, Any] | None,
        start_time: int,
        recording: bool,
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._kind = kind
        self._context = context
        self._parent = parent
        self._recording = recording
        self._attributes = _clean(attributes) if recording and attributes else {}
        self._start = start_time
        self._status = _UNSET
        self._events: list[Event] = []
        self.end_time: int | None = None

    @property
    def name(self) -> str:
        return self._name

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._recording and self.end_time is None

    def set_attribute(self, key: str, value: Any) -> None:
        if self.is_recording() and value is not None:
            self._attributes[key] = tuple(value) if isinstance(value, list) else value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self.is_recording():
            self._attributes.update(_clean(attributes))

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if self.is_recording():
            self._events.append(Event(name, _clean(attributes) if attributes else None, timestamp))

    def set_status(self, status: Status) -> None:
        # as the SDK: OK is final; an UNSET status never replaces another
        if not self.is_recording() or self._status.status_code is StatusCode.OK:
            return
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def end(self, end_time: int) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time
        tracer = self._tracer
        if not self._recording or tracer.processor is None:
            return
        tracer.processor.on_end(
            ReadableSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=tracer.resource,
                attributes=self._attributes,
                kind=self._kind,
                status=self._status,
                start_time=self._start,
                end_time=end_time,
                instrumentation_scope=tracer.scope,
                events=tuple(self._events),
            )
        )
