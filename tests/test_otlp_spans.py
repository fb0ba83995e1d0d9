"""The fast OTLP span encoder writes what the official encoder writes (compared parsed)."""

from __future__ import annotations

import pathlib

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from gateway.telemetry.fast.otlp_spans import encode_spans, varint
from tests.fake_upstream import FakeUpstream, error_reply
from tests.gateway_harness import KEYS, base_config, merge, running_gateway


def parsed(data: bytes) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(data)


def assert_same(spans) -> None:
    ours = parsed(encode_spans(spans))
    theirs = parsed(official(spans).SerializeToString())
    assert ours == theirs
    assert len(ours.resource_spans) >= 1


def synthetic_spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "t", "n": 3}, schema_url="https://s/1")
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("scope.a", "1.2.3", schema_url="https://s/scope")
    other = provider.get_tracer("scope.b")
    remote = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "x1"), ("k", "v")]),
    )
    with tracer.start_as_current_span(
        "root",
        context=set_span_in_context(NonRecordingSpan(remote)),
        kind=SpanKind.SERVER,
        attributes={
            "s": "text ünïcode ✓",
            "empty": "",
            "long": "x" * 126,  # the AnyValue is 128 bytes: a two-byte length around it
            "longer": "é" * 70_000,  # three-byte lengths
            "b": True,
            "f": False,
            "i": 0,
            "neg": -5,
            "big": 2**62,
            "d": 0.25,
            "nd": -1.5e300,
            "arr": ("a", "b"),
            "ints": [1, -2, 3],
            "bools": [True, False],
            "floats": [0.5, 2.0],
        },
        links=[Link(remote, {"why": "follows"})],
    ) as root:
        root.add_event("evt", {"k": 1}, timestamp=1_700_000_000_000_000_123)
        root.add_event("bare")
        with other.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
            child.set_status(Status(StatusCode.ERROR, "broke: upstream 500"))
        with tracer.start_as_current_span("internal"):
            pass
        root.set_status(Status(StatusCode.OK))
    provider.shutdown()
    return exporter.get_finished_spans()


def test_synthetic_spans_encode_like_the_official_encoder() -> None:
    spans = synthetic_spans()
    assert len(spans) == 3
    assert_same(spans)
    assert_same(spans[:1])


def test_real_gateway_spans_encode_like_the_official_encoder(tmp_path: pathlib.Path) -> None:
    with (
        FakeUpstream() as fake,
        # with the httpx spans: a second instrumentation scope in the batch
        running_gateway(
            merge(
                base_config(fake.base_url, tmp_path / "t.db"), {"telemetry": {"http_spans": True}}
            )
        ) as gw,
    ):
        fake.enqueue(error_reply(500))  # a retry: error spans too
        for stream in (False, True):
            r = httpx.post(
                gw.base_url + "/chat/completions",
                headers={"authorization": f"Bearer {KEYS['alpha']}"},
                json={
                    "model": "fallback",
                    "stream": stream,
                    "temperature": 0.2,
                    "messages": [{"role": "user", "content": "mail bob@example.com now"}],
                },
            )
            assert r.status_code == 200
        from tests.servers import wait_until

        wait_until(lambda: len(gw.spans.get_finished_spans()) >= 7, within=5)
        spans = gw.spans.get_finished_spans()
    assert_same(spans)


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**32, 2**63 - 1, -1, -(2**63)])
def test_varint_matches_protobuf(n: int) -> None:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    assert b"\x18" + varint(n) == AnyValue(int_value=n).SerializeToString()


def test_the_fast_exporter_delivers_over_http() -> None:
    from gateway.telemetry.fast.otlp_spans import FastHTTPSpanExporter
    from tests.otlp_receiver import OTLPReceiver

    spans = synthetic_spans()
    with OTLPReceiver() as rx:
        exporter = FastHTTPSpanExporter(endpoint=rx.endpoint + "/v1/traces", timeout=5)
        assert exporter._fast  # the internals it relies on exist in this exporter release
        assert exporter.export(spans).name == "SUCCESS"
        received = rx.wait_for_spans(3)
        exporter.shutdown()
    by_name = {s.name: s for s in received}
    assert set(by_name) == {"root", "child", "internal"}
    assert by_name["root"].trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert by_name["root"].attributes["s"] == "text ünïcode ✓"
    assert (
        by_name["child"].status == "ERROR"
        and by_name["child"].status_message == "broke: upstream 500"
    )
    assert by_name["root"].resource["service.name"] == "t"
