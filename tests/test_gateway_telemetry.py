"""Telemetry through the real gateway: spans, metrics, access log, OTLP on the wire, dead backends."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal

import httpx
import openai
from opentelemetry.trace import SpanKind, StatusCode

from tests.fake_upstream import FakeUpstream, Reply, chat_stream, error_reply, usage_json
from tests.gateway_harness import KEYS, RunningGateway, merge
from tests.otlp_receiver import OTLPReceiver, dead_endpoint
from tests.servers import wait_until

ALPHA = {"authorization": f"Bearer {KEYS['alpha']}"}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
PII = [{"role": "user", "content": "write to jane.doe@example.com or call +1 415 555 2671"}]


def spans_by_kind(gw: RunningGateway, n: int):
    wait_until(lambda: len(gw.spans.get_finished_spans()) >= n, within=5, what=f"{n} spans")
    spans = gw.spans.get_finished_spans()
    server = [s for s in spans if s.kind == SpanKind.SERVER]
    genai = [
        s for s in spans if s.kind == SpanKind.CLIENT and s.attributes.get("gen_ai.operation.name")
    ]
    http = [
        s
        for s in spans
        if s.kind == SpanKind.CLIENT and not s.attributes.get("gen_ai.operation.name")
    ]
    return server, genai, http


def test_non_stream_spans_continue_traceparent_and_reach_the_provider(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={**ALPHA, "traceparent": TRACEPARENT},
        json={"model": "gpt-4o-mini", "messages": PII, "temperature": 0.2, "max_tokens": 40},
    )
    assert r.status_code == 200
    [server], [chat], http_spans = spans_by_kind(gateway, 2)
    assert http_spans == []  # telemetry.http_spans is off by default
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == "b7ad6b7169203331"
    assert chat.parent.span_id == server.context.span_id
    assert chat.name == "chat gpt-4o-mini"
    assert chat.attributes["http.response.status_code"] == 200
    a = chat.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.request.temperature"] == 0.2 and a["gen_ai.request.max_tokens"] == 40
    assert a["gen_ai.response.id"] == "chatcmpl-fake-1"
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert (
        a["gen_ai.usage.output_tokens"] == 9
    )  # the fake counts words and a["server.address"] == "127.0.0.1"
    s = server.attributes
    assert s["http.response.status_code"] == 200
    assert s["tallygate.team"] == "alpha" and s["tallygate.key"] == "alpha-app"
    assert s["tallygate.deployment"] == "up/gpt-4o-mini" and s["tallygate.attempts"] == 1
    assert s["tallygate.cost.usd"] > 0 and s["tallygate.tokens.estimated"] is False
    # the provider got a traceparent in the same trace, pointing at the attempt's span
    sent = fake_upstream.requests[-1].headers["traceparent"]
    assert sent.split("-")[1] == TRACE_ID
    assert sent.split("-")[2] == format(chat.context.span_id, "016x")
    line = gateway.access_lines()[-1]
    assert line["trace_id"] == TRACE_ID and line["span_id"] == format(
        server.context.span_id, "016x"
    )


def test_http_spans_on_nest_the_httpx_span_and_it_goes_upstream(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    from tests.gateway_harness import running_gateway

    with running_gateway(merge(gateway_config, {"telemetry": {"http_spans": True}})) as gw:
        r = httpx.post(
            gw.base_url + "/chat/completions",
            headers={**ALPHA, "traceparent": TRACEPARENT},
            json={"model": "gpt-4o-mini", "messages": PII},
        )
        assert r.status_code == 200
        [_server], [chat], [http] = spans_by_kind(gw, 3)
    assert http.parent.span_id == chat.context.span_id
    assert http.name == "POST"
    sent = fake_upstream.requests[-1].headers["traceparent"]
    assert sent.split("-")[1] == TRACE_ID
    assert sent.split("-")[2] == format(http.context.span_id, "016x")


def test_content_is_captured_redacted(gateway: RunningGateway) -> None:
    httpx.post(
        gateway.base_url + "/chat/completions",
        headers=ALPHA,
        json={"model": "gpt-4o-mini", "messages": PII},
    )
    [server], [chat], _ = spans_by_kind(gateway, 2)
    captured = chat.attributes["gen_ai.input.messages"] + chat.attributes["gen_ai.output.messages"]
    assert "jane.doe@example.com" not in captured and "555 2671" not in captured
    assert "[EMAIL]" in captured and "[PHONE]" in captured
    assert server.attributes["tallygate.redactions.email"] >= 2
    assert "jane.doe" not in gateway.log.getvalue()


def test_one_client_span_per_attempt(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(error_reply(500), error_reply(500))
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=ALPHA,
        json={"model": "fallback", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 200
    [server], chats, _ = spans_by_kind(gateway, 4)
    chats.sort(key=lambda s: s.attributes["tallygate.attempt"])
    assert [c.attributes["tallygate.attempt"] for c in chats] == [1, 2, 3]
    assert [c.attributes.get("error.type") for c in chats] == ["500", "500", None]
    assert [c.status.status_code for c in chats] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert (
        chats[2].name == "chat gpt-4o"
        and chats[2].attributes["tallygate.deployment"] == "secondary"
    )
    assert all(c.parent.span_id == server.context.span_id for c in chats)


def test_stream_spans_and_time_to_first_chunk(gateway: RunningGateway) -> None:
    with openai.OpenAI(base_url=gateway.base_url, api_key=KEYS["alpha"], max_retries=0) as c:
        list(
            c.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "a b c"}], stream=True
            )
        )
    [_server], [chat], _ = spans_by_kind(gateway, 2)
    assert chat.attributes["gen_ai.request.stream"] is True
    assert chat.attributes["gen_ai.response.time_to_first_chunk"] > 0
    assert chat.attributes["gen_ai.usage.output_tokens"] == 3
    metrics = metric_points(gateway)
    assert "gen_ai.client.operation.time_to_first_chunk" in metrics


def test_each_figure_is_the_same_in_the_header_the_span_and_the_access_line(
    gateway: RunningGateway,
) -> None:
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=ALPHA,
        json={"model": "gpt-4o-mini", "messages": PII},
    )
    assert r.status_code == 200
    [server], _, _ = spans_by_kind(gateway, 2)
    wait_until(lambda: bool(gateway.access_lines()), within=5, what="the access line")
    line = gateway.access_lines()[-1]
    overhead = server.attributes["tallygate.overhead_ms"]
    assert r.headers["x-tallygate-overhead-ms"] == f"{overhead:.3f}"
    assert line["overhead_ms"] == overhead
    # the cost: the header's plain decimal, the line's nine decimals (both documented)
    assert Decimal(r.headers["x-tallygate-cost-usd"]) == Decimal(line["cost_usd"]) > 0
    assert len(line["cost_usd"].split(".")[1]) == 9
    assert server.attributes["tallygate.cost.usd"] == float(line["cost_usd"])


def test_openai_service_tier_and_fingerprint_go_on_the_attempt_span(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "hi"},
        "finish_reason": "stop",
    }
    answer = {"id": "chatcmpl-tier", "object": "chat.completion", "created": 1,
              "model": "gpt-4o-mini", "choices": [choice], "usage": usage_json(5, 1),
              "service_tier": "default", "system_fingerprint": "fp_44709d6fcb"}  # fmt: skip
    stream = chat_stream("a b", model="gpt-4o-mini")
    stream = replace(stream, chunks=[
        {**c, "service_tier": "flex", "system_fingerprint": "fp_2"} for c in stream.chunks
    ])  # fmt: skip
    fake_upstream.enqueue(Reply(json=answer), stream)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(gateway.base_url + "/chat/completions", headers=ALPHA, json=body).is_success
    _, [whole], _ = spans_by_kind(gateway, 2)
    assert whole.attributes["openai.response.service_tier"] == "default"
    assert whole.attributes["openai.response.system_fingerprint"] == "fp_44709d6fcb"
    with httpx.stream("POST", gateway.base_url + "/chat/completions", headers=ALPHA,
                      json={**body, "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200 and r.read()
    _, chats, _ = spans_by_kind(gateway, 4)
    streamed = next(c for c in chats if c.attributes.get("gen_ai.request.stream"))
    assert streamed.attributes["openai.response.service_tier"] == "flex"
    assert streamed.attributes["openai.response.system_fingerprint"] == "fp_2"


def test_errors_are_recorded_on_the_server_span(gateway: RunningGateway) -> None:
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": "Bearer sk-bad"},
        json={"model": "gpt-4o-mini", "messages": PII},
    )
    assert r.status_code == 401
    [server], genai, _ = spans_by_kind(gateway, 1)
    assert genai == []
    assert server.attributes["http.response.status_code"] == 401
    assert server.attributes["error.type"] == "invalid_api_key"
    # HTTP semconv: a 4xx leaves a SERVER span's status unset (it is the client's error)
    assert server.status.status_code == StatusCode.UNSET
    assert gateway.access_lines()[-1]["status"] == 401


def metric_points(gw: RunningGateway) -> dict[str, list]:
    data = gw.metrics.get_metrics_data()
    out: dict[str, list] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


def test_genai_metrics_with_semconv_attributes(gateway: RunningGateway) -> None:
    httpx.post(
        gateway.base_url + "/chat/completions",
        headers=ALPHA,
        json={"model": "gpt-4o-mini", "messages": PII},
    )
    wait_until(lambda: bool(gateway.log.getvalue()), within=5)
    points = metric_points(gateway)
    usage = points["gen_ai.client.token.usage"]
    by_type = {p.attributes["gen_ai.token.type"]: p for p in usage}
    assert set(by_type) == {"input", "output"}
    assert by_type["output"].sum == 9
    assert by_type["input"].attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert list(by_type["input"].explicit_bounds)[:3] == [1, 4, 16]
    duration = points["gen_ai.client.operation.duration"]
    assert duration and list(duration[0].explicit_bounds)[:2] == [0.01, 0.02]
    assert "tallygate.overhead.duration" in points
    for p in [*usage, *duration]:
        assert "tallygate.request_id" not in p.attributes and "user" not in p.attributes


def test_prometheus_endpoint(gateway: RunningGateway) -> None:
    httpx.post(
        gateway.base_url + "/chat/completions",
        headers=ALPHA,
        json={"model": "gpt-4o-mini", "messages": PII},
    )
    wait_until(lambda: bool(gateway.log.getvalue()), within=5)
    text = httpx.get(gateway.url + "/metrics").text
    assert "gen_ai_client_token_usage" in text
    assert "gen_ai_client_operation_duration" in text


def test_otlp_export_over_the_wire(gateway_config: dict) -> None:
    with OTLPReceiver() as rx:
        cfg = merge(gateway_config, {"telemetry": {"exporter": "otlp", "endpoint": rx.endpoint}})
        cfg["telemetry"].pop("capture_content", None)
        from gateway.app import create_app
        from gateway.config import parse_config
        from tests.servers import ServerThread

        with ServerThread(create_app(parse_config(cfg, env={}))) as server:
            r = httpx.post(
                server.url + "/v1/chat/completions",
                headers={**ALPHA, "traceparent": TRACEPARENT},
                json={"model": "gpt-4o-mini", "messages": PII},
            )
            assert r.status_code == 200
        spans = rx.wait_for_spans(2)  # flushed at shutdown at the latest
        names = {s.name for s in spans}
        assert {"POST /v1/chat/completions", "chat gpt-4o-mini"} <= names
        assert all(s.trace_id == TRACE_ID for s in spans)
        chat = next(s for s in spans if s.name == "chat gpt-4o-mini")
        assert chat.attributes["gen_ai.provider.name"] == "openai"
        assert "jane.doe@example.com" not in str(chat.attributes)
        assert chat.resource["service.name"] == "tallygate"
        assert rx.wait_for_metric("gen_ai.client.token.usage")


def test_dead_otlp_endpoint_leaves_requests_unaffected(gateway_config: dict) -> None:
    cfg = merge(
        gateway_config,
        {"telemetry": {"exporter": "otlp", "endpoint": dead_endpoint(), "export_timeout_s": 1}},
    )
    from gateway.app import create_app
    from gateway.config import parse_config
    from tests.servers import ServerThread

    with (
        ServerThread(create_app(parse_config(cfg, env={})), shutdown_timeout=15) as server,
        httpx.Client(timeout=10) as h,
    ):
        codes = [
            h.post(
                server.url + "/v1/chat/completions",
                headers=ALPHA,
                json={"model": "gpt-4o-mini", "messages": PII},
            ).status_code
            for _ in range(20)
        ]
    assert codes == [200] * 20
