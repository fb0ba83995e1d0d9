"""LiteTracer / LiteSpan: the gateway's own spans reach processors as the SDK's would,
within the same span limits and after the same on_start."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)

from gateway.telemetry.fast.lite_spans import LiteTracer, PlainTracer

RESOURCE = Resource.create({"service.name": "t"})
SCOPE = InstrumentationScope("tallygate", "1.0")
REMOTE = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    is_remote=True,
    trace_flags=TraceFlags(1),
    trace_state=TraceState([("vendor", "x1")]),
)
ATTRS = {"s": "x", "n": 3, "f": 0.5, "b": False, "list": ["stop"], "gone": None}


def tracer() -> tuple[LiteTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return LiteTracer(RESOURCE, SCOPE, SimpleSpanProcessor(exporter)), exporter


def test_a_root_span_reaches_the_processor_as_a_readable_span() -> None:
    t, exporter = tracer()
    span = t.start_span("POST /v1/x", parent=None, kind=SpanKind.SERVER, attributes=ATTRS,
                        start_time=100)  # fmt: skip
    assert span.is_recording()
    span.set_attribute("late", 7)
    span.set_attributes({"more": ["a", "b"], "skip": None})
    span.set_status(Status(StatusCode.ERROR, "boom"))
    span.end(end_time=250)
    assert not span.is_recording()
    span.set_attribute("after", 1)  # ignored once ended
    span.end(end_time=999)  # and ending twice reports once
    [done] = exporter.get_finished_spans()
    assert isinstance(done, ReadableSpan)
    assert done.name == "POST /v1/x" and done.kind is SpanKind.SERVER
    assert dict(done.attributes) == {
        "s": "x", "n": 3, "f": 0.5, "b": False, "list": ("stop",), "late": 7,
        "more": ("a", "b"),
    }  # fmt: skip
    assert (done.start_time, done.end_time) == (100, 250)
    assert done.status.status_code is StatusCode.ERROR and done.status.description == "boom"
    assert done.parent is None and done.resource is RESOURCE
    assert done.instrumentation_scope == SCOPE
    ctx = done.context
    assert ctx.trace_id and ctx.span_id and not ctx.is_remote
    assert ctx.trace_flags.sampled


def test_a_child_continues_the_remote_parent() -> None:
    t, exporter = tracer()
    t.start_span("c", parent=REMOTE, kind=SpanKind.CLIENT, attributes=None, start_time=1).end(2)
    [done] = exporter.get_finished_spans()
    assert done.context.trace_id == REMOTE.trace_id and done.context.span_id != REMOTE.span_id
    assert done.parent == REMOTE and done.parent.is_remote
    assert done.context.trace_state == REMOTE.trace_state
    assert done.context.trace_flags == TraceFlags(1)  # the parent's id is not "random"


def test_an_unsampled_parent_or_no_processor_records_nothing_but_has_ids() -> None:
    t, exporter = tracer()
    unsampled = SpanContext(REMOTE.trace_id, REMOTE.span_id, True, TraceFlags(0))
    span = t.start_span("c", parent=unsampled, kind=SpanKind.CLIENT, attributes=ATTRS,
                        start_time=1)  # fmt: skip
    assert not span.is_recording() and not span.get_span_context().trace_flags.sampled
    assert span.get_span_context().trace_id == REMOTE.trace_id
    span.end(end_time=2)
    off = LiteTracer(RESOURCE, SCOPE, None)
    root = off.start_span("r", parent=None, kind=SpanKind.SERVER, attributes=ATTRS, start_time=1)
    assert not root.is_recording() and root.get_span_context().is_valid
    root.end(end_time=2)
    assert exporter.get_finished_spans() == ()


def test_status_follows_the_sdk_rules() -> None:
    t, exporter = tracer()
    span = t.start_span("s", parent=None, kind=SpanKind.CLIENT, attributes=None, start_time=1)
    span.set_status(Status(StatusCode.ERROR, "first"))
    span.set_status(Status(StatusCode.UNSET))  # never clears
    assert span._status.description == "first"
    span.set_status(Status(StatusCode.OK))
    span.set_status(Status(StatusCode.ERROR, "late"))  # OK is final
    span.end(end_time=2)
    assert exporter.get_finished_spans()[0].status.status_code is StatusCode.OK


def test_the_same_span_as_the_sdk_makes() -> None:
    attrs = {k: v for k, v in ATTRS.items() if v is not None}  # (None: we drop it, see above)
    sdk_exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(SimpleSpanProcessor(sdk_exporter))
    sdk_span = provider.get_tracer("tallygate", "1.0").start_span(
        "chat m", context=set_span_in_context(NonRecordingSpan(REMOTE)),
        kind=SpanKind.CLIENT, attributes=attrs, start_time=10,
    )  # fmt: skip
    sdk_span.set_attributes({"k": [1, 2]})
    sdk_span.set_status(Status(StatusCode.ERROR, "e"))
    sdk_span.end(end_time=20)
    t, exporter = tracer()
    lite = t.start_span("chat m", parent=REMOTE, kind=SpanKind.CLIENT, attributes=attrs,
                        start_time=10)  # fmt: skip
    lite.set_attributes({"k": [1, 2]})
    lite.set_status(Status(StatusCode.ERROR, "e"))
    lite.end(end_time=20)
    [theirs], [ours] = sdk_exporter.get_finished_spans(), exporter.get_finished_spans()
    assert dict(ours.attributes) == dict(theirs.attributes)
    for field in ("name", "kind", "parent", "start_time", "end_time", "events", "links"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.context.trace_id == theirs.context.trace_id
    assert ours.context.trace_flags == theirs.context.trace_flags
    assert ours.context.trace_state == theirs.context.trace_state
    assert (ours.status.status_code, ours.status.description) == (
        theirs.status.status_code,
        theirs.status.description,
    )
    assert ours.instrumentation_scope.name == theirs.instrumentation_scope.name
    assert ours.instrumentation_scope.version == theirs.instrumentation_scope.version


def test_a_configured_sampler_is_asked() -> None:
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    never = LiteTracer(RESOURCE, SCOPE, processor, ParentBased(TraceIdRatioBased(0.0)))
    root = never.start_span("r", parent=None, kind=SpanKind.SERVER, attributes=ATTRS,
                            start_time=1)  # fmt: skip
    assert not root.is_recording() and root.get_span_context().is_valid
    # parent-based: a sampled remote parent is followed whatever the root ratio
    child = never.start_span("c", parent=REMOTE, kind=SpanKind.CLIENT, attributes=None,
                             start_time=1)  # fmt: skip
    assert child.is_recording() and child.get_span_context().trace_flags.sampled
    root.end(end_time=2)
    child.end(end_time=2)
    assert [s.name for s in exporter.get_finished_spans()] == ["c"]


def test_telemetry_honours_otel_traces_sampler(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import io

    from gateway.telemetry.facade import Telemetry, TelemetryConfig
    from tests.telemetry_helpers import request, serve

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    spans = InMemorySpanExporter()
    tel = Telemetry.create(
        TelemetryConfig(exporter="none"), service_version="t", span_exporter=spans,
        access_log=io.StringIO(),
    )  # fmt: skip
    ctx = request()
    serve(tel, ctx, {})
    assert spans.get_finished_spans() == ()  # sampled out at the root
    assert ctx.trace.span.get_span_context().is_valid  # still ids for the access log


# --- span limits and on_start, against the SDK's own spans -------------------------------


def side_by_side(
    script: Callable[[Any], None],
    attributes: dict[str, Any] | None = None,
    limits: SpanLimits | None = None,
) -> tuple[ReadableSpan, ReadableSpan]:
    """The same calls on an SDK span and on a lite span with the same limits (None: from
    the environment, as both read it): (theirs, ours) as their processors got them."""
    sdk_exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=RESOURCE, span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(sdk_exporter))
    sdk_span = provider.get_tracer("tallygate", "1.0").start_span(
        "s", context=set_span_in_context(NonRecordingSpan(REMOTE)), kind=SpanKind.CLIENT,
        attributes=attributes, start_time=1,
    )  # fmt: skip
    script(sdk_span)
    sdk_span.end(end_time=2)
    exporter = InMemorySpanExporter()
    lite = LiteTracer(RESOURCE, SCOPE, SimpleSpanProcessor(exporter), limits=limits)
    span = lite.start_span("s", parent=REMOTE, kind=SpanKind.CLIENT, attributes=attributes,
                           start_time=1)  # fmt: skip
    script(span)
    span.end(end_time=2)
    [theirs], [ours] = sdk_exporter.get_finished_spans(), exporter.get_finished_spans()
    return theirs, ours


def test_the_value_length_limit_from_the_environment_truncates_as_the_sdk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "5")

    def script(span: Any) -> None:
        span.set_attributes({"late": "0123456789", "words": ["abcdefgh", "xy"], "n": 12345678})
        span.set_attribute("one", "zzzzzzz")

    theirs, ours = side_by_side(script, {"s": "abcdefgh", "ok": "abc", "b": True})
    assert ours.attributes["s"] == "abcde"  # the SDK's own example
    assert list(ours.attributes.items()) == list(theirs.attributes.items())
    assert ours.attributes["words"] == ("abcde", "xy") and ours.attributes["n"] == 12345678
    assert ours.dropped_attributes == theirs.dropped_attributes == 0


def test_the_attribute_count_limit_evicts_the_oldest_as_the_sdk() -> None:
    def script(span: Any) -> None:
        span.set_attributes({"a": 10, "d": 4})  # "a" set again: it moves last, nothing dropped
        span.set_attribute("e", 5)  # full: the oldest ("b") goes
        span.set_attributes({"c": 30, "f": 6, "g": 7})
        span.set_attribute("f", 60)

    limits = SpanLimits(max_span_attributes=4)
    theirs, ours = side_by_side(script, {"a": 1, "b": 2, "c": 3}, limits)
    assert list(ours.attributes.items()) == list(theirs.attributes.items())
    assert list(ours.attributes.items()) == [("e", 5), ("c", 30), ("g", 7), ("f", 60)]
    assert ours.dropped_attributes == theirs.dropped_attributes == 3  # b, a, d
    # under the limit, a key set again also moves last, as the SDK orders it
    theirs, ours = side_by_side(lambda s: s.set_attributes({"a": 9, "z": 0}), {"a": 1, "b": 2})
    assert list(ours.attributes.items()) == list(theirs.attributes.items())
    assert list(ours.attributes) == ["b", "a", "z"]


def test_initial_attributes_over_the_limit_are_bounded_as_the_sdk() -> None:
    limits = SpanLimits(max_span_attributes=2)
    theirs, ours = side_by_side(lambda s: None, {"a": 1, "b": 2, "c": 3}, limits)
    assert dict(ours.attributes) == dict(theirs.attributes) == {"b": 2, "c": 3}
    assert ours.dropped_attributes == theirs.dropped_attributes == 1


def test_event_limits_as_the_sdk() -> None:
    limits = SpanLimits(max_events=2, max_event_attributes=1, max_attribute_length=3)

    def script(span: Any) -> None:
        for i in range(3):
            span.add_event(f"e{i}", {"x": "abcdef", "y": i}, timestamp=10 + i)

    theirs, ours = side_by_side(script, None, limits)
    assert [e.name for e in ours.events] == [e.name for e in theirs.events] == ["e1", "e2"]
    assert ours.dropped_events == theirs.dropped_events == 1
    for mine, sdk in zip(ours.events, theirs.events, strict=True):
        assert dict(mine.attributes) == dict(sdk.attributes)
        assert mine.dropped_attributes == sdk.dropped_attributes == 1
        assert mine.timestamp == sdk.timestamp


class StartRecorder(SimpleSpanProcessor):
    """A processor with an on_start of its own: records what it was given and marks the span."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        super().__init__(exporter)
        self.started: list[tuple[str, Any, Any]] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        parent = get_current_span(parent_context).get_span_context()
        self.started.append((span.name, span.attributes.get("a"), parent.span_id))
        span.set_attribute("from.on_start", span.get_span_context().span_id)


def test_the_processors_on_start_is_called_as_the_sdk_calls_it() -> None:
    results = []
    for lite in (False, True):
        exporter = InMemorySpanExporter()
        processor = StartRecorder(exporter)
        if lite:
            tracer = LiteTracer(RESOURCE, SCOPE, processor)
            span = tracer.start_span("s", parent=REMOTE, kind=SpanKind.CLIENT,
                                     attributes={"a": 1}, start_time=1)  # fmt: skip
        else:
            provider = TracerProvider(resource=RESOURCE)
            provider.add_span_processor(processor)
            span = provider.get_tracer("tallygate", "1.0").start_span(
                "s", context=set_span_in_context(NonRecordingSpan(REMOTE)),
                kind=SpanKind.CLIENT, attributes={"a": 1}, start_time=1,
            )  # fmt: skip
        span.end(end_time=2)
        [done] = exporter.get_finished_spans()
        assert done.attributes["from.on_start"] == done.context.span_id
        results.append(processor.started)
    assert results[0] == results[1] == [("s", 1, REMOTE.span_id)]


def test_the_default_processors_on_start_costs_nothing() -> None:
    # theirs does nothing: not called (the fast path's CPU per span is unchanged)
    assert LiteTracer(RESOURCE, SCOPE, SimpleSpanProcessor(InMemorySpanExporter())).on_start is None
    assert LiteTracer(RESOURCE, SCOPE, StartRecorder(InMemorySpanExporter())).on_start is not None


def test_plain_spans_record_what_lite_spans_record(caplog: pytest.LogCaptureFixture) -> None:
    """telemetry.fast_path: false: the SDK's own spans behind the same API."""

    def script(span: Any) -> None:
        span.set_attribute("late", 7)
        span.set_attribute("none", None)
        span.set_attributes({"more": ["a", "b"], "skip": None})
        span.add_event("tallygate.budget_alert", {"k": 1, "gone": None}, timestamp=11)
        span.set_status(Status(StatusCode.ERROR, "boom"))
        span.end(end_time=20)
        span.end(end_time=30)  # ignored, quietly
        span.set_attribute("after", 1)

    provider = TracerProvider(resource=RESOURCE)
    sdk_exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(sdk_exporter))
    plain = PlainTracer(provider.get_tracer("tallygate", "1.0"))
    t, exporter = tracer()
    for spans in (plain, t):
        script(spans.start_span("chat m", parent=REMOTE, kind=SpanKind.CLIENT,
                                attributes=ATTRS, start_time=10))  # fmt: skip
    [theirs], [ours] = sdk_exporter.get_finished_spans(), exporter.get_finished_spans()
    assert dict(theirs.attributes) == dict(ours.attributes)
    assert "none" not in theirs.attributes and "gone" not in theirs.attributes  # None: left out
    assert (
        [(e.name, dict(e.attributes), e.timestamp) for e in theirs.events]
        == [(e.name, dict(e.attributes), e.timestamp) for e in ours.events]
        == [("tallygate.budget_alert", {"k": 1}, 11)]
    )
    assert (theirs.start_time, theirs.end_time) == (ours.start_time, ours.end_time) == (10, 20)
    assert theirs.parent == ours.parent == REMOTE
    assert theirs.context.trace_id == REMOTE.trace_id
    assert theirs.status.description == ours.status.description == "boom"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_plain_root_span_ignores_the_current_span() -> None:
    provider = TracerProvider(resource=RESOURCE)
    plain = PlainTracer(provider.get_tracer("tallygate", "1.0"))
    with provider.get_tracer("other").start_as_current_span("ambient"):
        root = plain.start_span("r", parent=None, kind=SpanKind.SERVER, attributes=None,
                                start_time=1)  # fmt: skip
    assert root.get_span_context().is_valid
    assert root.span.parent is None  # a new trace, as a lite root span
    root.end(end_time=2)
