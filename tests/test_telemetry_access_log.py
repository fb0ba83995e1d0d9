"""gateway.telemetry.facade writes the access line (gateway/telemetry/access_log.py formats it): trace and
span ids that correlate with the spans, even when nothing is exported; JSON or logfmt."""

from __future__ import annotations

import io
import json
import re
from collections.abc import AsyncIterator, Callable

import pytest
from opentelemetry.trace import SpanKind

from gateway.telemetry.facade import Telemetry, TelemetryConfig
from tests.telemetry_helpers import EMAIL, TRACEPARENT, Harness, harnesses, request, run_ok, serve


@pytest.fixture
async def telemetry() -> AsyncIterator[Callable[..., Harness]]:
    async with harnesses() as make:
        yield make


# --- access log ----------------------------------------------------------------------------------


async def test_access_line(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request()
    run_ok(h, ctx, {"traceparent": TRACEPARENT, "authorization": "Bearer sk-secret-key"})
    (line,) = h.lines()
    server = h.span(SpanKind.SERVER)
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert line["span_id"] == format(server.context.span_id, "016x")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])
    assert {k: line[k] for k in ("request_id", "method", "path", "team", "key", "model")} == {
        "request_id": "req-1",
        "method": "POST",
        "path": "/v1/chat/completions",
        "team": "search",
        "key": "search-prod",
        "model": "gpt-4o-mini",
    }
    assert line["deployment"] == "gpt-4o-mini#0:openai" and line["upstream_model"] == "gpt-4o-mini"
    assert line["status"] == 200 and line["attempts"] == 1
    assert line["input_tokens"] == 21 and line["output_tokens"] == 9
    assert line["tokens_estimated"] is False and line["cost_usd"] == "0.000008550"
    assert line["latency_ms"] >= line["overhead_ms"] >= 0
    assert line["ttft_ms"] is None and line["error_type"] is None and line["cancelled"] is False
    raw = h.out.getvalue()
    assert "sk-secret" not in raw and EMAIL not in raw


async def test_nothing_exported_still_correlates() -> None:
    out = io.StringIO()
    tel = Telemetry.create(TelemetryConfig(exporter="none"), service_version="t", access_log=out)
    ctx = request()
    serve(tel, ctx, {"traceparent": TRACEPARENT})
    await tel.shutdown()
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["trace_id"] == "0af7651916cd43dd8448eb211c80319c"  # ids without recording
    assert line["span_id"] is not None and line["span_id"] != "b7ad6b7169203331"
    assert not ctx.trace.span.is_recording()


async def test_text_access_line(telemetry: Callable[..., Harness]) -> None:
    h = telemetry(TelemetryConfig(exporter="none", log_format="text"))
    run_ok(h, request())
    line = h.out.getvalue()
    assert line.count("\n") == 1
    assert " status=200 " in line and " team=search " in line and "cost_usd=0.000008550" in line
