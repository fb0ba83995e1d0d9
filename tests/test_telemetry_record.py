"""gateway.telemetry.record: one request's record. Its figures are computed once and are
the same number in every signal; a finished record lets go of its request (no reference
cycle outlives it) and records nothing more; an attempt's fail() writes the outcome on
its Attempt."""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Callable

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from gateway.pipeline.context import Attempt, RequestContext
from gateway.telemetry.record import AttemptRecord, RequestRecord
from tests.telemetry_helpers import Harness, attempt, harnesses, request, serve, succeed


@pytest.fixture
async def telemetry() -> AsyncIterator[Callable[..., Harness]]:
    async with harnesses() as make:
        yield make


async def test_each_figure_is_one_number_in_every_signal(
    telemetry: Callable[..., Harness],
) -> None:
    h = telemetry()
    ctx = request(stream=True)
    record = h.tel.start_request(ctx, {})
    a = attempt(ctx)
    att = record.attempt(a)
    ctx.upstream_wait_s = 0.0005
    ctx.first_chunk_at = a.started + 0.002
    succeed(ctx, a)
    att.end()
    record.finish()

    assert record.finished and ctx.trace is record
    assert record.overhead_ms == round(record.overhead_s * 1000.0, 3)
    assert record.ttft_s == ctx.time_to_first_chunk()
    assert record.cost_usd == ctx.cost_nano / 1e9  # type: ignore[operator]
    server = h.span(SpanKind.SERVER)
    assert server.attributes["tallygate.overhead_ms"] == record.overhead_ms  # type: ignore[index]
    assert server.attributes["tallygate.cost.usd"] == record.cost_usd  # type: ignore[index]
    (line,) = h.lines()
    assert line["overhead_ms"] == record.overhead_ms
    assert line["ttft_ms"] == round(record.ttft_s * 1000.0, 3)  # type: ignore[operator]
    assert line["latency_ms"] == round(record.elapsed_s * 1000.0, 3)
    assert line["cost_usd"] == "0.000008550"  # the documented exact decimal
    (overhead,) = h.metric("tallygate.overhead.duration")
    assert overhead.sum == record.overhead_s
    (ttfc,) = h.metric("gen_ai.client.operation.time_to_first_chunk")
    assert ttfc.sum == record.ttft_s
    (duration,) = h.metric("gen_ai.client.operation.duration")
    assert duration.sum == record.elapsed_s
    # the attempt's time to first chunk counts from the attempt's start, not the request's
    client = h.span(SpanKind.CLIENT)
    assert client.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.002)  # type: ignore[index]


async def test_a_finished_request_leaves_no_reference_cycle(
    telemetry: Callable[..., Harness],
) -> None:
    h = telemetry()
    gc.collect()
    gc.disable()
    try:
        ctx = request()
        a = serve(h.tel, ctx)
        assert a.record is None  # let go at finish
        del ctx, a
        gc.set_debug(gc.DEBUG_SAVEALL)  # unreachable objects kept in gc.garbage, not freed
        gc.collect()
        ours = (RequestContext, Attempt, RequestRecord, AttemptRecord)
        left_to_gc = [o for o in gc.garbage if isinstance(o, ours)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left_to_gc == []  # freed when the request ended, not by the cyclic collector


async def test_a_finished_record_records_nothing_more(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request()
    record = h.tel.start_request(ctx, {})
    ctx.status = 200
    record.finish()
    record.finish()  # once
    record.count("retry")
    record.chunk_gap(0.1)
    late = record.attempt(attempt(ctx))
    late.fail("timeout")
    assert len(h.finished()) == 1 and len(h.lines()) == 1
    assert h.metric("tallygate.retries") == []
    assert h.metric("gen_ai.client.operation.time_per_output_chunk") == []


async def test_fail_writes_the_outcome_on_the_attempt(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    ctx = request()
    record = h.tel.start_request(ctx, {})
    a = attempt(ctx)
    before = time.perf_counter()
    record.attempt(a).fail("connect_error")
    assert a.error_type == "connect_error"
    assert a.ended is not None and a.ended >= before
    (client,) = h.client_spans()  # a failed attempt's span ends at once
    assert client.attributes["error.type"] == "connect_error"  # type: ignore[index]
    assert client.status.status_code is StatusCode.ERROR
    ctx.status, ctx.error_type = 502, "upstream_error"
    record.finish()
    assert len(h.client_spans()) == 1  # not ended twice


async def test_the_record_is_on_the_context(telemetry: Callable[..., Harness]) -> None:
    ctx = request()
    with pytest.raises(RuntimeError, match="start_request"):
        ctx.record  # noqa: B018  # a stage before the pipeline started the request's record
    h = telemetry()
    record = h.tel.start_request(ctx, {})
    assert ctx.record is record and ctx.trace is record
    att = record.attempt(attempt(ctx))
    assert ctx.attempts[-1].record is att
