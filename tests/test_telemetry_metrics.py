"""gateway.telemetry.facade: the GenAI and tallygate metrics of a request, their buckets and
attributes (read from an InMemoryMetricReader; see tests/telemetry_helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from opentelemetry.trace import SpanKind

from gateway.telemetry.facade import (
    DURATION_BUCKETS,
    OVERHEAD_BUCKETS,
    TOKEN_BUCKETS,
)
from tests.telemetry_helpers import (
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


# --- metrics -------------------------------------------------------------------------------------


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
    ctx.record.attempt(a)
    succeed(ctx, a)
    ctx.response_model = "ft:gpt-4o-mini:acme:xyz"
    a.record.end()
    ctx.record.finish()
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
    h.tel.count("store_error", ctx)  # for a caller that holds the context (budget alerts)
    h.tel.start_request(ctx, {})
    ctx.record.count("store_error")  # the pipeline's: through the request's record
    ctx.record.count("something_new")
    (store,) = h.metric("tallygate.store.errors")
    assert store.value == 2 and dict(store.attributes) == {"tallygate.team": "search"}
    (other,) = h.metric("tallygate.events")
    assert dict(other.attributes) == {
        "tallygate.team": "search",
        "tallygate.event": "something_new",
    }
