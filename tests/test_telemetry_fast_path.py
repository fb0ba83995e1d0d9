"""telemetry.fast_path: the plain SDK objects give the same telemetry as the fast path; the
private SDK names the fast path needs are listed and checked, here and at the gateway's
start (one missing: the plain SDK path, one warning)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config import parse_config
from gateway.telemetry import export as telemetry_export
from gateway.telemetry.export import missing_names
from gateway.telemetry.facade import fast_path_missing
from gateway.telemetry.fast import otlp_spans
from gateway.telemetry.fast.histograms import private_sdk_names as histogram_sdk_names
from gateway.telemetry.fast.lite_spans import LiteTracer, PlainTracer
from gateway.telemetry.fast.otlp_spans import FastHTTPSpanExporter
from tests.fake_upstream import FakeUpstream, error_reply
from tests.gateway_harness import KEYS, merge, running_gateway
from tests.otlp_receiver import OTLPReceiver, ReceivedLog, ReceivedPoint, ReceivedSpan
from tests.servers import ServerThread, wait_until
from tests.telemetry_mode import fast_path_default

ALPHA = {"authorization": f"Bearer {KEYS['alpha']}", "user-agent": "tallygate-tests/1.0"}
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
PII = [{"role": "user", "content": "write to jane.doe@example.com please"}]
HISTOGRAM = "opentelemetry.sdk.metrics._internal.instrument._Histogram"
# what differs between any two runs: ids, clocks and the time they measure
VOLATILE_SPAN = {
    "tallygate.request_id",
    "tallygate.overhead_ms",
    "gen_ai.response.time_to_first_chunk",
}
VOLATILE_LOG = {"timestamp", "request_id", "trace_id", "span_id", "latency_ms", "overhead_ms",
                "ttft_ms"}  # fmt: skip
TIMED = {"gen_ai.client.operation.duration", "gen_ai.client.operation.time_to_first_chunk",
         "tallygate.overhead.duration"}  # fmt: skip
# how many gaps a stream has depends on how its events arrive in reads: not compared
CHUNK_GAPS = "gen_ai.client.operation.time_per_output_chunk"


# --- the private names ------------------------------------------------------------------


def test_every_private_sdk_name_the_fast_path_needs_exists() -> None:
    exporter = FastHTTPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    try:
        pairs = histogram_sdk_names() + otlp_spans.private_sdk_names(exporter)
        assert len(pairs) == 3 + len(otlp_spans.EXPORTER_NAMES)
        assert missing_names(pairs) == []
        assert fast_path_missing(exporter) == [] and exporter.fast
    finally:
        exporter.shutdown()


def test_every_private_sdk_name_the_export_plumbing_reads_exists() -> None:
    # read with fallbacks in both modes: a rename would degrade silently, so CI says it here
    pairs = telemetry_export.private_sdk_names()
    assert len(pairs) == 4
    assert missing_names(pairs) == []


def test_a_missing_name_is_reported_by_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(HISTOGRAM)
    assert fast_path_missing() == ["opentelemetry.sdk.metrics._internal.instrument._Histogram"]
    # as if a release renamed one: the name the fast exporter reads is not there
    monkeypatch.setattr(otlp_spans, "EXPORTER_NAMES", (*otlp_spans.EXPORTER_NAMES, "_renamed"))
    exporter = FastHTTPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    assert not exporter.fast  # its export() is the official one then
    assert fast_path_missing(exporter) == [
        "opentelemetry.sdk.metrics._internal.instrument._Histogram",
        "FastHTTPSpanExporter._renamed",
    ]
    exporter.shutdown()


def test_the_gateway_starts_on_the_plain_sdk_when_a_name_is_missing(
    gateway_config: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delattr(HISTOGRAM)
    caplog.set_level(logging.WARNING, logger="gateway.telemetry.facade")
    with running_gateway(merge(gateway_config, {"telemetry": {"fast_path": True}})) as gw:
        r = httpx.post(gw.base_url + "/chat/completions", headers=ALPHA,
                       json={"model": "gpt-4o-mini", "messages": PII})  # fmt: skip
        assert r.status_code == 200
        wait_until(lambda: len(gw.spans.get_finished_spans()) >= 2, within=5, what="2 spans")
        telemetry = gw.gateway.telemetry
    assert telemetry.fast_path is False and isinstance(telemetry._recorder.spans, PlainTracer)
    [warning] = [r for r in caplog.records if "fast path" in r.getMessage()]
    assert HISTOGRAM in warning.getMessage() and "fast_path: false" in warning.getMessage()
    assert {s.name for s in gw.spans.get_finished_spans()} == {
        "POST /v1/chat/completions", "chat gpt-4o-mini",
    }  # fmt: skip
    names = {m.name for rm in gw.metrics.get_metrics_data().resource_metrics
             for sm in rm.scope_metrics for m in sm.metrics}  # fmt: skip
    assert "gen_ai.client.operation.duration" in names  # the SDK's own histogram


def test_a_renamed_exporter_internal_sends_spans_the_official_way(
    gateway_config: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # as if a release renamed one: the name the fast exporter reads is not there
    monkeypatch.setattr(otlp_spans, "EXPORTER_NAMES", (*otlp_spans.EXPORTER_NAMES, "_renamed"))
    caplog.set_level(logging.WARNING, logger="gateway.telemetry.facade")
    with OTLPReceiver() as rx:
        telemetry = {"exporter": "otlp", "endpoint": rx.endpoint, "fast_path": True}
        app = create_app(parse_config(merge(gateway_config, {"telemetry": telemetry}), env={}))
        with ServerThread(app) as server:
            r = httpx.post(server.url + "/v1/chat/completions", headers=ALPHA,
                           json={"model": "gpt-4o-mini", "messages": PII})  # fmt: skip
            assert r.status_code == 200
            assert app.state.gateway.telemetry.fast_path is False
        spans = rx.wait_for_spans(2)  # flushed at shutdown at the latest
    assert {s.name for s in spans} == {"POST /v1/chat/completions", "chat gpt-4o-mini"}
    [warning] = [r for r in caplog.records if "fast path" in r.getMessage()]
    assert "FastHTTPSpanExporter._renamed" in warning.getMessage()


# --- the mode switch and the same telemetry in both modes --------------------------------


def test_the_test_runs_mode_reaches_the_gateway(pytestconfig: pytest.Config, gateway) -> None:  # type: ignore[no-untyped-def]
    """.ci/run runs the telemetry tests again with tests/telemetry_mode.py: this proves the
    switch got through to the gateway (and that the default is the fast path)."""
    telemetry = gateway.gateway.telemetry
    assert telemetry.fast_path is fast_path_default(pytestconfig)
    expected = LiteTracer if fast_path_default(pytestconfig) else PlainTracer
    assert isinstance(telemetry._recorder.spans, expected)


def _exchange(cfg: dict, fake: FakeUpstream) -> OTLPReceiver:
    """The same requests through one gateway exporting to its own receiver: a plain chat
    continuing a traceparent, a stream, a retried 503, a rejected unknown model."""
    fake.reset()
    fake.enqueue_for("/v1/chat/completions", error_reply(503))  # then the default answer
    with OTLPReceiver() as rx:
        telemetry = {"exporter": "otlp", "endpoint": rx.endpoint, "export_logs": True}
        app = create_app(parse_config(merge(cfg, {"telemetry": telemetry}), env={}))
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=10) as h:
            chat = {"model": "gpt-4o-mini", "messages": PII}
            assert h.post("/v1/chat/completions", headers=ALPHA, json=chat).status_code == 200
            assert h.post("/v1/chat/completions", headers={**ALPHA, "traceparent": TRACEPARENT},
                          json={**chat, "temperature": 0.2}).status_code == 200  # fmt: skip
            stream = {**chat, "stream": True, "stream_options": {"include_usage": True}}
            assert h.post("/v1/chat/completions", headers=ALPHA, json=stream).status_code == 200
            unknown = {**chat, "model": "no-such-model"}
            assert h.post("/v1/chat/completions", headers=ALPHA, json=unknown).status_code == 404
        rx.wait_for_spans(8)  # 4 SERVER, 4 CLIENT (the 503 and its retry: two)
        rx.wait_for_logs(4)
        rx.wait_for_metric("gen_ai.client.token.usage")
    return rx


def _spans(spans: list[ReceivedSpan]) -> list[tuple[Any, ...]]:
    by_id = {s.span_id: s for s in spans}
    out = []
    for s in spans:
        parent = by_id.get(s.parent_span_id)
        attributes = {k: v for k, v in s.attributes.items() if k not in VOLATILE_SPAN}
        out.append((s.name, s.kind, s.status, s.status_message, parent.name if parent else None,
                    s.resource.get("service.name"), sorted(attributes.items(), key=repr)))  # fmt: skip
    return sorted(out, key=repr)


def _points(points: list[ReceivedPoint]) -> list[tuple[Any, ...]]:
    out = []
    for p in points:
        if p.metric == CHUNK_GAPS:
            continue
        value: Any = p.value
        if p.kind == "histogram":  # timings differ; counts, and other sums, do not
            value = (p.count, p.bounds) if p.metric in TIMED else (p.count, p.sum, p.bucket_counts)
        out.append((p.metric, p.unit, p.kind, sorted(p.attributes.items(), key=repr), value))
    return sorted(out, key=repr)


def _logs(logs: list[ReceivedLog]) -> list[tuple[Any, ...]]:
    out = []
    for log in logs:
        body = {k: v for k, v in log.body.items() if k not in VOLATILE_LOG}
        out.append((log.event_name, log.severity, sorted(body.items(), key=repr)))
    return sorted(out, key=repr)


def test_both_modes_export_the_same_spans_metrics_and_logs(
    gateway_config: dict, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    runs = {}
    for fast in (True, False):
        cfg = merge(gateway_config, {"telemetry": {"fast_path": fast},
                                     "store": {"path": str(tmp_path / f"{fast}.db")}})  # fmt: skip
        runs[fast] = _exchange(cfg, fake_upstream)
    fast, plain = runs[True], runs[False]
    assert len(fast.spans) == len(plain.spans) == 8
    assert _spans(plain.spans) == _spans(fast.spans)
    assert len(fast.logs) == len(plain.logs) == 4
    assert _logs(plain.logs) == _logs(fast.logs)
    # metrics are exported periodically and at shutdown: compare the last export's points
    assert _points(_last_export(plain.points)) == _points(_last_export(fast.points))
    assert {p.metric for p in fast.points} >= {"gen_ai.client.token.usage", "tallygate.requests"}


def _last_export(points: list[ReceivedPoint]) -> list[ReceivedPoint]:
    """Cumulative points: the last one of each series is the whole run."""
    last: dict[Any, ReceivedPoint] = {}
    for p in points:
        last[(p.metric, repr(sorted(p.attributes.items(), key=repr)))] = p
    return list(last.values())


def test_span_limits_hold_in_both_modes(
    gateway_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "5")
    agents = {}
    for fast in (True, False):
        with running_gateway(merge(gateway_config, {"telemetry": {"fast_path": fast}})) as gw:
            r = httpx.post(gw.base_url + "/chat/completions", headers=ALPHA,
                           json={"model": "gpt-4o-mini", "messages": PII})  # fmt: skip
            assert r.status_code == 200
            wait_until(lambda gw=gw: len(gw.spans.get_finished_spans()) >= 2, within=5)
            [server] = [s for s in gw.spans.get_finished_spans() if s.name.startswith("POST")]
            agents[fast] = server.attributes["user_agent.original"]
            assert server.attributes["tallygate.team"] == "alpha"  # 5 characters: whole
    assert agents == {True: "tally", False: "tally"}
