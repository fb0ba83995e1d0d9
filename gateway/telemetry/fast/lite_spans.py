"""The gateway's own spans: recorded as plain data, handed to the span processor as SDK
ReadableSpans when they end.

The SDK's live Span validates and copies every attribute under a lock as it is set, and
starting one asks a sampler and a metrics hook: ~30 µs for a span with two dozen
attributes, against ~3 µs to build the same ReadableSpan at the end. The gateway makes
two spans per request and knows every attribute it sets (gateway/telemetry/semconv.py
builds them from typed values), so it records them itself. What reaches processors and
exporters is the SDK's own ReadableSpan, exactly what a live span would have produced;
ids, sampling (the SDK's default inline, any other sampler asked), trace flags, span
limits (OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT, OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT, ...: the
SDK's own BoundedAttributes once a limit can bind) and the processor's on_start follow
the SDK. One deliberate difference: an attribute set to None is left out (the SDK 1.45
stores it), because the gateway's attribute builders use None for "absent".

With `telemetry.fast_path: false` the same API is served by PlainTracer: the SDK's own
Tracer and spans. Spans made by other instrumentation (the httpx one, with
`telemetry.http_spans`) always go through the SDK's TracerProvider and the same processor.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, cast

from opentelemetry import context as otel_context
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import DEFAULT_ON, Sampler
from opentelemetry.sdk.util import BoundedList
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
    Tracer,
    set_span_in_context,
)

_UNSET = Status(StatusCode.UNSET)
# W3C trace context level 2 "random trace id" flag, set by the SDK on ids it generates
_RANDOM = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
_getrandbits = random.getrandbits
# on_start methods that do nothing: not called, so the default processors cost nothing more
_NOOP_ON_START = frozenset(
    (SpanProcessor.on_start, SimpleSpanProcessor.on_start, BatchSpanProcessor.on_start)
)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """As the SDK stores them: None dropped, lists as tuples."""
    out = {}
    for key, value in attributes.items():
        if value is None:
            continue
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _parent_context(parent: SpanContext | None) -> otel_context.Context:
    """What the SDK hands on_start as parent_context: a Context whose span is the parent."""
    if parent is None:
        return otel_context.Context()
    return set_span_in_context(NonRecordingSpan(parent))


class LiteTracer:
    """Starts LiteSpans. Without a processor nothing is recorded, but spans still get ids
    (for the access log and the upstream traceparent)."""

    def __init__(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        processor: SpanProcessor | None,
        sampler: Sampler | None = None,
        limits: SpanLimits | None = None,
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.processor = processor
        # the SDK's default (parent-based, always on at the root) is decided inline; any
        # other (OTEL_TRACES_SAMPLER, e.g. parentbased_traceidratio) is asked, as the SDK does
        self.sampler = None if sampler is None or sampler is DEFAULT_ON else sampler
        self.on_start: Callable[..., None] | None = None
        if processor is not None and type(processor).on_start not in _NOOP_ON_START:
            self.on_start = processor.on_start
        # the TracerProvider's default limits are read from the environment the same way
        self.limits = limits = limits if limits is not None else SpanLimits()
        self.max_attributes: int | None = limits.max_span_attributes
        self.max_value_len: int | None = limits.max_span_attribute_length

    def bounded(self, attributes: Mapping[str, Any] | None) -> BoundedAttributes:
        """The SDK's own container for a span's attributes, with this tracer's limits."""
        return BoundedAttributes(
            self.max_attributes, attributes, immutable=False, max_value_len=self.max_value_len
        )

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
            sampled = result.decision.is_sampled()  # type: ignore[no-untyped-call]
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
        span = LiteSpan(self, name, kind, context, parent, attributes, start_time, recording)
        if recording and self.on_start is not None:
            self.on_start(span, parent_context=_parent_context(parent))
        return span


class LiteSpan:
    """The subset of the Span API the gateway uses, recording into plain fields; read
    like a ReadableSpan (for a processor's on_start)."""

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
        # a plain dict while no limit can bind (the SDK's BoundedAttributes from then on)
        self._attributes: dict[str, Any] | BoundedAttributes = {}
        if recording:
            cleaned = _clean(attributes) if attributes else {}
            limit = tracer.max_attributes
            if tracer.max_value_len is not None or (limit is not None and len(cleaned) > limit):
                self._attributes = tracer.bounded(cleaned)
            else:
                self._attributes = cleaned
        self._start = start_time
        self._status = _UNSET
        self._events: BoundedList[Event] | None = None
        self.end_time: int | None = None

    # -- read, as a ReadableSpan --

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> SpanKind:
        return self._kind

    @property
    def context(self) -> SpanContext:
        return self._context

    @property
    def parent(self) -> SpanContext | None:
        return self._parent

    @property
    def start_time(self) -> int:
        return self._start

    @property
    def attributes(self) -> Mapping[str, Any]:
        return MappingProxyType(self._attributes)

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events) if self._events is not None else ()

    @property
    def status(self) -> Status:
        return self._status

    @property
    def resource(self) -> Resource:
        return self._tracer.resource

    @property
    def instrumentation_scope(self) -> InstrumentationScope:
        return self._tracer.scope

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._recording and self.end_time is None

    # -- write --

    def set_attribute(self, key: str, value: Any) -> None:
        if not self.is_recording() or value is None:
            return
        attrs = self._attributes
        if type(attrs) is dict:
            if key in attrs:
                del attrs[key]  # the SDK moves a key set again to the end
            elif (limit := self._tracer.max_attributes) is not None and len(attrs) >= limit:
                attrs = self._attributes = self._tracer.bounded(attrs)
            value = tuple(value) if isinstance(value, list) else value
        attrs[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self.is_recording():
            return
        cleaned = _clean(attributes)
        attrs = self._attributes
        if type(attrs) is dict:
            before = len(attrs)
            limit = self._tracer.max_attributes
            if limit is not None and before + len(cleaned) > limit:  # it could evict
                attrs = self._attributes = self._tracer.bounded(attrs)
            else:
                attrs.update(cleaned)
                if len(attrs) != before + len(cleaned):
                    for key in cleaned:  # some were set again: last, in this order, as the SDK
                        attrs[key] = attrs.pop(key)
                return
        attrs.update(cleaned)  # BoundedAttributes: the SDK's own rules

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if not self.is_recording():
            return
        limits = self._tracer.limits
        if self._events is None:
            self._events = BoundedList(limits.max_events)
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            _clean(attributes) if attributes else None,
            immutable=True,
            max_value_len=limits.max_attribute_length,
        )
        self._events.append(Event(name, bounded, timestamp))

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
                events=self._events if self._events is not None else (),
            )
        )


# --- telemetry.fast_path: false ------------------------------------------------------------


class PlainTracer:
    """LiteTracer's API over the SDK's own Tracer: live SDK spans, the TracerProvider's
    sampler, limits and processors, nothing private."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def start_span(
        self,
        name: str,
        *,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: Mapping[str, Any] | None,
        start_time: int,
    ) -> PlainSpan:
        # an empty Context for a root: never the ambient current span
        context = _parent_context(parent if parent is not None and parent.is_valid else None)
        span = self._tracer.start_span(
            name,
            context=context,
            kind=kind,
            attributes=_clean(attributes) if attributes else None,
            start_time=start_time,
        )
        return PlainSpan(span)


class PlainSpan:
    """An SDK span behind LiteSpan's API: None values left out (as LiteSpan does), and
    calls after the end ignored instead of logged."""

    __slots__ = ("span",)

    def __init__(self, span: Any) -> None:
        self.span = span

    def get_span_context(self) -> SpanContext:
        return cast(SpanContext, self.span.get_span_context())

    def is_recording(self) -> bool:
        return bool(self.span.is_recording())

    def set_attribute(self, key: str, value: Any) -> None:
        if value is not None and self.span.is_recording():
            self.span.set_attribute(key, value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self.span.is_recording():
            self.span.set_attributes(_clean(attributes))

    def add_event(
        self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None
    ) -> None:
        if self.span.is_recording():
            self.span.add_event(name, _clean(attributes) if attributes else None, timestamp)

    def set_status(self, status: Status) -> None:
        if self.span.is_recording():
            self.span.set_status(status)

    def end(self, end_time: int) -> None:
        if self.span.is_recording():
            self.span.end(end_time=end_time)
