"""POST /v1/responses (OpenAI's Responses API) through the real HTTP path, with the official
openai SDK as the client and the scripted upstream replaying golden fixtures of OpenAI's
wire format (tests/data/responses): whole and streamed answers, function calls, budgets,
disconnects, retries and fallbacks, spans, the access log, and the protocol's own error
event when a stream breaks."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.trace import SpanKind

from pricing.encodings import get_encoding
from pricing.tokens import REPLY_PRIMING, TOKENS_PER_MESSAGE, TokenCounter
from tests.fake_upstream import FakeUpstream, Hang, RecordedRequest, Reply, Stream, error_reply
from tests.gateway_harness import KEYS, UPSTREAM_KEY, RunningGateway, merge, running_gateway
from tests.servers import wait_until

DATA = Path(__file__).parent / "data" / "responses"
AUTH = {"authorization": f"Bearer {KEYS['alpha']}"}
TEXT = "Hi there! How can I help you today?"  # the golden answer's text
COST = Decimal("0.0000576")  # its usage, 36 in + 87 out, at gpt-4o-mini's $0.15 / $0.60 per M
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Get current temperature for a given location.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
            "additionalProperties": False,
        },
        "strict": True,
    }
]


# --- the golden fixtures and the scripted upstream ----------------------------------------


def raw_events(name: str) -> list[str]:
    """A fixture's events as sent on the wire, one string each."""
    text = (DATA / name).read_text()
    return [event + "\n\n" for event in text.split("\n\n") if event.strip()]


def event_json(event: str) -> dict[str, Any]:
    [data] = [line[6:] for line in event.splitlines() if line.startswith("data: ")]
    return json.loads(data)  # type: ignore[no-any-return]


def golden(name: str, **stream: Any) -> Stream:
    """The fixture as an upstream stream (the Responses API sends no [DONE])."""
    return Stream(raw_events(name), done=False, **stream)


def terminal_response(name: str) -> dict[str, Any]:
    """The `response` of a fixture stream's last event: the same answer, whole."""
    return event_json(raw_events(name)[-1])["response"]  # type: ignore[no-any-return]


def answer(request: RecordedRequest, number: int) -> Reply | Stream | None:
    """The upstream's unscripted answer on /responses: the golden text, whole or streamed."""
    if not request.path.endswith("/responses"):
        return None
    if isinstance(request.json, dict) and request.json.get("stream"):
        return golden("text.sse")
    return Reply(json=json.loads((DATA / "text.json").read_text()))


def delta_stream(words: list[str], **stream: Any) -> Stream:
    """A text answer of many deltas (created, deltas, completed without usage)."""
    created = raw_events("text.sse")[0]
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    deltas = [
        {"type": "response.output_text.delta", "sequence_number": i + 1, **where, "delta": w}
        for i, w in enumerate(words)
    ]
    return Stream([created, *deltas], done=False, **stream)


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    fake_upstream.answer = answer
    return fake_upstream


def client(gw: RunningGateway, key: str = KEYS["alpha"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=10)


def last_line(gw: RunningGateway, n: int = 1) -> dict[str, Any]:
    wait_until(lambda: len(gw.access_lines()) >= n, within=5, what=f"{n} access line(s)")
    return gw.access_lines()[-1]


def spend(gw: RunningGateway) -> dict[str, Decimal]:
    admin = {"authorization": f"Bearer {KEYS['admin']}"}
    rows = httpx.get(gw.url + "/admin/spend", headers=admin, timeout=10).json()["data"]
    [row] = [r for r in rows if r["team"] == "alpha" and r["key"] is None]
    return {"spent": Decimal(row["spent_usd"]), "reserved": Decimal(row["reserved_usd"])}


def client_spans(gw: RunningGateway, n: int) -> list[Any]:
    def finished() -> list[Any]:
        return [s for s in gw.spans.get_finished_spans() if s.kind == SpanKind.CLIENT]

    wait_until(lambda: len(finished()) >= n, within=5, what=f"{n} client spans")
    return finished()


def server_span(gw: RunningGateway) -> Any:
    wait_until(
        lambda: any(s.kind == SpanKind.SERVER for s in gw.spans.get_finished_spans()),
        within=5,
        what="the server span",
    )
    return next(s for s in gw.spans.get_finished_spans() if s.kind == SpanKind.SERVER)


def sse_body(body: str) -> list[str]:
    return [event + "\n\n" for event in body.split("\n\n") if event.strip()]


# --- whole and streamed answers ----------------------------------------------------------


def test_a_whole_response_through_the_sdk(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    with client(gateway) as c:
        raw = c.responses.with_raw_response.create(
            model="gpt-4o-mini", input="Say hi", instructions="Be brief."
        )
        response = raw.parse()
    assert response.output_text == TEXT
    assert response.usage is not None and response.usage.output_tokens == 87
    assert raw.headers["x-tallygate-cost-usd"] == str(COST)
    assert raw.headers["x-tallygate-deployment"] == "up/gpt-4o-mini"
    sent = upstream.requests[-1]
    assert sent.path == "/v1/responses"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    # only the model rewritten; nothing added (no stream_options, no cap)
    assert sent.json == {"model": "gpt-4o-mini", "input": "Say hi", "instructions": "Be brief."}
    line = last_line(gateway)
    assert line["path"] == "/v1/responses" and line["status"] == 200
    assert line["model"] == "gpt-4o-mini" and line["upstream_model"] == "gpt-4o-mini"
    assert (line["input_tokens"], line["output_tokens"]) == (36, 87)
    assert line["tokens_estimated"] is False and Decimal(str(line["cost_usd"])) == COST


def test_a_stream_relays_the_golden_events_and_is_metered_from_response_completed(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    with client(gateway) as c:
        events = list(c.responses.create(model="gpt-4o-mini", input="Say hi", stream=True))
    golden_events = [event_json(e) for e in raw_events("text.sse")]
    assert [e.type for e in events] == [e["type"] for e in golden_events]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == TEXT
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == TEXT
    assert final.response.usage is not None and final.response.usage.output_tokens == 87
    assert "stream_options" not in upstream.requests[-1].json  # its usage comes anyway
    line = last_line(gateway)
    assert (line["input_tokens"], line["output_tokens"]) == (36, 87)
    assert line["tokens_estimated"] is False and Decimal(str(line["cost_usd"])) == COST


def test_stream_events_go_out_byte_for_byte_but_the_usage_gets_its_cost(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    r = httpx.post(
        gateway.base_url + "/responses",
        headers=AUTH,
        json={"model": "gpt-4o-mini", "input": "Say hi", "stream": True},
        timeout=10,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    sent, fixture = sse_body(r.text), raw_events("text.sse")
    assert sent[:-1] == fixture[:-1]
    assert sent[-1].startswith("event: response.completed\ndata: ")
    usage = event_json(sent[-1])["response"]["usage"]
    assert Decimal(str(usage.pop("cost"))) == COST
    assert usage == event_json(fixture[-1])["response"]["usage"]


@pytest.mark.parametrize("fixture", ["text.sse", "function_call.sse"])
def test_a_stream_costs_what_the_whole_response_with_the_same_usage_costs(
    gateway: RunningGateway, upstream: FakeUpstream, fixture: str
) -> None:
    upstream.enqueue(Reply(json=terminal_response(fixture)), golden(fixture))
    with client(gateway) as c:
        whole = c.responses.with_raw_response.create(model="gpt-4o-mini", input="hi")
        events = list(c.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    whole_cost = Decimal(whole.headers["x-tallygate-cost-usd"])
    usage = events[-1].response.usage
    assert usage is not None and usage.model_extra is not None
    stream_cost = Decimal(str(usage.model_extra["cost"]))
    wait_until(lambda: len(gateway.access_lines()) >= 2, within=5, what="two access lines")
    logged = [Decimal(str(line["cost_usd"])) for line in gateway.access_lines()[-2:]]
    assert whole_cost == stream_cost == logged[0] == logged[1]
    expected = {  # per M: input $0.15, cached input $0.075, output $0.60
        "text.sse": 36 * Decimal("0.15") + 87 * Decimal("0.60"),
        "function_call.sse": 35 * Decimal("0.15") + 256 * Decimal("0.075") + 23 * Decimal("0.60"),
    }[fixture] / 10**6
    assert whole_cost == expected


# --- function calling ---------------------------------------------------------------------


def test_a_function_call_round_trip(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    question = {"role": "user", "content": "What is the weather like in Paris today?"}
    upstream.enqueue(golden("function_call.sse"))
    with client(gateway) as c:
        events = list(
            c.responses.create(model="gpt-4o-mini", input=[question], tools=TOOLS, stream=True)
        )
        [call] = events[-1].response.output
        assert call.type == "function_call" and call.name == "get_weather"
        pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert "".join(pieces) == call.arguments
        assert json.loads(call.arguments) == {"location": "Paris, France"}
        # the app runs the tool and sends its result back with the call
        follow_up = [
            question,
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 14}'},
        ]
        response = c.responses.create(model="gpt-4o-mini", input=follow_up, tools=TOOLS)
    assert response.output_text == TEXT
    sent = upstream.requests[-1].json
    assert sent["input"] == follow_up and sent["tools"] == TOOLS  # passed through untouched
    first, second = client_spans(gateway, 2)[-2:]
    assert tuple(first.attributes["gen_ai.response.finish_reasons"]) == ("tool_calls",)
    [out] = json.loads(first.attributes["gen_ai.output.messages"])
    [part] = out["parts"]
    assert part["type"] == "tool_call" and part["name"] == "get_weather"
    assert part["id"] == call.call_id and json.loads(part["arguments"]) == {
        "location": "Paris, France"
    }
    assert first.attributes["gen_ai.usage.cache_read.input_tokens"] == 256
    history = json.loads(second.attributes["gen_ai.input.messages"])
    assert [m["parts"][0]["type"] for m in history] == ["text", "tool_call", "tool_call_response"]
    tools = json.loads(second.attributes["gen_ai.tool.definitions"])
    assert tools[0]["name"] == "get_weather"


# --- budgets ----------------------------------------------------------------------------


def test_the_reservation_is_the_prompt_plus_max_output_tokens_exactly(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    body = {
        "model": "gpt-4o-mini",
        "instructions": "Answer in one line.",
        "input": [{"role": "user", "content": "Tell me a story"}],
        "max_output_tokens": 1000,
        "stream": True,
    }
    prompt = gateway.gateway.counter.count_responses("gpt-4o-mini", body).tokens
    upstream.enqueue(golden("text.sse", gate=True))
    with httpx.stream("POST", gateway.base_url + "/responses", headers=AUTH, json=body) as r:
        chunks = r.iter_bytes()
        assert b"response.created" in next(chunks)  # in flight: reserved, not yet settled
        during = spend(gateway)
        upstream.release(100)
        rest = b"".join(chunks)
    assert b"response.completed" in rest
    assert during["reserved"] == (prompt * Decimal("0.15") + 1000 * Decimal("0.60")) / 10**6
    assert during["spent"] == 0
    wait_until(lambda: spend(gateway)["reserved"] == 0, within=5, what="the settlement")
    assert spend(gateway)["spent"] == COST  # replaced by the actual cost


def test_a_response_that_does_not_fit_the_budget_is_a_429(
    gateway_config: dict, upstream: FakeUpstream
) -> None:
    # $0.0003 fits ~500 output tokens at $0.60 per M, not 1000
    cfg = merge(gateway_config, {"teams": {"alpha": {"budget": {"limit_usd": "0.0003"}}}})
    with running_gateway(cfg) as gw, client(gw) as c:
        with pytest.raises(openai.RateLimitError) as refused:
            c.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=1000)
        assert upstream.requests == []  # refused before anything went upstream
        err = refused.value.body
        assert isinstance(err, dict) and err["code"] == "budget_exceeded"
        assert err["type"] == "insufficient_quota" and "max_output_tokens <=" in err["message"]
        assert refused.value.response.headers["x-should-retry"] == "false"
        fits = c.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=100)
    assert fits.output_text == TEXT


def test_a_team_cap_goes_upstream_as_max_output_tokens(
    gateway_config: dict, upstream: FakeUpstream
) -> None:
    cfg = merge(gateway_config, {"teams": {"alpha": {"max_output_tokens": 50}}})
    with running_gateway(cfg) as gw, client(gw) as c:
        c.responses.create(model="gpt-4o-mini", input="hi")
        c.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=4000)
    capped = [r.json for r in upstream.requests]
    # the Responses API's field, never chat's max_tokens (which it would refuse)
    assert [b.get("max_output_tokens") for b in capped] == [50, 50]
    assert all("max_tokens" not in b and "max_completion_tokens" not in b for b in capped)


def test_the_rate_limit_applies(gateway_config: dict, upstream: FakeUpstream) -> None:
    cfg = merge(gateway_config, {"teams": {"alpha": {"rate_limit": {"rpm": 1}}}})
    with running_gateway(cfg) as gw, client(gw) as c:
        first = c.responses.with_raw_response.create(model="gpt-4o-mini", input="hi")
        with pytest.raises(openai.RateLimitError) as limited:
            c.responses.create(model="gpt-4o-mini", input="hi")
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert isinstance(limited.value.body, dict)
    assert limited.value.body["code"] == "rate_limit_exceeded"
    assert "retry-after" in limited.value.response.headers


def test_a_client_that_leaves_mid_stream_is_charged_what_was_streamed(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.enqueue(delta_stream([f"w{i} " for i in range(200)], delay_s=0.02))
    body = {"model": "gpt-4o-mini", "input": "count", "stream": True}
    with httpx.stream(
        "POST", gateway.base_url + "/responses", headers=AUTH, json=body, timeout=10
    ) as r:
        for line in r.iter_lines():
            if '"delta":"w2 "' in line:
                break
    wait_until(lambda: upstream.disconnects == 1, within=5, what="the upstream to see it")
    line = last_line(gateway)
    assert line["cancelled"] is True and line["tokens_estimated"] is True
    assert 3 <= line["output_tokens"] < 400  # what was streamed, not the whole answer
    assert upstream.sent_chunks < 201
    balance = spend(gateway)
    assert balance["reserved"] == 0 and balance["spent"] == Decimal(str(line["cost_usd"])) > 0


# --- retries and fallbacks ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_5xx_is_retried_then_falls_back(
    gateway: RunningGateway, upstream: FakeUpstream, stream: bool
) -> None:
    upstream.enqueue(error_reply(502), error_reply(503))  # the primary, twice (retries: 1)
    with client(gateway) as c:
        raw = c.responses.with_raw_response.create(model="fallback", input="hi", stream=stream)
        parsed = raw.parse()
        text = (
            "".join(e.delta for e in parsed if e.type == "response.output_text.delta")
            if stream
            else parsed.output_text
        )
    assert text == TEXT
    assert raw.headers["x-tallygate-deployment"] == "secondary"
    assert raw.headers["x-tallygate-attempts"] == "3"
    assert [r.path for r in upstream.requests] == ["/v1/responses"] * 3
    assert [r.json["model"] for r in upstream.requests] == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]
    spans = client_spans(gateway, 3)
    assert [s.attributes.get("error.type") for s in spans] == ["502", "503", None]


def test_a_deployment_that_does_not_serve_responses_is_skipped(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    # as an Anthropic deployment would be: a provider that serves chat only
    gateway.gateway.providers["up"].operations = frozenset({"chat"})
    with client(gateway) as c:
        raw = c.responses.with_raw_response.create(model="fallback", input="hi")
        with pytest.raises(openai.BadRequestError) as refused:
            c.responses.create(model="gpt-4o-mini", input="hi")
    assert raw.headers["x-tallygate-deployment"] == "secondary"
    assert raw.headers["x-tallygate-attempts"] == "1"
    assert "/v1/responses" in refused.value.message
    assert len(upstream.requests) == 1


# --- telemetry ----------------------------------------------------------------------------


def test_spans_carry_the_genai_attributes(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    with client(gateway) as c:
        c.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=200, temperature=0.3)
    [span] = client_spans(gateway, 1)
    a = span.attributes
    assert span.name == "chat gpt-4o-mini"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.request.max_tokens"] == 200 and a["gen_ai.request.temperature"] == 0.3
    assert a["gen_ai.response.id"] == terminal_response("text.sse")["id"]
    assert a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (36, 87)
    server = server_span(gateway)
    assert server.attributes["url.path"] == "/v1/responses"
    assert server.attributes["tallygate.cost.usd"] == float(COST)
    operations = {
        dict(p.attributes)["gen_ai.operation.name"]
        for rm in gateway.metrics.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "gen_ai.client.token.usage"
        for p in m.data.data_points
    }
    assert operations == {"chat"}


def test_a_streamed_span_and_an_incomplete_answer(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.enqueue(golden("incomplete.sse"))
    with client(gateway) as c:
        events = list(
            c.responses.create(model="gpt-4o-mini", input="hi", max_output_tokens=16, stream=True)
        )
    assert events[-1].type == "response.incomplete"
    [span] = client_spans(gateway, 1)
    assert span.attributes["gen_ai.request.stream"] is True
    assert tuple(span.attributes["gen_ai.response.finish_reasons"]) == ("length",)
    assert span.attributes["gen_ai.usage.output_tokens"] == 16
    assert span.attributes["gen_ai.response.time_to_first_chunk"] >= 0


def test_content_is_captured_redacted_and_upstream_redaction_covers_instructions(
    gateway_config: dict, upstream: FakeUpstream
) -> None:
    email = "jane.doe@example.com"
    cfg = merge(gateway_config, {"redaction": {"upstream": True}})
    with running_gateway(cfg) as gw, client(gw) as c:
        c.responses.create(
            model="gpt-4o-mini",
            instructions=f"Reply to {email} politely.",
            input=[{"role": "user", "content": f"My address is {email}"}],
        )
        [span] = client_spans(gw, 1)
    sent = upstream.requests[-1].json
    assert email not in json.dumps(sent) and "[EMAIL]" in sent["instructions"]
    captured = (
        span.attributes["gen_ai.input.messages"] + span.attributes["gen_ai.system_instructions"]
    )
    assert email not in captured and "[EMAIL]" in captured


# --- a broken stream ends with the Responses API's own error event -------------------------


def test_a_stream_cut_mid_way_ends_with_a_responses_error_event(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.enqueue(golden("text.sse", drop_after=6))
    with client(gateway) as c:
        events = list(c.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    last = events[-1]
    assert last.type == "error"  # an event the SDK yields, not an exception
    assert last.code == "upstream_error" and "closed the connection" in last.message
    assert last.sequence_number == 6  # after the six relayed (0-5)
    assert [e.type for e in events[:-1]] == [
        event_json(e)["type"] for e in raw_events("text.sse")[:6]
    ]
    line = last_line(gateway)
    assert line["error_type"] == "stream_interrupted" and line["tokens_estimated"] is True
    assert line["output_tokens"] == len(get_encoding("o200k_base").encode("Hi there"))


def test_an_unreadable_stream_ends_with_a_responses_error_event_not_chat_style(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.enqueue(
        Stream([raw_events("text.sse")[0], "<html><body>oops</body></html>"], done=False)
    )
    r = httpx.post(
        gateway.base_url + "/responses",
        headers=AUTH,
        json={"model": "gpt-4o-mini", "input": "hi", "stream": True},
        timeout=10,
    )
    events = sse_body(r.text)
    assert events[-1].startswith("event: error\ndata: ")
    error = event_json(events[-1])
    assert error["type"] == "error" and error["code"] == "upstream_error"
    assert "not an OpenAI-format response" in error["message"]
    assert error["sequence_number"] == 1 and error["param"] is None
    assert 'data: {"error"' not in r.text
    assert last_line(gateway)["error_type"] == "upstream_error"


def test_the_upstreams_error_event_is_relayed_and_recorded(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.enqueue(golden("error.sse"))
    with client(gateway) as c:
        events = list(c.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert events[-1].type == "error" and events[-1].code == "ERR_SOMETHING"
    line = last_line(gateway)
    assert line["error_type"] == "upstream_error"
    assert line["error_message"] == "Something went wrong"


def test_a_failed_response_is_recorded_and_charged_its_usage(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.enqueue(golden("failed.sse"))
    with client(gateway) as c:
        events = list(c.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert events[-1].type == "response.failed"
    line = last_line(gateway)
    assert line["error_type"] == "upstream_error"
    assert line["error_message"] == "The model failed to generate a response."
    assert (line["input_tokens"], line["output_tokens"], line["tokens_estimated"]) == (36, 5, False)
    [span] = client_spans(gateway, 1)
    assert tuple(span.attributes["gen_ai.response.finish_reasons"]) == ("error",)


# --- the mock provider answers it too -------------------------------------------------------


def test_the_mock_provider_answers_whole_and_streamed(gateway: RunningGateway) -> None:
    body = {"model": "demo", "instructions": "Echo.", "input": "echo me back"}
    counter = TokenCounter()
    prompt = counter.count_responses("gpt-4o-mini", body).tokens
    with client(gateway, KEYS["beta"]) as c:
        raw = c.responses.with_raw_response.create(**body)
        whole = raw.parse()
        events = list(c.responses.create(**body, stream=True))
    assert whole.output_text == "echo me back" and whole.status == "completed"
    assert whole.usage is not None and whole.usage.input_tokens == prompt
    assert whole.usage.output_tokens == counter.count_text("gpt-4o-mini", "echo me back").tokens
    kinds = [e.type for e in events]
    steps = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    golden_kinds = [event_json(e)["type"] for e in raw_events("text.sse")]
    assert steps == [k for i, k in enumerate(golden_kinds) if i == 0 or golden_kinds[i - 1] != k]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "echo me back" and events[-1].response.output_text == text
    stream_cost = events[-1].response.usage.model_extra["cost"]
    assert Decimal(str(stream_cost)) == Decimal(raw.headers["x-tallygate-cost-usd"]) > 0


# --- the route ----------------------------------------------------------------------------


def test_the_route_without_v1_and_its_400s(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    def post(body: dict[str, Any], path: str = "/responses") -> httpx.Response:
        return httpx.post(gateway.url + path, headers=AUTH, json=body, timeout=10)

    ok = post({"model": "gpt-4o-mini", "input": "hi"})
    assert ok.status_code == 200 and ok.json()["output"][0]["content"][0]["text"] == TEXT
    missing = post({"model": "gpt-4o-mini", "instructions": "x"}, "/v1/responses")
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input"
    background = post({"model": "gpt-4o-mini", "input": "hi", "background": True})
    assert background.status_code == 400 and background.json()["error"]["param"] == "background"
    unauthenticated = httpx.post(gateway.url + "/v1/responses", json={"model": "x", "input": "y"})
    assert unauthenticated.status_code == 401
    beta = {"authorization": f"Bearer {KEYS['beta']}"}  # team beta may use only "demo"
    body = {"model": "gpt-4o-mini", "input": "hi"}
    not_allowed = httpx.post(gateway.url + "/v1/responses", headers=beta, json=body, timeout=10)
    assert not_allowed.status_code == 403
    assert not_allowed.json()["error"]["code"] == "model_not_allowed"
    assert len(upstream.requests) == 1


def test_a_client_that_leaves_before_the_answer_cancels_it(
    gateway: RunningGateway, upstream: FakeUpstream
) -> None:
    upstream.enqueue(Hang(30))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway.base_url + "/responses",
            headers=AUTH,
            json={"model": "gpt-4o-mini", "input": "hi"},
            timeout=httpx.Timeout(10, read=0.5),
        )
    wait_until(lambda: upstream.disconnects == 1, within=5, what="the upstream to see it")
    line = last_line(gateway)
    assert line["status"] == 499 and line["cancelled"] is True
    assert line["input_tokens"] > 0 and line["output_tokens"] == 0  # the prompt, estimated
    assert spend(gateway)["reserved"] == 0


def test_azure_serves_it_on_its_v1_path(gateway_config: dict, upstream: FakeUpstream) -> None:
    cfg = merge(
        gateway_config,
        {
            "providers": {
                "az": {
                    "kind": "azure",
                    "base_url": upstream.url,
                    "api_key": "azure-key-0000",
                    "api_version": "2024-10-21",
                }
            },
            "models": {"on-azure": [{"provider": "az", "model": "gpt-4o-mini"}]},
        },
    )
    with running_gateway(cfg) as gw, client(gw) as c:
        response = c.responses.create(model="on-azure", input="hi")
    assert response.output_text == TEXT
    sent = upstream.requests[-1]
    assert (sent.path, sent.query) == ("/openai/v1/responses", "")
    assert sent.headers["api-key"] == "azure-key-0000" and "authorization" not in sent.headers
    assert sent.json["model"] == "gpt-4o-mini"  # the deployment name, in the body


# --- counting the prompt --------------------------------------------------------------------


def test_responses_input_is_counted_by_the_chat_formula() -> None:
    counter = TokenCounter()
    enc = get_encoding("o200k_base")

    def n(text: str) -> int:
        return len(enc.encode(text))

    plain = counter.count_responses("gpt-4o", {"input": "hello there", "instructions": "Be brief."})
    expected = REPLY_PRIMING + (TOKENS_PER_MESSAGE + n("user") + n("hello there"))
    expected += TOKENS_PER_MESSAGE + n("system") + n("Be brief.")
    assert plain == (expected, False)  # as exact as chat's count
    # message items count as chat messages; their type/id/status are not text
    items = counter.count_responses(
        "gpt-4o",
        {"input": [{"type": "message", "role": "user", "content": "hello there", "id": "m1"}]},
    )
    assert items == (REPLY_PRIMING + TOKENS_PER_MESSAGE + n("user") + n("hello there"), False)
    parts = counter.count_responses(
        "gpt-4o",
        {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}]},
    )
    assert parts.tokens == items.tokens
    # function calls, their outputs and tools count (estimated); turns held upstream mark it so
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "fourteen degrees"}
    with_tools = counter.count_responses(
        "gpt-4o", {"input": [call, output], "tools": TOOLS, "previous_response_id": "resp_1"}
    )
    assert with_tools.estimated is True
    assert with_tools.tokens > REPLY_PRIMING + n("get_weather") + n("fourteen degrees")
    image = {"type": "input_image", "image_url": "https://example.com/a.png"}
    with_image = counter.count_responses(
        "gpt-4o", {"input": [{"role": "user", "content": [image]}]}
    )
    assert with_image.tokens > 85  # an image at its bound, not its URL's text
