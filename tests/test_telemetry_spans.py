"""gateway.telemetry.facade: the SERVER and CLIENT spans of a request, trace propagation, and a
failure inside telemetry that never reaches the request.

Each test builds a RequestContext by hand, as the pipeline does, and drives the API
(tests/telemetry_helpers.py); in-memory exporters are injected, and every Telemetry
created is shut down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from gateway.telemetry.facade import (
    DURATION_BUCKETS,
    TelemetryConfig,
)
from pricing.usage import Usage
from tests.telemetry_helpers import (
    CONTENT_KEYS,
    EMAIL,
    TRACEPARENT,
    Harness,
    attempt,
    harnesses,
    request,
    run_ok,
    succeed,
)


@pytest.fixture
async def telemetry() -> AsyncIterator[Callable[..., Harness]]:
    async with harnesses() as make:
        yield make


# --- spans ---------------------------------------------------------------------------------------


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
    ctx.record.attempt(first)
    first.error_type = "timeout"
    first.ended = time.perf_counter()
    first.record.end()
    ctx.record.count("retry")
    second = attempt(ctx)
    ctx.record.attempt(second)
    succeed(ctx, second)
    second.record.end()
    second.record.end()  # idempotent
    ctx.record.finish()
    ctx.record.finish()  # idempotent too: one line, one SERVER span

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
        ctx.record.attempt(a)
        a.status = 503
        a.error_type = "503"
        a.record.end()
        if kind == "anthropic":
            ctx.record.count("fallback")
    ctx.status = 502
    ctx.error_type = "upstream_error"
    ctx.record.finish()

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
    ctx.record.count("rejection", kind="budget")
    ctx.record.finish()
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
    ctx.record.attempt(a)
    ctx.first_chunk_at = a.started + 0.05
    for gap in (0.01, 0.03):
        ctx.record.chunk_gap(gap)
    succeed(ctx, a)
    a.record.end()
    ctx.record.finish()

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
    ctx.record.attempt(a)
    succeed(ctx, a)
    ctx.error_type = "stream_interrupted"  # status stays 200: the headers were sent
    a.record.end()
    ctx.record.finish()
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
    ctx.record.attempt(a)
    succeed(ctx, a, Usage(input_tokens=5))
    ctx.output_text = []
    a.record.end()
    ctx.record.finish()
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
        ctx.record.attempt(a)
        with a.record.current():
            await client.post("https://api.openai.com/v1/chat/completions", json={})
        succeed(ctx, a)
        a.record.end()
        ctx.record.finish()

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
        ctx.record.attempt(a)
        with a.record.current():
            await client.post("https://api.openai.com/v1/chat/completions", json={},
                              headers=a.record.trace_headers())  # fmt: skip
        succeed(ctx, a)
        a.record.end()
        ctx.record.finish()

    assert [s.name for s in h.client_spans()] == ["chat gpt-4o-mini"]  # no HTTP span
    gen_ai = h.span(SpanKind.CLIENT)
    version, trace_id, span_id, flags = seen[0].headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert span_id == format(gen_ai.context.span_id, "016x")
    assert seen[0].headers["tracestate"] == "vendor=1"


async def test_trace_headers_empty_without_a_span(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request()
    record = h.tel.start_request(ctx, {})
    record.finish()
    late = record.attempt(attempt(ctx))  # a finished record records nothing more
    assert late.span is None and late.trace_headers() == {}
    with late.current():
        pass  # nothing to make current, no error
    late.fail("timeout")
    assert h.client_spans() == []
    h2 = telemetry(TelemetryConfig(exporter="none", http_spans=True))
    ctx2 = request()
    h2.tel.start_request(ctx2, {})
    att = ctx2.record.attempt(attempt(ctx2))
    assert att.span is not None
    assert att.trace_headers() == {}  # the instrumentation injects its own


async def test_current_makes_the_attempt_span_current_and_lets_the_body_raise(
    telemetry: Callable[..., Harness],
) -> None:
    h = telemetry(TelemetryConfig(exporter="none", http_spans=True))
    ctx = request()
    h.tel.start_request(ctx, {})
    att = ctx.record.attempt(attempt(ctx))
    assert att.span is not None
    with pytest.raises(httpx.ConnectError), att.current():
        assert trace.get_current_span().get_span_context() == att.span.get_span_context()
        raise httpx.ConnectError("refused")
    assert not trace.get_current_span().get_span_context().is_valid  # detached again


# --- never fails a request -----------------------------------------------------------------------


async def test_a_failure_inside_telemetry_never_reaches_the_request(
    telemetry: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    def broken_redact(value: Any) -> tuple[Any, dict[str, int]]:
        raise RuntimeError("redactor down")

    h = telemetry(
        TelemetryConfig(exporter="none", capture_content="redacted"), redact=broken_redact
    )
    with caplog.at_level(logging.ERROR, logger="gateway.telemetry.facade"):
        for _ in range(3):
            run_ok(h, request())
        record = h.tel.start_request(request(), {})
        record.chunk_gap("not a number")  # type: ignore[arg-type]
        record.attempt(object())  # type: ignore[arg-type]
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
    logged = [r for r in caplog.records if r.name == "gateway.telemetry.facade"]
    assert len(logged) == 3  # once per failing stage
