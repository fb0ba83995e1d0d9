"""LiteTracer / LiteSpan: the gateway's own spans reach processors as the SDK's would."""

from __future__ import annotations

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
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
    set_span_in_context,
)

from gateway.lite_spans import LiteTracer

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

    from gateway.telemetry import Telemetry, TelemetryConfig
    from tests.test_telemetry import request, serve

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
