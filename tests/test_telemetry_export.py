"""gateway.telemetry.facade and gateway.telemetry.export: OTLP export to a real receiver, dead
backends costing only counted drops, the export description, and the config's strictness."""

from __future__ import annotations

import io
import logging
import re
import threading
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from pydantic import ValidationError

from gateway.telemetry.export import CountingBatchSpanProcessor
from gateway.telemetry.facade import (
    DURATION_BUCKETS,
    Telemetry,
    TelemetryConfig,
)
from tests.otlp_receiver import OTLPReceiver, dead_endpoint
from tests.telemetry_helpers import (
    KNOWN,
    TRACEPARENT,
    attempt,
    request,
    serve,
    succeed,
)

# --- export --------------------------------------------------------------------------------------


async def test_otlp_export_to_a_real_receiver() -> None:
    with OTLPReceiver() as rx:
        config = TelemetryConfig(
            exporter="otlp",
            endpoint=rx.endpoint,
            export_logs=True,
            headers={"x-tenant": "acme"},
        )
        tel = Telemetry.create(
            config,
            service_version="1.2.3",
            instance_id="i-1",
            access_log=io.StringIO(),
            known_models=KNOWN,
        )
        assert tel.describe() == f"otlp http/protobuf → {rx.endpoint}"
        ctx = request()
        tel.start_request(ctx, {"traceparent": TRACEPARENT})
        a = attempt(ctx)
        ctx.record.attempt(a)
        succeed(ctx, a)
        a.record.end()
        ctx.record.finish()
        await tel.shutdown()  # flushes

        spans = {s.kind: s for s in rx.wait_for_spans(2)}
        server, client = spans["SERVER"], spans["CLIENT"]
        assert server.trace_id == client.trace_id == "0af7651916cd43dd8448eb211c80319c"
        assert server.parent_span_id == "b7ad6b7169203331"
        assert client.parent_span_id == server.span_id
        assert client.name == "chat gpt-4o-mini"
        assert client.attributes["gen_ai.provider.name"] == "openai"
        assert client.attributes["gen_ai.usage.input_tokens"] == 21
        assert client.attributes["gen_ai.response.finish_reasons"] == ["stop"]
        assert server.attributes["tallygate.cost.usd"] == pytest.approx(8.55e-06)
        assert server.resource["service.name"] == "tallygate"
        assert server.resource["service.instance.id"] == "i-1"

        (duration,) = rx.wait_for_metric("gen_ai.client.operation.duration")
        assert duration.kind == "histogram" and duration.unit == "s"
        assert tuple(duration.bounds) == DURATION_BUCKETS and duration.count == 1
        tokens = rx.wait_for_metric("gen_ai.client.token.usage")
        assert {p.attributes["gen_ai.token.type"]: p.sum for p in tokens} == {
            "input": 21,
            "output": 9,
        }
        (requests,) = rx.wait_for_metric("tallygate.requests")
        assert requests.kind == "sum" and requests.value == 1

        (log,) = rx.wait_for_logs(1)
        assert log.trace_id == server.trace_id and log.span_id == server.span_id
        assert log.event_name == "tallygate.access"
        assert log.body["request_id"] == "req-1" and log.body["status"] == 200
        assert all(headers.get("x-tenant") == "acme" for _, headers in rx.requests)


async def test_a_dead_backend_costs_only_counted_drops(caplog: pytest.LogCaptureFixture) -> None:
    config = TelemetryConfig(
        exporter="otlp", endpoint=dead_endpoint(), export_logs=True, export_timeout_s=0.5
    )
    out = io.StringIO()
    with caplog.at_level(logging.DEBUG):
        tel = Telemetry.create(config, service_version="t", access_log=out, known_models=KNOWN)
        for _ in range(3):
            serve(tel, request())
        assert len(out.getvalue().splitlines()) == 3  # the requests went on regardless
        await tel.shutdown()
    assert tel.dropped >= 6  # 3 x (SERVER + CLIENT) spans, at least
    exposition = tel.metrics_text()
    assert exposition is not None
    dropped = re.search(
        r'tallygate_telemetry_dropped_total\{tallygate_telemetry_reason="export_failed",'
        r'tallygate_telemetry_signal="traces"\} (\S+)',
        exposition[0].decode(),
    )
    assert dropped is not None and float(dropped.group(1)) >= 1
    noisy = [
        r
        for r in caplog.records
        if r.name.startswith("opentelemetry") and r.levelno >= logging.WARNING
    ]
    assert noisy == []  # the exporters' per-batch errors are filtered...
    ours = [
        r
        for r in caplog.records
        if r.name == "gateway.telemetry.facade" and "failed" in r.getMessage()
    ]
    signals = sorted(r.args[0] for r in ours if isinstance(r.args, tuple))  # type: ignore[misc]
    assert signals == ["logs", "metrics", "traces"]  # ...into one warning per signal


async def test_a_dead_grpc_backend() -> None:
    config = TelemetryConfig(
        exporter="otlp", protocol="grpc", endpoint=dead_endpoint(), export_timeout_s=0.5
    )
    tel = Telemetry.create(config, service_version="t", access_log=io.StringIO())
    assert tel.describe().startswith("otlp grpc → http://127.0.0.1:")
    serve(tel, request())
    await tel.shutdown()
    assert tel.dropped >= 2


class _BlockingExporter(SpanExporter):
    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Any) -> SpanExportResult:
        self.release.wait(5)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


def test_a_full_queue_drops_and_counts() -> None:
    exporter = _BlockingExporter()
    drops: list[int] = []
    processor = CountingBatchSpanProcessor(
        exporter, drops.append, max_queue_size=2, max_export_batch_size=1, schedule_delay_millis=10
    )
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    for i in range(10):
        tracer.start_span(f"s{i}").end()
    assert sum(drops) >= 5  # at most two queued and one in export
    exporter.release.set()
    provider.shutdown()


async def test_describe(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    made: list[Telemetry] = []

    def describe(**kwargs: Any) -> str:
        tel = Telemetry.create(
            TelemetryConfig(**kwargs), service_version="t", access_log=io.StringIO()
        )
        made.append(tel)
        return tel.describe()

    assert describe(exporter="none") == "none"
    assert describe(exporter="otlp") == "none (otlp: no endpoint configured)"
    assert describe(exporter="otlp", endpoint="http://localhost:4318") == (
        "otlp http/protobuf → http://localhost:4318"
    )
    assert describe(exporter="otlp", protocol="grpc", endpoint="http://localhost:4317") == (
        "otlp grpc → http://localhost:4317"
    )
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert describe(exporter="otlp") == "otlp http/protobuf → http://collector:4318"
    for tel in made:
        await tel.shutdown()


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError):
        TelemetryConfig(exporter="jaeger")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TelemetryConfig.model_validate({"capture": "full"})
    assert TelemetryConfig().capture_content == "redacted"
