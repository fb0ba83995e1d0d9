"""Client-controlled strings through the real HTTP path: model names, x-request-id, `user`,
`metadata`, user agent, stop sequences and tracestate never reach the access log, spans,
/metrics, OTLP logs or stderr unredacted; a refused request id is replaced, and said so."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.pipeline.request_ids import REPLACED_HEADER
from tests.fake_upstream import FakeUpstream
from tests.gateway_harness import KEYS, RunningGateway, merge, running_gateway
from tests.otlp_receiver import OTLPReceiver
from tests.servers import ServerThread, wait_until

EMAIL = "dave.hostile@example.com"
CARD = "4111111111111111"
AWS = "AKIAIOSFODNN7EXAMPLE"
OPENAI_KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD"
PHONE = "+1 415 555 2671"
SECRETS = (EMAIL, CARD, AWS, OPENAI_KEY, PHONE)
HOSTILE_MODEL = f"{EMAIL} {CARD} {AWS}"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"
HI = [{"role": "user", "content": "hi"}]
# the gateway's loggers (not the openai client's: it logs the request it sends)
GATEWAY_LOGGERS = ("tallygate", "gateway", "policies", "pricing", "uvicorn", "opentelemetry")


@pytest.fixture
def gateway(gateway_config: dict, caplog: pytest.LogCaptureFixture) -> Iterator[RunningGateway]:
    for name in GATEWAY_LOGGERS:  # every record of the gateway's, whatever its level
        caplog.set_level(logging.DEBUG, logger=name)
    with running_gateway(gateway_config) as gw:
        yield gw


def client(gw: RunningGateway, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.base_url, api_key=KEYS["alpha"], max_retries=0, default_headers=headers
    )


def spans_text(gw: RunningGateway) -> str:
    """Everything a span exports that could carry a string: name, attributes, status,
    events, trace state."""
    return json.dumps(
        [
            {
                "name": s.name,
                "attributes": {k: str(v) for k, v in (s.attributes or {}).items()},
                "status": s.status.description,
                "events": [str(e.attributes) for e in s.events],
                "trace_state": s.context.trace_state.to_header(),
            }
            for s in gw.spans.get_finished_spans()
        ]
    )


def sinks(
    gw: RunningGateway, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> dict[str, str]:
    gw.gateway.telemetry._access.flush()
    captured = capfd.readouterr()
    return {
        "access log": gw.log.getvalue(),
        "spans": spans_text(gw),
        "/metrics": httpx.get(gw.url + "/metrics").text,
        "stdout": captured.out,
        "stderr": captured.err + caplog.text,
    }


def leaks(found: dict[str, str], *values: str) -> list[tuple[str, str]]:
    return [(where, v) for where, text in found.items() for v in values or SECRETS if v in text]


def wait_for_lines(gw: RunningGateway, n: int) -> list[dict[str, Any]]:
    wait_until(lambda: len(gw.access_lines()) >= n, within=5, what=f"{n} access lines")
    return gw.access_lines()


def test_hostile_model_name_is_redacted_everywhere(
    gateway: RunningGateway, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with client(gateway) as c:
        with pytest.raises(openai.NotFoundError) as refused:
            c.chat.completions.create(model=HOSTILE_MODEL, messages=HI)
        # a configured name with a tail is no snapshot: refused too, and no metric label
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model=f"gpt-4o-mini-{EMAIL}", messages=HI)
    assert EMAIL in refused.value.message  # the client hears its own model name back
    first, second = wait_for_lines(gateway, 2)
    assert first["model"] == "[EMAIL] [CREDIT_CARD] [SECRET]"
    assert first["error_type"] == "model_not_found"
    assert "`[EMAIL] [CREDIT_CARD] [SECRET]`" in first["error_message"]
    assert second["model"] == "[EMAIL]"  # the e-mail swallows the name before it
    server = [s for s in gateway.spans.get_finished_spans() if s.name.startswith("POST")]
    assert [s.attributes["tallygate.model"] for s in server] == [
        "[EMAIL] [CREDIT_CARD] [SECRET]",
        "[EMAIL]",
    ]
    assert server[0].attributes["tallygate.redactions.email"] == 2  # the model, the message
    found = sinks(gateway, capfd, caplog)
    assert leaks(found) == []
    assert 'tallygate_model="_OTHER"' in found["/metrics"]


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (OPENAI_KEY, "sensitive"),  # fits the charset; the secret detector flags it
        (CARD, "sensitive"),
        (EMAIL, "invalid"),  # `@` is outside the charset
        ("a" * 129, "invalid"),  # too long
        ("id with spaces", "invalid"),
        ('x"}{"y', "invalid"),
    ],
)
def test_refused_request_id_is_replaced(
    gateway: RunningGateway,
    fake_upstream: FakeUpstream,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    sent: str,
    reason: str,
) -> None:
    with client(gateway, **{"x-request-id": sent}) as c:
        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert raw.status_code == 200
    given = raw.headers["x-request-id"]
    assert given != sent and given.startswith("req_")
    assert raw.headers[REPLACED_HEADER] == reason
    assert fake_upstream.requests[-1].headers["x-request-id"] == given
    (line,) = wait_for_lines(gateway, 1)
    assert line["request_id"] == given
    found = sinks(gateway, capfd, caplog)
    assert leaks(found, sent) == []
    assert given in found["spans"]


def test_refused_request_id_on_a_stream_and_an_error(
    gateway: RunningGateway, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with client(gateway, **{"x-request-id": OPENAI_KEY}) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=HI, stream=True
        )
        assert raw.headers[REPLACED_HEADER] == "sensitive"
        assert raw.headers["x-request-id"].startswith("req_")
        assert "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
        r = httpx.post(
            gateway.base_url + "/chat/completions",
            headers={"authorization": "Bearer sk-wrong-key", "x-request-id": OPENAI_KEY},
            json={"model": "gpt-4o-mini", "messages": HI},
        )
    assert r.status_code == 401
    assert r.headers[REPLACED_HEADER] == "sensitive"
    assert r.headers["x-request-id"].startswith("req_")
    wait_for_lines(gateway, 2)
    assert leaks(sinks(gateway, capfd, caplog), OPENAI_KEY) == []


def test_valid_request_id_is_echoed_unchanged(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    sent = "client-42_retry.1:9f8e7d6c-5b4a-4321-8765-0123456789ab"
    with client(gateway, **{"x-request-id": sent}) as c:
        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert raw.headers["x-request-id"] == sent
    assert REPLACED_HEADER not in raw.headers
    assert fake_upstream.requests[-1].headers["x-request-id"] == sent
    (line,) = wait_for_lines(gateway, 1)
    assert line["request_id"] == sent
    (server,) = [s for s in gateway.spans.get_finished_spans() if s.name.startswith("POST")]
    assert server.attributes["tallygate.request_id"] == sent


def test_no_request_id_gets_one_of_ours_without_the_replaced_header(
    gateway: RunningGateway,
) -> None:
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert raw.headers["x-request-id"].startswith("req_")
    assert REPLACED_HEADER not in raw.headers


def test_user_metadata_user_agent_stop_and_tracestate(
    gateway: RunningGateway,
    fake_upstream: FakeUpstream,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    headers = {
        "user-agent": f"bot/1.0 ({EMAIL})",
        "traceparent": TRACEPARENT,
        "tracestate": f"ok=fine,leak={EMAIL}",
    }
    with client(gateway, **headers) as c:
        reply = c.chat.completions.create(
            model="gpt-4o-mini",
            messages=HI,
            user=EMAIL,
            stop=[CARD],
            extra_body={"metadata": {"owner": EMAIL, "key": OPENAI_KEY, "phone": PHONE}},
        )
    assert reply.choices[0].message.content
    sent = fake_upstream.requests[-1]
    # the provider gets the client's request as it was: redaction is for what we export
    assert sent.json["user"] == EMAIL and sent.json["metadata"]["key"] == OPENAI_KEY
    assert sent.headers["tracestate"] == "ok=fine"  # the flagged entry is not passed on
    wait_for_lines(gateway, 1)
    spans = gateway.spans.get_finished_spans()
    (server,) = [s for s in spans if s.name.startswith("POST")]
    (attempt,) = [s for s in spans if s.name.startswith("chat ")]
    assert server.attributes["user_agent.original"] == "bot/1.0 ([EMAIL])"
    assert attempt.attributes["gen_ai.request.stop_sequences"] == ("[CREDIT_CARD]",)
    assert format(server.context.trace_id, "032x") == TRACE_ID  # the trace still continues
    assert dict(server.context.trace_state) == {"ok": "fine"}
    assert dict(attempt.context.trace_state) == {"ok": "fine"}
    assert leaks(sinks(gateway, capfd, caplog)) == []


def test_non_inference_routes_do_not_echo_the_request_id(gateway: RunningGateway) -> None:
    r = httpx.get(
        gateway.base_url + "/models",
        headers={"authorization": f"Bearer {KEYS['alpha']}", "x-request-id": OPENAI_KEY},
    )
    assert r.status_code == 200
    assert OPENAI_KEY not in str(r.headers)


def test_otlp_logs_and_spans_over_the_wire(
    gateway_config: dict, capfd: pytest.CaptureFixture[str]
) -> None:
    with OTLPReceiver() as rx:
        cfg = merge(
            gateway_config,
            {"telemetry": {"exporter": "otlp", "endpoint": rx.endpoint, "export_logs": True}},
        )
        from gateway.app import create_app
        from gateway.config import parse_config

        with ServerThread(create_app(parse_config(cfg, env={}))) as server:
            with openai.OpenAI(
                base_url=server.url + "/v1",
                api_key=KEYS["alpha"],
                max_retries=0,
                default_headers={"x-request-id": OPENAI_KEY, "user-agent": f"ua {EMAIL}"},
            ) as c:
                with pytest.raises(openai.NotFoundError):
                    c.chat.completions.create(model=HOSTILE_MODEL, messages=HI)
                c.chat.completions.create(model="gpt-4o-mini", messages=HI, user=EMAIL)
        logs = rx.wait_for_logs(2)  # flushed at shutdown at the latest
        spans = rx.wait_for_spans(3)
    models = sorted(str(log.body["model"]) for log in logs)
    assert models == ["[EMAIL] [CREDIT_CARD] [SECRET]", "gpt-4o-mini"]
    exported = json.dumps([log.body for log in logs], default=str) + json.dumps(
        [(s.name, s.attributes, s.status_message) for s in spans], default=str
    )
    assert [v for v in SECRETS if v in exported] == []
    out = capfd.readouterr()
    assert [v for v in SECRETS if v in out.out + out.err] == []


# --- the parts, directly ----------------------------------------------------------------


def test_request_id_rules() -> None:
    from gateway.pipeline.request_ids import incoming_request_id
    from policies.redaction import RedactionConfig, Redactor

    redactor = Redactor(RedactionConfig())

    def new() -> str:
        return "req_new"

    assert incoming_request_id({}, redactor, new) == ("req_new", {})
    assert incoming_request_id({"x-request-id": ""}, redactor, new) == ("req_new", {})
    longest = "a" * 128
    assert incoming_request_id({"x-request-id": longest}, redactor, new) == (longest, {})
    uuid = "9f8e7d6c-5b4a-4321-8765-0123456789ab"
    assert incoming_request_id({"x-request-id": uuid}, redactor, new) == (uuid, {})
    for refused, reason in [
        ("a" * 129, "invalid"),
        ("é", "invalid"),
        ("a/b", "invalid"),
        ("AKIAIOSFODNN7EXAMPLE", "sensitive"),
        ("tel:415-555-2671", "sensitive"),
        ("123-45-6789", "sensitive"),
    ]:
        assert incoming_request_id({"x-request-id": refused}, redactor, new) == (
            "req_new",
            {REPLACED_HEADER: reason},
        ), refused


def test_model_metric_labels_keep_snapshots_only() -> None:
    from gateway.telemetry.semconv import ModelBuckets

    buckets = ModelBuckets({"gpt-4o-mini", "claude-sonnet-4-5", "gpt-4"})
    for kept in (
        "gpt-4o-mini-2024-07-18",
        "claude-sonnet-4-5-20250929",
        "gpt-4-0613",
        "gpt-4-0125-preview",
    ):
        assert buckets(kept) == kept
    for hostile in (
        f"gpt-4o-mini-{EMAIL}",
        f"gpt-4o-mini-{CARD}",
        "gpt-4o-mini-2024-07-18-x",
        "gpt-4-415-555-2671",
    ):
        assert buckets(hostile) == "_OTHER"


def test_scrubber_remembers_counts_and_withholds_on_failure() -> None:
    from gateway.pipeline.client_strings import WITHHELD, Scrubber
    from gateway.pipeline.context import RequestContext
    from policies.redaction import RedactionConfig, Redactor

    calls: list[str] = []
    redactor = Redactor(RedactionConfig())

    def redact(value: Any) -> tuple[Any, dict[str, int]]:
        calls.append(value)
        return redactor.redact_value(value)

    failures: list[int] = []
    scrub = Scrubber(redact, {"smart"}, lambda: failures.append(1))
    ctx = RequestContext(
        request_id="r", method="POST", path="/v1/chat/completions", operation="chat"
    )
    assert scrub.model(ctx, "smart") == "smart" and calls == []  # configured: not scanned
    assert scrub(ctx, f"ua {EMAIL}") == "ua [EMAIL]"
    assert scrub(ctx, f"ua {EMAIL}") == "ua [EMAIL]"
    assert calls == [f"ua {EMAIL}"]  # remembered
    assert ctx.redactions == {"email": 2}  # counted per use

    def broken(value: Any) -> tuple[Any, dict[str, int]]:
        raise RuntimeError("down")

    scrub = Scrubber(broken, (), lambda: failures.append(1))
    assert scrub.model(ctx, HOSTILE_MODEL) == WITHHELD
    assert failures == [1]
