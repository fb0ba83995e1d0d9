"""EncodedSpanProcessor: spans encoded as they end, sent in batches by its thread."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.telemetry.export import ExportHealth, QuietExportLogs
from gateway.telemetry.fast.otlp_spans import FastHTTPSpanExporter
from gateway.telemetry.fast.span_export import EncodedSpanProcessor
from tests.otlp_receiver import OTLPReceiver, dead_endpoint


class RecordingExporter:
    """Stands in for FastHTTPSpanExporter: records what it is asked to send; `gate`, when
    given, holds each encoded export until set; `result` is what every export returns."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.encoded: list[tuple[bytes, int]] = []
        self.official: list[list[ReadableSpan]] = []
        self.gate = gate
        self.entered = threading.Event()
        self.result = SpanExportResult.SUCCESS
        self.shut = False

    def export_encoded(self, data: bytes, count: int) -> SpanExportResult:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.encoded.append((data, count))
        return self.result

    def export(self, spans: Any) -> SpanExportResult:
        self.official.append(list(spans))
        return self.result

    def shutdown(self) -> None:
        self.shut = True


class Drops:
    def __init__(self) -> None:
        self.by_reason: dict[str, int] = {}

    def __call__(self, signal: str, reason: str, count: int) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + count


def make(exporter: Any, drops: Drops, **kwargs: Any) -> tuple[EncodedSpanProcessor, Any, Any]:
    health = ExportHealth("traces", "test", drops, QuietExportLogs())
    processor = EncodedSpanProcessor(
        exporter, health, lambda n: drops("traces", "queue_full", n), **kwargs
    )
    mirror = InMemorySpanExporter()  # the same spans, as the SDK hands them out
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(processor)
    provider.add_span_processor(SimpleSpanProcessor(mirror))
    return processor, provider, mirror


def end_spans(provider: TracerProvider, n: int, scope: str = "scope.a") -> None:
    tracer = provider.get_tracer(scope, "1.0")
    for i in range(n):
        with tracer.start_as_current_span(f"s{i}", kind=SpanKind.CLIENT, attributes={"i": i}):
            pass


def test_a_flushed_batch_is_the_official_encoding_of_the_same_spans() -> None:
    exporter, drops = RecordingExporter(), Drops()
    processor, provider, mirror = make(exporter, drops, schedule_delay_s=60)
    end_spans(provider, 3, "scope.a")
    end_spans(provider, 2, "scope.b")
    assert exporter.encoded == []  # neither full nor due: still queued
    assert processor.force_flush(5000)
    [(data, count)] = exporter.encoded
    assert count == 5
    spans = mirror.get_finished_spans()
    ours = ExportTraceServiceRequest.FromString(data)
    assert ours == ExportTraceServiceRequest.FromString(official(spans).SerializeToString())
    assert [s.scope.name for s in ours.resource_spans[0].scope_spans] == ["scope.a", "scope.b"]
    provider.shutdown()
    assert exporter.shut and drops.by_reason == {}


def test_a_full_batch_goes_out_without_waiting_for_the_timer() -> None:
    exporter, drops = RecordingExporter(), Drops()
    processor, provider, _ = make(exporter, drops, schedule_delay_s=60, max_export_batch_size=4)
    end_spans(provider, 4)
    assert exporter.entered.wait(5)  # the 60 s timer did not have to fire
    assert processor.force_flush(5000)
    assert [count for _, count in exporter.encoded] == [4]
    provider.shutdown()


def test_a_full_queue_drops_and_counts_while_an_export_is_stuck() -> None:
    gate = threading.Event()
    exporter, drops = RecordingExporter(gate), Drops()
    processor, provider, _ = make(
        exporter, drops, schedule_delay_s=60, max_queue_size=3, max_export_batch_size=3
    )
    end_spans(provider, 3)
    assert exporter.entered.wait(5)  # the worker took those 3 and is stuck sending them
    end_spans(provider, 5)  # 3 fit in the queue again, 2 do not
    assert drops.by_reason == {"queue_full": 2}
    gate.set()
    assert processor.force_flush(5000)
    assert [count for _, count in exporter.encoded] == [3, 3]
    second = ExportTraceServiceRequest.FromString(exporter.encoded[1][0])
    names = [s.name for s in second.resource_spans[0].scope_spans[0].spans]
    assert names == ["s2", "s3", "s4"]  # the oldest two of the second wave were dropped
    provider.shutdown()


def test_failed_exports_are_counted_as_dropped() -> None:
    exporter, drops = RecordingExporter(), Drops()
    exporter.result = SpanExportResult.FAILURE
    processor, provider, _ = make(exporter, drops, schedule_delay_s=60)
    end_spans(provider, 2)
    assert processor.force_flush(5000)
    assert drops.by_reason == {"export_failed": 2}
    provider.shutdown()


def test_a_span_the_fast_encoder_refuses_takes_the_official_path() -> None:
    exporter, drops = RecordingExporter(), Drops()
    processor, provider, _ = make(exporter, drops, schedule_delay_s=60)
    encode_span = processor._encoder.encode_span

    def refuse_odd(span: ReadableSpan) -> bytes:
        if span.attributes["i"] % 2:
            raise TypeError("unknown attribute type")
        return encode_span(span)

    processor._encoder.encode_span = refuse_odd  # type: ignore[method-assign]
    end_spans(provider, 4)
    assert processor.force_flush(5000)
    [(_, count)] = exporter.encoded
    [fallback] = exporter.official
    assert count == 2 and [s.name for s in fallback] == ["s1", "s3"]
    provider.shutdown()


def test_shutdown_sends_what_is_queued() -> None:
    exporter, drops = RecordingExporter(), Drops()
    _, provider, _ = make(exporter, drops, schedule_delay_s=60)
    end_spans(provider, 7)
    provider.shutdown()
    assert sum(count for _, count in exporter.encoded) == 7 and exporter.shut


def test_over_http_to_a_receiver() -> None:
    drops = Drops()
    with OTLPReceiver() as rx:
        exporter = FastHTTPSpanExporter(endpoint=rx.endpoint + "/v1/traces", timeout=5)
        assert exporter.fast
        processor, provider, _ = make(exporter, drops, schedule_delay_s=60)
        end_spans(provider, 3)
        assert processor.force_flush(5000)
        received = rx.wait_for_spans(3)
        provider.shutdown()
    assert sorted(s.name for s in received) == ["s0", "s1", "s2"]
    assert {s.attributes["i"] for s in received} == {0, 1, 2}
    assert received[0].resource["service.name"] == "t"
    assert drops.by_reason == {}


def test_a_dead_backend_counts_drops_and_shutdown_returns() -> None:
    drops = Drops()
    exporter = FastHTTPSpanExporter(endpoint=dead_endpoint() + "/v1/traces", timeout=1)
    processor, provider, _ = make(exporter, drops, schedule_delay_s=60)
    end_spans(provider, 2)
    assert processor.force_flush(10_000)
    assert drops.by_reason == {"export_failed": 2}
    provider.shutdown()


def finished_spans(n: int) -> list[ReadableSpan]:
    mirror = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "t"}))
    provider.add_span_processor(SimpleSpanProcessor(mirror))
    end_spans(provider, n)
    provider.shutdown()
    return list(mirror.get_finished_spans())


@pytest.mark.parametrize("limit", [0, -1])
def test_a_non_positive_max_request_size_is_no_limit_as_in_the_official_exporter(
    limit: int,
) -> None:
    spans = finished_spans(2)
    with OTLPReceiver() as rx:
        endpoint = rx.endpoint + "/v1/traces"
        official_exporter = OTLPSpanExporter(endpoint=endpoint, max_request_size=limit)
        exporter = FastHTTPSpanExporter(endpoint=endpoint, timeout=5, max_request_size=limit)
        assert official_exporter.export(spans) is SpanExportResult.SUCCESS
        data = official(spans).SerializeToString()
        assert exporter.export_encoded(data, 2) is SpanExportResult.SUCCESS
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        received = rx.wait_for_spans(6)
        exporter.shutdown()
        official_exporter.shutdown()
    assert sorted(s.name for s in received) == ["s0", "s0", "s0", "s1", "s1", "s1"]


def test_a_request_over_max_request_size_is_refused_as_by_the_official_exporter() -> None:
    spans = finished_spans(2)
    with OTLPReceiver() as rx:
        endpoint = rx.endpoint + "/v1/traces"
        official_exporter = OTLPSpanExporter(endpoint=endpoint, max_request_size=10)
        exporter = FastHTTPSpanExporter(endpoint=endpoint, timeout=5, max_request_size=10)
        assert official_exporter.export(spans) is SpanExportResult.FAILURE
        data = official(spans).SerializeToString()
        assert exporter.export_encoded(data, 2) is SpanExportResult.FAILURE
        assert exporter.export(spans) is SpanExportResult.FAILURE
        exporter.shutdown()
        official_exporter.shutdown()
        assert rx.requests == []  # refused before sending, by both
