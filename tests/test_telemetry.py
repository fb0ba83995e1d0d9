"""gateway.telemetry: spans, metrics, content capture, access log, export, /metrics.

Each test builds a RequestContext by hand, as the pipeline does, and drives the API;
in-memory exporters are injected, and every Telemetry created is shut down.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import multiprocessing
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import ValidationError

from gateway.context import Attempt, Principal, RequestContext
from gateway.telemetry import (
    DURATION_BUCKETS,
    OVERHEAD_BUCKETS,
    TOKEN_BUCKETS,
    Telemetry,
    TelemetryConfig,
    prepare_multiprocess,
)
from gateway.telemetry_export import CountingBatchSpanProcessor
from pricing.usage import Usage
from tests.otlp_receiver import OTLPReceiver, dead_endpoint

KNOWN = {"gpt-4o-mini", "smart", "claude-sonnet-4-5", "gpt-4.1", "text-embedding-3-small"}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
EMAIL = "alice@example.com"


# --- harness ---------------------------------------------------------------------------


@dataclass
class Harness:
    tel: Telemetry
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    out: io.StringIO

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def span(self, kind: SpanKind) -> ReadableSpan:
        (span,) = [s for s in self.finished() if s.kind is kind]
        return span

    def client_spans(self) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.kind is SpanKind.CLIENT]

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]

    def metric(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        points: list[Any] = []
        if data is None:
            return points
        for rm in data.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        points.extend(m.data.data_points)
        return points


@pytest.fixture
async def telemetry() -> AsyncIterator[Callable[..., Harness]]:
    created: list[Telemetry] = []

    def make(config: TelemetryConfig | None = None, **kwargs: Any) -> Harness:
        spans, reader, out = InMemorySpanExporter(), InMemoryMetricReader(), io.StringIO()
        kwargs.setdefault("known_models", KNOWN)
        tel = Telemetry.create(
            config or TelemetryConfig(exporter="none"),
            service_version="1.2.3",
            instance_id="test-instance",
            span_exporter=spans,
            metric_reader=reader,
            access_log=out,
            **kwargs,
        )
        created.append(tel)
        return Harness(tel, spans, reader, out)

    yield make
    for tel in created:
        await tel.shutdown()


def request(
    *,
    stream: bool = False,
    body: dict[str, Any] | None = None,
    operation: str = "chat",
    path: str = "/v1/chat/completions",
    model: str = "gpt-4o-mini",
) -> RequestContext:
    ctx = RequestContext(request_id="req-1", method="POST", path=path, operation=operation)
    ctx.body = body or {
        "model": model,
        "messages": [{"role": "user", "content": f"Write to {EMAIL}"}],
        "temperature": 0.2,
        "max_tokens": 64,
        "stream": stream,
    }
    ctx.stream = stream
    ctx.requested_model = model
    ctx.principal = Principal(team="search", key_name="search-prod")
    return ctx


def attempt(
    ctx: RequestContext,
    *,
    kind: str = "openai",
    model: str = "gpt-4o-mini",
    deployment: str = "gpt-4o-mini#0:openai",
    address: str | None = "api.openai.com",
) -> Attempt:
    a = Attempt(
        number=len(ctx.attempts) + 1,
        deployment=deployment,
        provider=kind,
        provider_kind=kind,
        upstream_model=model,
        server_address=address,
        server_port=443 if address else None,
    )
    ctx.attempts.append(a)
    return a


def succeed(ctx: RequestContext, a: Attempt, usage: Usage | None = None) -> None:
    a.status = 200
    a.ended = time.perf_counter()
    ctx.status = 200
    ctx.response_id = "chatcmpl-9"
    ctx.response_model = "gpt-4o-mini-2024-07-18"
    ctx.finish_reasons = ["stop"]
    ctx.usage = usage or Usage(input_tokens=21, output_tokens=9)
    ctx.cost_nano = 8_550
    ctx.pricing_version = "2025-06-01"
    ctx.budget_remaining_nano = 499_999_991_450
    ctx.output_text = ["Sent to ", EMAIL]


def serve(tel: Telemetry, ctx: RequestContext, headers: dict[str, str] | None = None) -> Attempt:
    """One successful request, through the API in the pipeline's order."""
    tel.start_request(ctx, headers or {})
    a = attempt(ctx)
    tel.start_attempt(ctx, a)
    with tel.use_attempt(a):
        pass
    succeed(ctx, a)
    tel.end_attempt(ctx, a)
    tel.finish_request(ctx)
    return a


def run_ok(h: Harness, ctx: RequestContext, headers: dict[str, str] | None = None) -> Attempt:
    return serve(h.tel, ctx, headers)


def fake_redact(value: Any) -> tuple[Any, dict[str, int]]:
    counts = {"email": 0}

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            counts["email"] += v.count(EMAIL)
            return v.replace(EMAIL, "[EMAIL]")
        if isinstance(v, list):
            return [walk(x) for x in v]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        return v

    return walk(value), counts


# --- spans -----------------------------------------------------------------------------


async def test_server_and_client_spans(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request()
    run_ok(h, ctx, {"user-agent": "OpenAI/Python 1.50"})
    server, client = h.span(SpanKind.SERVER), h.span(SpanKind.CLIENT)

    assert server.name == "POST /v1/chat/completions"
    assert client.name == "chat gpt-4o-mini"
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.context.trace_id == server.context.trace_id
    assert server.parent is None
    assert dict(client.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.max_tokens": 64,
        "server.address": "api.openai.com",
        "server.port": 443,
        "tallygate.attempt": 1,
        "tallygate.deployment": "gpt-4o-mini#0:openai",
        "gen_ai.response.id": "chatcmpl-9",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": 21,
        "gen_ai.usage.output_tokens": 9,
        "http.response.status_code": 200,
    }
    assert client.status.status_code is StatusCode.UNSET
    attrs = dict(server.attributes or {})
    overhead = attrs.pop("tallygate.overhead_ms")
    assert isinstance(overhead, float) and overhead >= 0
    assert attrs == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "user_agent.original": "OpenAI/Python 1.50",
        "tallygate.request_id": "req-1",
        "http.response.status_code": 200,
        "tallygate.team": "search",
        "tallygate.key": "search-prod",
        "tallygate.model": "gpt-4o-mini",
        "tallygate.deployment": "gpt-4o-mini#0:openai",
        "tallygate.attempts": 1,
        "tallygate.cost.usd": 8.55e-06,
        "tallygate.pricing.version": "2025-06-01",
        "tallygate.budget.remaining_usd": 499.99999145,
        "tallygate.tokens.estimated": False,
    }
    # the spans are in the request's own time frame
    assert server.start_time is not None and client.start_time is not None
    assert server.end_time is not None and client.end_time is not None
    assert server.start_time <= client.start_time <= client.end_time <= server.end_time
    resource = dict(server.resource.attributes)
    assert resource["service.name"] == "tallygate"
    assert resource["service.version"] == "1.2.3"
    assert resource["service.instance.id"] == "test-instance"


async def test_incoming_traceparent_is_continued(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    run_ok(h, request(), {"Traceparent": TRACEPARENT})  # any header case
    server, client = h.span(SpanKind.SERVER), h.span(SpanKind.CLIENT)
    assert format(server.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert server.parent is not None and server.parent.is_remote
    assert format(server.parent.span_id, "016x") == "b7ad6b7169203331"
    assert client.context.trace_id == server.context.trace_id


async def test_a_failed_attempt_then_a_retry(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request()
    h.tel.start_request(ctx, {})
    first = attempt(ctx)
    h.tel.start_attempt(ctx, first)
    first.error_type = "timeout"
    first.ended = time.perf_counter()
    h.tel.end_attempt(ctx, first)
    h.tel.count("retry", ctx)
    second = attempt(ctx)
    h.tel.start_attempt(ctx, second)
    succeed(ctx, second)
    h.tel.end_attempt(ctx, second)
    h.tel.end_attempt(ctx, second)  # idempotent
    h.tel.finish_request(ctx)
    h.tel.finish_request(ctx)  # idempotent too: one line, one SERVER span

    one, two = sorted(h.client_spans(), key=lambda s: s.attributes["tallygate.attempt"])  # type: ignore[index]
    assert one.attributes["error.type"] == "timeout"  # type: ignore[index]
    assert one.status.status_code is StatusCode.ERROR
    assert "gen_ai.usage.input_tokens" not in (one.attributes or {})
    assert "error.type" not in (two.attributes or {})
    assert two.status.status_code is StatusCode.UNSET
    assert two.attributes["gen_ai.usage.output_tokens"] == 9  # type: ignore[index]
    server = h.span(SpanKind.SERVER)
    assert one.parent.span_id == two.parent.span_id == server.context.span_id  # type: ignore[union-attr]
    assert server.attributes["tallygate.attempts"] == 2  # type: ignore[index]
    assert len(h.lines()) == 1 and h.lines()[0]["attempts"] == 2
    (retry,) = h.metric("tallygate.retries")
    assert retry.value == 1
    assert dict(retry.attributes) == {
        "tallygate.team": "search",
        "tallygate.deployment": "gpt-4o-mini#0:openai",
        "error.type": "timeout",
    }


async def test_every_attempt_fails(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request(model="smart")
    h.tel.start_request(ctx, {})
    for kind, model in (("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-4.1")):
        a = attempt(ctx, kind=kind, model=model, deployment=f"smart#{len(ctx.attempts)}:{kind}")
        h.tel.start_attempt(ctx, a)
        a.status = 503
        a.error_type = "503"
        h.tel.end_attempt(ctx, a)
        if kind == "anthropic":
            h.tel.count("fallback", ctx)
    ctx.status = 502
    ctx.error_type = "upstream_error"
    h.tel.finish_request(ctx)

    spans = h.client_spans()
    assert [s.name for s in spans] == ["chat claude-sonnet-4-5", "chat gpt-4.1"]
    assert [s.attributes["gen_ai.provider.name"] for s in spans] == ["anthropic", "openai"]  # type: ignore[index]
    assert all(s.status.status_code is StatusCode.ERROR for s in spans)
    server = h.span(SpanKind.SERVER)
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["error.type"] == "upstream_error"  # type: ignore[index]
    assert server.attributes["http.response.status_code"] == 502  # type: ignore[index]
    (duration,) = h.metric("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == "upstream_error"
    (fallback,) = h.metric("tallygate.fallbacks")
    assert fallback.attributes["tallygate.deployment"] == "smart#0:anthropic"


async def test_a_4xx_is_not_a_server_error(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request()
    h.tel.start_request(ctx, {})
    ctx.status = 429
    ctx.error_type = "budget_exceeded"
    ctx.rejected = "budget"
    h.tel.count("rejection", ctx, kind="budget")
    h.tel.finish_request(ctx)
    server = h.span(SpanKind.SERVER)
    assert server.status.status_code is StatusCode.UNSET  # 4xx: the client's problem
    assert server.attributes["error.type"] == "budget_exceeded"  # type: ignore[index]
    assert server.attributes["tallygate.rejected"] == "budget"  # type: ignore[index]
    assert h.client_spans() == []
    (rejection,) = h.metric("tallygate.rejections")
    assert dict(rejection.attributes) == {
        "tallygate.team": "search",
        "tallygate.rejection.kind": "budget",
    }
    assert h.metric("gen_ai.client.operation.duration") == []  # no upstream call was made
    (requests,) = h.metric("tallygate.requests")
    assert requests.attributes["http.response.status_code"] == 429


async def test_stream(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request(stream=True)
    h.tel.start_request(ctx, {})
    a = attempt(ctx)
    h.tel.start_attempt(ctx, a)
    ctx.first_chunk_at = a.started + 0.05
    for gap in (0.01, 0.03):
        h.tel.record_chunk_gap(ctx, gap)
    succeed(ctx, a)
    h.tel.end_attempt(ctx, a)
    h.tel.finish_request(ctx)

    client = h.span(SpanKind.CLIENT)
    assert client.attributes["gen_ai.request.stream"] is True  # type: ignore[index]
    assert client.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.05)  # type: ignore[index]
    assert h.span(SpanKind.SERVER).attributes["tallygate.stream"] is True  # type: ignore[index]
    (ttfc,) = h.metric("gen_ai.client.operation.time_to_first_chunk")
    assert ttfc.count == 1 and ttfc.sum == pytest.approx(ctx.first_chunk_at - ctx.started)
    assert tuple(ttfc.explicit_bounds) == DURATION_BUCKETS
    (gaps,) = h.metric("gen_ai.client.operation.time_per_output_chunk")
    assert gaps.count == 2 and gaps.sum == pytest.approx(0.04)
    assert tuple(gaps.explicit_bounds) == DURATION_BUCKETS
    assert gaps.bucket_counts[0] == 1 and gaps.bucket_counts[2] == 1  # ≤0.01 and (0.02, 0.04]
    assert h.lines()[0]["ttft_ms"] == pytest.approx(
        (ctx.first_chunk_at - ctx.started) * 1000, abs=0.01
    )


async def test_non_stream_has_no_stream_attributes(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    run_ok(h, request())
    client = h.span(SpanKind.CLIENT)
    assert "gen_ai.request.stream" not in (client.attributes or {})
    assert "gen_ai.response.time_to_first_chunk" not in (client.attributes or {})
    assert h.metric("gen_ai.client.operation.time_to_first_chunk") == []


async def test_a_stream_that_breaks_marks_the_attempt(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request(stream=True)
    h.tel.start_request(ctx, {})
    a = attempt(ctx)
    h.tel.start_attempt(ctx, a)
    succeed(ctx, a)
    ctx.error_type = "stream_interrupted"  # status stays 200: the headers were sent
    h.tel.end_attempt(ctx, a)
    h.tel.finish_request(ctx)
    client = h.span(SpanKind.CLIENT)
    assert client.attributes["error.type"] == "stream_interrupted"  # type: ignore[index]
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes["gen_ai.usage.output_tokens"] == 9  # type: ignore[index]


async def test_embeddings(telemetry: Callable[..., Harness]) -> None:
    h = telemetry(TelemetryConfig(exporter="none", capture_content="full"))
    ctx = request(
        operation="embeddings",
        path="/v1/embeddings",
        model="text-embedding-3-small",
        body={"model": "text-embedding-3-small", "input": [EMAIL], "dimensions": 256},
    )
    h.tel.start_request(ctx, {})
    a = attempt(ctx, model="text-embedding-3-small", deployment="emb#0:openai")
    h.tel.start_attempt(ctx, a)
    succeed(ctx, a, Usage(input_tokens=5))
    ctx.output_text = []
    h.tel.end_attempt(ctx, a)
    h.tel.finish_request(ctx)
    client = h.span(SpanKind.CLIENT)
    assert client.name == "embeddings text-embedding-3-small"
    assert client.attributes["gen_ai.embeddings.dimension.count"] == 256  # type: ignore[index]
    assert not any(k.startswith("gen_ai.input") for k in client.attributes or {})
    tokens = h.metric("gen_ai.client.token.usage")
    assert [p.attributes["gen_ai.token.type"] for p in tokens] == ["input"]


async def test_instrumented_httpx_client_nests_and_propagates(
    telemetry: Callable[..., Harness],
) -> None:
    h = telemetry(TelemetryConfig(exporter="none", http_spans=True))
    seen: list[httpx.Request] = []

    def upstream(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(transport=httpx.MockTransport(upstream)) as client:
        h.tel.instrument_client(client)
        ctx = request()
        h.tel.start_request(ctx, {"traceparent": TRACEPARENT})
        a = attempt(ctx)
        h.tel.start_attempt(ctx, a)
        with h.tel.use_attempt(a):
            await client.post("https://api.openai.com/v1/chat/completions", json={})
        succeed(ctx, a)
        h.tel.end_attempt(ctx, a)
        h.tel.finish_request(ctx)

    gen_ai = next(s for s in h.client_spans() if s.name.startswith("chat"))
    http = next(s for s in h.client_spans() if s.name == "POST")
    assert http.parent is not None and http.parent.span_id == gen_ai.context.span_id
    traceparent = seen[0].headers["traceparent"]
    assert traceparent.split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert traceparent.split("-")[2] == format(http.context.span_id, "016x")


async def test_without_http_spans_the_attempt_span_goes_upstream(
    telemetry: Callable[..., Harness],
) -> None:
    h = telemetry()  # http_spans off: the default
    seen: list[httpx.Request] = []

    def upstream(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(transport=httpx.MockTransport(upstream)) as client:
        h.tel.instrument_client(client)  # a no-op now
        ctx = request()
        h.tel.start_request(ctx, {"traceparent": TRACEPARENT, "tracestate": "vendor=1"})
        a = attempt(ctx)
        h.tel.start_attempt(ctx, a)
        with h.tel.use_attempt(a):
            await client.post("https://api.openai.com/v1/chat/completions", json={},
                              headers=h.tel.trace_headers(a))  # fmt: skip
        succeed(ctx, a)
        h.tel.end_attempt(ctx, a)
        h.tel.finish_request(ctx)

    assert [s.name for s in h.client_spans()] == ["chat gpt-4o-mini"]  # no HTTP span
    gen_ai = h.span(SpanKind.CLIENT)
    version, trace_id, span_id, flags = seen[0].headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert span_id == format(gen_ai.context.span_id, "016x")
    assert seen[0].headers["tracestate"] == "vendor=1"


async def test_trace_headers_empty_without_a_recorded_trace(
    telemetry: Callable[..., Harness],
) -> None:
    h = telemetry()
    ctx = request()
    a = attempt(ctx)  # no span started for it
    assert h.tel.trace_headers(a) == {}
    h2 = telemetry(TelemetryConfig(exporter="none", http_spans=True))
    h2.tel.start_request(ctx, {})
    h2.tel.start_attempt(ctx, a)
    assert h2.tel.trace_headers(a) == {}  # the instrumentation injects its own


async def test_use_attempt_lets_the_body_raise(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request()
    h.tel.start_request(ctx, {})
    a = attempt(ctx)
    h.tel.start_attempt(ctx, a)
    with pytest.raises(httpx.ConnectError), h.tel.use_attempt(a):
        raise httpx.ConnectError("refused")
    with h.tel.use_attempt(Attempt(9, "d", "p", "openai", "m", None, None)):
        pass  # an attempt telemetry never saw: nothing to make current, no error


# --- metrics ---------------------------------------------------------------------------


async def test_metrics_buckets_and_attributes(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    run_ok(h, request())
    genai = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",  # a snapshot of a known model
        "server.address": "api.openai.com",
        "server.port": 443,
    }
    (duration,) = h.metric("gen_ai.client.operation.duration")
    assert dict(duration.attributes) == genai
    assert tuple(duration.explicit_bounds) == DURATION_BUCKETS and duration.count == 1
    tokens = {p.attributes["gen_ai.token.type"]: p for p in h.metric("gen_ai.client.token.usage")}
    assert set(tokens) == {"input", "output"}
    assert tokens["input"].sum == 21 and tokens["output"].sum == 9
    assert dict(tokens["input"].attributes) == {
        **genai,
        "gen_ai.token.type": "input",
        "tallygate.team": "search",
    }
    assert tuple(tokens["input"].explicit_bounds) == TOKEN_BUCKETS
    (overhead,) = h.metric("tallygate.overhead.duration")
    assert tuple(overhead.explicit_bounds) == OVERHEAD_BUCKETS
    (requests,) = h.metric("tallygate.requests")
    assert requests.value == 1
    assert dict(requests.attributes) == {
        "http.response.status_code": 200,
        "tallygate.team": "search",
        "gen_ai.operation.name": "chat",
        "tallygate.model": "gpt-4o-mini",
    }
    (cost,) = h.metric("tallygate.cost")
    assert cost.value == pytest.approx(8.55e-06)
    assert dict(cost.attributes) == {
        "tallygate.team": "search",
        "tallygate.model": "gpt-4o-mini",
        "gen_ai.request.model": "gpt-4o-mini",
    }


async def test_unknown_models_collapse_to_other(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request(model="my-finetune-123")
    h.tel.start_request(ctx, {})
    a = attempt(ctx, model="ft:gpt-4o-mini:acme:xyz")
    h.tel.start_attempt(ctx, a)
    succeed(ctx, a)
    ctx.response_model = "ft:gpt-4o-mini:acme:xyz"
    h.tel.end_attempt(ctx, a)
    h.tel.finish_request(ctx)
    # the span keeps the real names
    assert h.span(SpanKind.CLIENT).attributes["gen_ai.request.model"] == "ft:gpt-4o-mini:acme:xyz"  # type: ignore[index]
    (duration,) = h.metric("gen_ai.client.operation.duration")
    assert duration.attributes["gen_ai.request.model"] == "_OTHER"
    assert duration.attributes["gen_ai.response.model"] == "_OTHER"
    (requests,) = h.metric("tallygate.requests")
    assert requests.attributes["tallygate.model"] == "_OTHER"
    for point in h.metric("gen_ai.client.token.usage"):
        assert "req-1" not in point.attributes.values()  # never request ids


async def test_counted_events(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request()
    h.tel.count("store_error", ctx)
    h.tel.count("store_error", ctx)
    h.tel.count("something_new", ctx)
    (store,) = h.metric("tallygate.store.errors")
    assert store.value == 2 and dict(store.attributes) == {"tallygate.team": "search"}
    (other,) = h.metric("tallygate.events")
    assert dict(other.attributes) == {
        "tallygate.team": "search",
        "tallygate.event": "something_new",
    }


# --- content capture ---------------------------------------------------------------------

CONTENT_KEYS = {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"}


async def test_capture_none(telemetry: Callable[..., Harness]) -> None:
    h = telemetry(TelemetryConfig(exporter="none", capture_content="none"), redact=fake_redact)
    assert not h.tel.capture_content
    run_ok(h, request())
    for span in h.finished():
        assert not CONTENT_KEYS & set(span.attributes or {})
        assert EMAIL not in json.dumps(dict(span.attributes or {}))


async def test_capture_redacted(telemetry: Callable[..., Harness]) -> None:
    h = telemetry(TelemetryConfig(exporter="none", capture_content="redacted"), redact=fake_redact)
    assert h.tel.capture_content
    ctx = request()
    run_ok(h, ctx)
    client = h.span(SpanKind.CLIENT)
    attrs = dict(client.attributes or {})
    assert json.loads(attrs["gen_ai.input.messages"]) == [
        {"role": "user", "parts": [{"type": "text", "content": "Write to [EMAIL]"}]}
    ]
    assert json.loads(attrs["gen_ai.output.messages"]) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "Sent to [EMAIL]"}],
            "finish_reason": "stop",
        }
    ]
    everything = json.dumps([dict(s.attributes or {}) for s in h.finished()]) + h.out.getvalue()
    assert EMAIL not in everything
    assert ctx.redactions == {"email": 2}
    server = h.span(SpanKind.SERVER)
    assert server.attributes["tallygate.redactions.email"] == 2  # type: ignore[index]
    (redactions,) = h.metric("tallygate.redactions")
    assert redactions.value == 2
    assert dict(redactions.attributes) == {
        "tallygate.team": "search",
        "tallygate.redaction.type": "email",
    }


async def test_capture_redacted_without_a_redactor_captures_nothing(
    telemetry: Callable[..., Harness],
) -> None:
    h = telemetry(TelemetryConfig(exporter="none", capture_content="redacted"))
    assert not h.tel.capture_content
    run_ok(h, request())
    for span in h.finished():
        assert not CONTENT_KEYS & set(span.attributes or {})


async def test_capture_full(telemetry: Callable[..., Harness]) -> None:
    h = telemetry(TelemetryConfig(exporter="none", capture_content="full"), redact=fake_redact)
    body = {
        "model": "gpt-4o-mini",
        "system": "Be kind.",
        "messages": [{"role": "user", "content": f"Mail {EMAIL}"}],
        "tools": [{"type": "function", "function": {"name": "send", "parameters": {}}}],
    }
    ctx = request(body=body)
    run_ok(h, ctx)
    attrs = dict(h.span(SpanKind.CLIENT).attributes or {})
    assert EMAIL in attrs["gen_ai.input.messages"]
    assert EMAIL in attrs["gen_ai.output.messages"]
    assert json.loads(attrs["gen_ai.system_instructions"]) == [
        {"type": "text", "content": "Be kind."}
    ]
    assert json.loads(attrs["gen_ai.tool.definitions"])[0]["name"] == "send"
    assert ctx.redactions == {}
    assert EMAIL not in h.out.getvalue()  # the access line never carries content


async def test_content_goes_to_the_server_span_when_no_attempt_succeeded(
    telemetry: Callable[..., Harness],
) -> None:
    h = telemetry(TelemetryConfig(exporter="none", capture_content="full"))
    ctx = request()
    h.tel.start_request(ctx, {})
    a = attempt(ctx)
    h.tel.start_attempt(ctx, a)
    a.error_type = "connect_error"
    h.tel.end_attempt(ctx, a)
    ctx.status = 502
    ctx.error_type = "upstream_error"
    h.tel.finish_request(ctx)
    server = dict(h.span(SpanKind.SERVER).attributes or {})
    assert "gen_ai.input.messages" in server and "gen_ai.output.messages" not in server


# --- never fails a request ---------------------------------------------------------------


async def test_a_failure_inside_telemetry_never_reaches_the_request(
    telemetry: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    def broken_redact(value: Any) -> tuple[Any, dict[str, int]]:
        raise RuntimeError("redactor down")

    h = telemetry(
        TelemetryConfig(exporter="none", capture_content="redacted"), redact=broken_redact
    )
    with caplog.at_level(logging.ERROR, logger="gateway.telemetry"):
        for _ in range(3):
            run_ok(h, request())
        h.tel.record_chunk_gap(object(), 0.1)  # type: ignore[arg-type]
        h.tel.start_attempt(object(), object())  # type: ignore[arg-type]
    assert len(h.lines()) == 3  # the access line is still written
    assert len(h.finished()) == 6  # and the spans ended, without content
    for span in h.finished():
        assert not CONTENT_KEYS & set(span.attributes or {})
    errors = {
        p.attributes["tallygate.telemetry.stage"]: p.value
        for p in h.metric("tallygate.telemetry.errors")
    }
    assert errors["content"] == 3
    assert errors["record_chunk_gap"] == 1 and errors["start_attempt"] == 1
    logged = [r for r in caplog.records if r.name == "gateway.telemetry"]
    assert len(logged) == 3  # once per failing stage


# --- access log ------------------------------------------------------------------------


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


# --- export ------------------------------------------------------------------------------


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
        tel.start_attempt(ctx, a)
        succeed(ctx, a)
        tel.end_attempt(ctx, a)
        tel.finish_request(ctx)
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
        r for r in caplog.records if r.name == "gateway.telemetry" and "failed" in r.getMessage()
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


# --- Prometheus ----------------------------------------------------------------------------


async def test_prometheus_exposition(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    run_ok(h, request())
    exposition = h.tel.metrics_text()
    assert exposition is not None
    body, content_type = exposition
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert (
        'gen_ai_client_operation_duration_seconds_bucket{error_type="",gen_ai_operation_name="chat",'
        'gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o-mini",'
        'gen_ai_response_model="gpt-4o-mini-2024-07-18",le="0.01",'
        'server_address="api.openai.com",server_port="443"}'
    ) in text
    assert re.search(
        r'gen_ai_client_token_usage_bucket\{.*gen_ai_token_type="input".*le="16\.0".*\} 0\.0', text
    )
    assert re.search(
        r'gen_ai_client_token_usage_bucket\{.*gen_ai_token_type="input".*le="64\.0".*\} 1\.0', text
    )
    assert re.search(
        r'tallygate_requests_total\{.*http_response_status_code="200".*tallygate_team="search"\} 1\.0',
        text,
    )
    assert re.search(r"tallygate_cost_usd_total\{.*\} 8\.55e-06", text)
    assert "tallygate_overhead_duration_seconds_bucket" in text


async def test_prometheus_off(telemetry: Callable[..., Harness]) -> None:
    h = telemetry(TelemetryConfig(exporter="none", prometheus=False))
    run_ok(h, request())
    assert h.tel.metrics_text() is None


def test_prepare_multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert prepare_multiprocess(1) == {}
    stale = tmp_path / "counter_123.db"
    stale.write_bytes(b"old")
    assert prepare_multiprocess(4, str(tmp_path)) == {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    assert not stale.exists()
    fresh = prepare_multiprocess(2)["PROMETHEUS_MULTIPROC_DIR"]
    assert Path(fresh).is_dir()
    Path(fresh).rmdir()


def _worker(requests: int) -> None:
    """A uvicorn worker, in short: its own process, its own Telemetry, some requests."""

    async def main() -> None:
        tel = Telemetry.create(
            TelemetryConfig(exporter="none", capture_content="none"),
            service_version="t",
            access_log=io.StringIO(),
            workers=2,
            known_models=KNOWN,
        )
        for _ in range(requests):
            serve(tel, request())
        await tel.shutdown()

    asyncio.run(main())


async def test_a_scrape_merges_all_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = prepare_multiprocess(2, str(tmp_path / "prom"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spawn = multiprocessing.get_context("spawn")  # as uvicorn starts its workers
    workers = [spawn.Process(target=_worker, args=(n,)) for n in (3, 4)]
    for w in workers:
        w.start()
    for w in workers:
        await asyncio.to_thread(w.join, 60)
        assert w.exitcode == 0

    # whichever worker answers the scrape shows everyone's counts
    tel = Telemetry.create(
        TelemetryConfig(exporter="none"), service_version="t", access_log=io.StringIO(), workers=2
    )
    exposition = tel.metrics_text()
    await tel.shutdown()
    assert exposition is not None
    text = exposition[0].decode()
    requests = re.search(
        r'tallygate_requests_total\{[^}]*tallygate_team="search"[^}]*\} (\S+)', text
    )
    assert requests is not None and float(requests.group(1)) == 7.0
    count = re.search(r"gen_ai_client_operation_duration_seconds_count\{[^}]*\} (\S+)", text)
    assert count is not None and float(count.group(1)) == 7.0
    tokens = re.search(
        r'gen_ai_client_token_usage_sum\{[^}]*gen_ai_token_type="input"[^}]*\} (\S+)', text
    )
    assert tokens is not None and float(tokens.group(1)) == 7 * 21
