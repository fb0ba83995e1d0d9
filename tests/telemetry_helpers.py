"""Shared by tests/test_telemetry_*.py: a Telemetry with in-memory exporters injected
(`harnesses`, which shuts every one down), and a RequestContext built by hand, as the
pipeline builds it, then driven through the API in the pipeline's order (`serve`)."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.pipeline.context import Attempt, Principal, RequestContext
from gateway.telemetry.facade import Telemetry, TelemetryConfig
from pricing.usage import Usage

KNOWN = {"gpt-4o-mini", "smart", "claude-sonnet-4-5", "gpt-4.1", "text-embedding-3-small"}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
EMAIL = "alice@example.com"
CONTENT_KEYS = {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"}


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


@contextlib.asynccontextmanager
async def harnesses() -> AsyncIterator[Callable[..., Harness]]:
    """`make(config=None, **create_kwargs)` -> a Harness; every Telemetry made is shut down."""
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

    try:
        yield make
    finally:
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
    record = tel.start_request(ctx, headers or {})
    a = attempt(ctx)
    att = record.attempt(a)
    with att.current():
        pass
    succeed(ctx, a)
    att.end()
    record.finish()
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
