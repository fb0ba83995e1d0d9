"""gateway.telemetry.facade: content capture on spans (none, redacted, full), never in the
access line (see tests/telemetry_helpers.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import pytest
from opentelemetry.trace import SpanKind

from gateway.telemetry.facade import (
    TelemetryConfig,
)
from tests.telemetry_helpers import (
    CONTENT_KEYS,
    EMAIL,
    Harness,
    attempt,
    fake_redact,
    harnesses,
    request,
    run_ok,
)


@pytest.fixture
async def telemetry() -> AsyncIterator[Callable[..., Harness]]:
    async with harnesses() as make:
        yield make


# --- content capture -----------------------------------------------------------------------------


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
    ctx.record.attempt(a)
    a.error_type = "connect_error"
    a.record.end()
    ctx.status = 502
    ctx.error_type = "upstream_error"
    ctx.record.finish()
    server = dict(h.span(SpanKind.SERVER).attributes or {})
    assert "gen_ai.input.messages" in server and "gen_ai.output.messages" not in server
