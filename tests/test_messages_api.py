"""POST /v1/messages (Anthropic's Messages API) and /v1/messages/count_tokens through the real
HTTP path, with the official anthropic SDK as the client: native pass-through to a scripted
Anthropic (tests/fake_anthropic.py), translated to the scripted OpenAI-compatible upstream
and the mock. Golden fixtures of each provider's documented streams (tests/data/anthropic);
exact settlement on every path (native and translated, whole and streamed), Anthropic's
error shape so the SDK raises its own classes, and its `error` event when a stream breaks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from opentelemetry.trace import SpanKind

from gateway.translate.anthropic_ingress import chat_request
from pricing.tokens import TokenCounter
from tests.fake_anthropic import (
    FakeAnthropic,
    error_reply,
    message_reply,
    message_stream,
    tokens,
)
from tests.fake_upstream import (
    FakeUpstream,
    Hang,
    Reply,
    Stream,
    chat_chunk,
    chat_stream,
    usage_json,
)
from tests.fake_upstream import error_reply as openai_error_reply
from tests.gateway_harness import KEYS, UPSTREAM_KEY, RunningGateway, base_config, merge
from tests.gateway_harness import running_gateway as run_gateway
from tests.servers import wait_until

DATA = Path(__file__).parent / "data" / "anthropic"
CLAUDE = "claude-haiku-4-5-20251001"  # the alias clients ask for (Claude Code's model id)
HELLO = [{"role": "user", "content": "hello there"}]
M = Decimal(10**6)
# $ per million tokens: (input, output, cache read, cache write)
PRICES = {
    "claude-haiku-4-5": (Decimal(1), Decimal(5), Decimal("0.10"), Decimal("1.25")),
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.60"), Decimal("0.075"), Decimal(0)),
}
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a given location",
    "input_schema": {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "The city and state"}},
        "required": ["location"],
    },
}


# --- fixtures, fixtures' files, helpers ---------------------------------------------------


def raw_events(name: str) -> list[str]:
    """A fixture's events as sent on the wire, one string each."""
    text = (DATA / name).read_text()
    return [event + "\n\n" for event in text.split("\n\n") if event.strip()]


def event_json(event: str) -> dict[str, Any]:
    [data] = [line[6:] for line in event.splitlines() if line.startswith("data: ")]
    return json.loads(data)  # type: ignore[no-any-return]


def golden(name: str, **stream: Any) -> Stream:
    return Stream(raw_events(name), done=False, **stream)


def golden_json(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def _anthropic_server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def claude(_anthropic_server: FakeAnthropic) -> FakeAnthropic:
    _anthropic_server.reset()
    return _anthropic_server


def messages_config(anthropic_url: str, openai_url: str, db: Path) -> dict[str, Any]:
    provider = {"kind": "anthropic", "base_url": anthropic_url, "api_key": UPSTREAM_KEY,
                "timeout_s": 5, "headers": {"anthropic-beta": "gateway-beta"}}  # fmt: skip
    return merge(base_config(openai_url, db), {
        "providers": {"claude": provider},
        "models": {
            CLAUDE: [{"provider": "claude", "model": "claude-haiku-4-5"}],
            "smart": [{"provider": "claude", "model": "claude-haiku-4-5", "name": "primary"},
                      {"provider": "up", "model": "gpt-4o-mini", "name": "secondary"}],
        },
    })  # fmt: skip


@pytest.fixture
def config(claude: FakeAnthropic, fake_upstream: FakeUpstream, tmp_path: Path) -> dict[str, Any]:
    return messages_config(claude.url, fake_upstream.base_url, tmp_path / "t.db")


@pytest.fixture
def gateway(config: dict[str, Any]) -> Iterator[RunningGateway]:
    with run_gateway(config) as gw:
        yield gw


def client(gw: RunningGateway, key: str = KEYS["alpha"], **options: Any) -> anthropic.Anthropic:
    options.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=gw.url, auth_token=key, timeout=10, **options)


def post(gw: RunningGateway, body: dict[str, Any], path: str = "/v1/messages",
         key: str = KEYS["alpha"], **headers: str) -> httpx.Response:  # fmt: skip
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01", **headers}
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=10)


def last_line(gw: RunningGateway, n: int = 1) -> dict[str, Any]:
    wait_until(lambda: len(gw.access_lines()) >= n, within=5, what=f"{n} access line(s)")
    return gw.access_lines()[-1]


def spend(gw: RunningGateway) -> dict[str, Decimal]:
    admin = {"authorization": f"Bearer {KEYS['admin']}"}
    rows = httpx.get(gw.url + "/admin/spend", headers=admin, timeout=10).json()["data"]
    [row] = [r for r in rows if r["team"] == "alpha" and r["key"] is None]
    return {"spent": Decimal(row["spent_usd"]), "reserved": Decimal(row["reserved_usd"])}


def settled(gw: RunningGateway) -> Decimal:
    """The team's spend once nothing is reserved any more."""
    wait_until(lambda: spend(gw)["reserved"] == 0, within=5, what="the settlement")
    return spend(gw)["spent"]


def cost(model: str, usage: Any) -> Decimal:
    """What an Anthropic usage costs at the model's prices (cache tokens at their own)."""
    inp, out, read, write = PRICES[model]
    reads = usage.cache_read_input_tokens or 0
    writes = usage.cache_creation_input_tokens or 0
    total = usage.input_tokens * inp + reads * read + writes * write + usage.output_tokens * out
    return total / M


def spans(gw: RunningGateway, kind: SpanKind, n: int) -> list[Any]:
    def finished() -> list[Any]:
        return [s for s in gw.spans.get_finished_spans() if s.kind == kind]

    wait_until(lambda: len(finished()) >= n, within=5, what=f"{n} {kind} spans")
    return finished()


def sse_body(body: str) -> list[str]:
    return [event + "\n\n" for event in body.split("\n\n") if event.strip()]


RAW_EVENTS = ("message_start", "content_block_start", "content_block_delta",
              "content_block_stop", "message_delta", "message_stop", "ping")  # fmt: skip


def kinds(events: list[Any]) -> list[str]:
    """The wire's event types (not the SDK helper's own), runs collapsed."""
    types = [e.type if hasattr(e, "type") else e["type"] for e in events]
    types = [t for t in types if t in RAW_EVENTS]
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


# --- native pass-through ------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "/v1"])
@pytest.mark.parametrize("auth", ["auth_token", "api_key"])
def test_native_through_the_sdk_with_either_base_url_and_either_key_header(
    gateway: RunningGateway, claude: FakeAnthropic, suffix: str, auth: str
) -> None:
    c = anthropic.Anthropic(base_url=gateway.url + suffix, max_retries=0, **{auth: KEYS["alpha"]})
    raw = c.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=50, system="Be brief.", messages=HELLO
    )
    reply = raw.parse()
    assert reply.content[0].type == "text" and reply.content[0].text == "hello there"
    assert reply.stop_reason == "end_turn" and reply.id == "msg_fake_1"
    sent = claude.requests[-1]
    assert sent.path == "/v1/messages"
    # the client's body, only the model rewritten
    assert sent.json == {
        "max_tokens": 50,
        "messages": HELLO,
        "model": "claude-haiku-4-5",
        "system": "Be brief.",
    }
    assert sent.headers["x-api-key"] == UPSTREAM_KEY and "authorization" not in sent.headers
    assert sent.headers["anthropic-version"] == raw.http_request.headers["anthropic-version"]
    assert not any(KEYS["alpha"] in value for value in sent.headers.values())
    assert raw.headers["x-tallygate-deployment"] == "claude/claude-haiku-4-5"
    line = last_line(gateway)
    assert line["path"] == ("/v1/v1/messages" if suffix else "/v1/messages")
    assert line["status"] == 200 and line["model"] == CLAUDE and line["key"] == "alpha-app"


def test_native_bytes_are_relayed_as_they_came_and_the_beta_headers_go_upstream(
    gateway: RunningGateway, claude: FakeAnthropic
) -> None:
    claude.enqueue(Reply(json=golden_json("text.json")), golden("text.sse"))
    body = {"model": CLAUDE, "max_tokens": 100, "messages": HELLO}
    whole = post(gateway, body, **{"anthropic-beta": "client-beta-1,client-beta-2"})
    stream = post(gateway, {**body, "stream": True}, **{"anthropic-beta": "client-beta-1"})
    assert whole.status_code == 200
    assert whole.content == json.dumps(golden_json("text.json")).encode()
    assert whole.headers["x-tallygate-cost-usd"] == "0.0001"  # 25 x $1 + 15 x $5 per M
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.content == (DATA / "text.sse").read_bytes()
    betas = [r.headers["anthropic-beta"] for r in claude.requests]
    # the client's betas join the provider's configured one
    assert betas == ["gateway-beta,client-beta-1,client-beta-2", "gateway-beta,client-beta-1"]
    assert [r.json["model"] for r in claude.requests] == ["claude-haiku-4-5"] * 2


def test_native_golden_tool_use_stream_reads_as_the_documented_message(
    gateway: RunningGateway, claude: FakeAnthropic
) -> None:
    claude.enqueue(golden("tool_use.sse"))
    with client(gateway).messages.stream(
        model=CLAUDE, max_tokens=1024, tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "What is the weather like in San Francisco?"}],
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_message()
    documented = golden_json("tool_use.json")
    assert [b.model_dump(exclude_none=True) for b in final.content] == documented["content"]
    assert (final.id, final.model, final.stop_reason) == (
        documented["id"], documented["model"], "tool_use")  # fmt: skip
    assert (final.usage.input_tokens, final.usage.output_tokens) == (472, 89)
    assert [e.type for e in events if e.type in ("message_start", "message_stop")] == [
        "message_start",
        "message_stop",
    ]
    [span] = spans(gateway, SpanKind.CLIENT, 1)
    assert tuple(span.attributes["gen_ai.response.finish_reasons"]) == ("tool_calls",)
    [out] = json.loads(span.attributes["gen_ai.output.messages"])
    call = next(p for p in out["parts"] if p["type"] == "tool_call")
    assert call["name"] == "get_weather" and call["id"] == "toolu_01T1x1fJ34qAmk2tNTrN7Up6"
    assert json.loads(call["arguments"]) == {"location": "San Francisco, CA", "unit": "fahrenheit"}


# --- translated: an OpenAI-compatible deployment, and the mock ------------------------------


@pytest.mark.parametrize("model", ["gpt-4o-mini", "demo"])
def test_translated_whole_and_streamed(
    gateway: RunningGateway, fake_upstream: FakeUpstream, model: str
) -> None:
    c = client(gateway)
    ask = {"model": model, "max_tokens": 50, "system": "Be brief.", "messages": HELLO}
    whole = c.messages.create(**ask)  # type: ignore[arg-type]
    with c.messages.stream(**ask) as stream:  # type: ignore[arg-type]
        events = list(stream)
        final = stream.get_final_message()
    for message in (whole, final):
        assert [b.type for b in message.content] == ["text"]
        assert message.content[0].text == "hello there"  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn" and message.usage.input_tokens > 0
    assert whole.usage == final.usage
    assert kinds(events)[0] == "message_start" and kinds(events)[-1] == "message_stop"
    if model == "demo":
        assert fake_upstream.requests == []
        return
    first, second = (r.json for r in fake_upstream.requests)
    assert [r.path for r in fake_upstream.requests] == ["/v1/chat/completions"] * 2
    assert first == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "Be brief."}, *HELLO],
        "max_tokens": 50,
    }
    assert second == {**first, "stream": True, "stream_options": {"include_usage": True}}
    sent = fake_upstream.requests[-1].headers
    assert sent["authorization"] == f"Bearer {UPSTREAM_KEY}" and "anthropic-version" not in sent


def test_translated_stop_reasons(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    c = client(gateway)
    ask = {"model": "gpt-4o-mini", "max_tokens": 2,
           "messages": [{"role": "user", "content": "one two three four"}]}  # fmt: skip
    whole = c.messages.create(**ask)  # type: ignore[arg-type]
    with c.messages.stream(**ask) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert whole.stop_reason == final.stop_reason == "max_tokens"  # finish_reason "length"
    assert whole.content[0].text == "one two"  # type: ignore[union-attr]
    [span, _] = spans(gateway, SpanKind.CLIENT, 2)
    assert tuple(span.attributes["gen_ai.response.finish_reasons"]) == ("length",)


def test_translated_tool_use_turn_and_the_tool_result_back(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    question = {"role": "user", "content": "What is the weather like in Paris today?"}
    fake_upstream.enqueue(golden("chat_tool_call.sse"))
    c = client(gateway)
    with c.messages.stream(
        model="gpt-4o-mini", max_tokens=1024, tools=[WEATHER], messages=[question]  # type: ignore[list-item]
    ) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_message()
    [call] = final.content
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.id == "call_DdmO9pD3xa9XTPNJ32zg2hcA" and call.input == {
        "location": "Paris, France"
    }
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (62, 17)
    # the documented order of a tool_use stream, its text block and pings aside
    documented = kinds([event_json(e) for e in raw_events("tool_use.sse")])
    assert kinds(events) == [documented[0], *documented[5:]]
    assert fake_upstream.requests[0].json["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": WEATHER["description"],
        "parameters": WEATHER["input_schema"]}}]  # fmt: skip
    # the app runs the tool and sends its result back
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "14 degrees, cloudy"}
    history = [question, {"role": "assistant", "content": final.content},
               {"role": "user", "content": [result]}]  # fmt: skip
    answer = c.messages.create(
        model="gpt-4o-mini", max_tokens=1024, tools=[WEATHER], messages=history  # type: ignore[arg-type,list-item]
    )  # fmt: skip
    assert answer.stop_reason == "end_turn"
    sent = fake_upstream.requests[-1].json["messages"]
    assert sent[1]["tool_calls"] == [{"id": call.id, "type": "function", "function": {
        "name": "get_weather", "arguments": '{"location":"Paris, France"}'}}]  # fmt: skip
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "14 degrees, cloudy"}
    wait_until(lambda: len(gateway.access_lines()) == 2, within=5, what="two access lines")
    expected = (62 * Decimal("0.15") + 17 * Decimal("0.60")) / M
    assert Decimal(str(gateway.access_lines()[0]["cost_usd"])) == expected


def test_a_server_tool_cannot_go_to_an_openai_deployment(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    search = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client(gateway).messages.create(
            model="gpt-4o-mini", max_tokens=50, messages=HELLO, tools=[search]  # type: ignore[list-item]
        )  # fmt: skip
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "web_search_20250305" in refused.value.message
    assert fake_upstream.requests == [] and settled(gateway) == 0


def test_upstream_errors_reach_the_client_in_anthropics_shape(
    gateway: RunningGateway, claude: FakeAnthropic, fake_upstream: FakeUpstream
) -> None:
    claude.enqueue(error_reply(400, "invalid_request_error", "messages.0: bad block"))
    fake_upstream.enqueue(openai_error_reply(400, "Invalid 'messages[0]'"))
    native = post(gateway, {"model": CLAUDE, "max_tokens": 5, "messages": HELLO})
    assert native.status_code == 400  # as Anthropic sent it
    assert native.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                        "message": "messages.0: bad block"}}  # fmt: skip
    with pytest.raises(anthropic.BadRequestError) as translated:
        client(gateway).messages.create(model="gpt-4o-mini", max_tokens=5, messages=HELLO)
    assert translated.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "Invalid 'messages[0]'"},
    }
    assert settled(gateway) == 0


def test_anthropic_falls_back_to_an_openai_deployment(
    gateway: RunningGateway, claude: FakeAnthropic, fake_upstream: FakeUpstream
) -> None:
    claude.enqueue(error_reply(529, "overloaded_error"), error_reply(529, "overloaded_error"))
    raw = client(gateway).messages.with_raw_response.create(
        model="smart", max_tokens=50, messages=HELLO
    )
    reply = raw.parse()
    assert reply.content[0].text == "hello there"  # type: ignore[union-attr]
    assert raw.headers["x-tallygate-deployment"] == "secondary"
    assert raw.headers["x-tallygate-attempts"] == "3"
    assert [r.path for r in claude.requests] == ["/v1/messages"] * 2
    assert fake_upstream.requests[-1].path == "/v1/chat/completions"
    client_spans = spans(gateway, SpanKind.CLIENT, 3)
    assert [s.attributes.get("error.type") for s in client_spans] == ["529", "529", None]
    assert [s.attributes["gen_ai.provider.name"] for s in client_spans] == [
        "anthropic", "anthropic", "openai"]  # fmt: skip
    assert settled(gateway) == cost("gpt-4o-mini", reply.usage)


# --- money: exact on every path --------------------------------------------------------------


def native_answers(claude: FakeAnthropic, usage: dict[str, int]) -> None:
    """The same answer whole, then streamed, with the same usage."""
    start = {**usage, "output_tokens": 0}
    claude.enqueue(
        message_reply("cached answer here", usage=usage),
        message_stream("cached answer here", start_usage=start, output_tokens=usage["output_tokens"]),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("model", "cached"),
    [(CLAUDE, False), (CLAUDE, True), ("gpt-4o-mini", False), ("demo", False)],
    ids=["native", "native-cache", "translated", "mock"],
)
def test_whole_and_streamed_settle_exactly_what_their_usage_costs(
    gateway: RunningGateway, claude: FakeAnthropic, model: str, cached: bool
) -> None:
    if model == CLAUDE:
        usage = tokens(10, 5, cache_read=100, cache_write=50) if cached else tokens(10, 5)
        native_answers(claude, usage)
    priced = "claude-haiku-4-5" if model == CLAUDE else "gpt-4o-mini"
    c = client(gateway)
    ask = {"model": model, "max_tokens": 200, "messages": HELLO}
    raw = c.messages.with_raw_response.create(**ask)  # type: ignore[arg-type]
    whole = raw.parse()
    whole_cost = cost(priced, whole.usage)
    assert Decimal(raw.headers["x-tallygate-cost-usd"]) == whole_cost
    assert settled(gateway) == whole_cost
    with c.messages.stream(**ask) as stream:  # type: ignore[arg-type]
        final = stream.get_final_message()
    assert final.usage == whole.usage
    assert settled(gateway) == 2 * whole_cost  # the stream cost what the whole did
    lines = gateway.access_lines()
    assert [Decimal(str(line["cost_usd"])) for line in lines] == [whole_cost, whole_cost]
    assert [line["tokens_estimated"] for line in lines] == [False, False]
    if cached:  # cache reads and writes at their own prices, not the input price
        assert whole_cost == (10 * 1 + 100 * Decimal("0.10") + 50 * Decimal("1.25") + 5 * 5) / M
        [first, _] = spans(gateway, SpanKind.CLIENT, 2)
        assert first.attributes["gen_ai.usage.input_tokens"] == 160
        assert first.attributes["gen_ai.usage.cache_read.input_tokens"] == 100


def test_a_translated_answer_without_usage_is_counted_not_free(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    no_usage = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "four words of answer"}}]}  # fmt: skip
    fake_upstream.enqueue(Reply(json=no_usage), chat_stream("four words of answer"))
    c = client(gateway)
    c.messages.create(model="gpt-4o-mini", max_tokens=50, messages=HELLO)
    with c.messages.stream(model="gpt-4o-mini", max_tokens=50, messages=HELLO) as stream:
        stream.get_final_message()
    wait_until(lambda: len(gateway.access_lines()) == 2, within=5, what="two access lines")
    for line in gateway.access_lines():
        assert line["tokens_estimated"] is True
        assert line["input_tokens"] > 0 and line["output_tokens"] == 4  # "four words of answer"
        assert Decimal(str(line["cost_usd"])) > 0
    assert settled(gateway) > 0


def test_a_budget_429_is_a_rate_limit_error_the_sdk_does_not_retry(
    config: dict[str, Any], claude: FakeAnthropic
) -> None:
    cfg = merge(config, {"teams": {"alpha": {"budget": {"limit_usd": "0.001", "period": "daily"}}}})
    with run_gateway(cfg) as gw:
        with pytest.raises(anthropic.RateLimitError) as refused:
            client(gw, max_retries=3).messages.create(
                model=CLAUDE, max_tokens=1000, messages=HELLO
            )  # $0.005 of output at most: more than the $0.001 budget
        error = refused.value
        assert error.status_code == 429
        assert isinstance(error.body, dict) and error.body["type"] == "error"
        assert error.body["error"]["type"] == "rate_limit_error"
        assert error.body["error"]["code"] == "budget_exceeded"
        assert "max_tokens <=" in error.body["error"]["message"]
        assert error.response.headers["x-should-retry"] == "false"
        assert int(error.response.headers["retry-after"]) > 0
        assert len(gw.access_lines()) == 1  # not retried
        assert claude.requests == []
        fits = client(gw).messages.create(model=CLAUDE, max_tokens=50, messages=HELLO)
    assert fits.stop_reason == "end_turn"


def test_a_rate_limit_429_is_a_rate_limit_error(
    config: dict[str, Any], claude: FakeAnthropic
) -> None:
    cfg = merge(config, {"teams": {"alpha": {"rate_limit": {"rpm": 1}}}})
    with run_gateway(cfg) as gw:
        client(gw).messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
        with pytest.raises(anthropic.RateLimitError) as limited:
            client(gw).messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
    assert limited.value.body["error"]["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert "retry-after" in limited.value.response.headers
    assert limited.value.response.headers["x-ratelimit-limit-requests"] == "1"


# --- the gateway's own errors, in Anthropic's shape -------------------------------------------


def test_authentication_model_and_request_errors_are_the_sdks_own(
    gateway: RunningGateway, claude: FakeAnthropic
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        client(gateway, key="sk-wrong").messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
    assert bad_key.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gateway.url, api_key="sk-wrong", max_retries=0).messages.create(
            model=CLAUDE, max_tokens=5, messages=HELLO
        )  # fmt: skip
    with pytest.raises(anthropic.NotFoundError) as unknown:
        client(gateway).messages.create(model="claude-nonexistent", max_tokens=5, messages=HELLO)
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert unknown.value.body["error"]["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(anthropic.PermissionDeniedError):  # team beta may use only "demo"
        client(gateway, KEYS["beta"]).messages.create(model=CLAUDE, max_tokens=5, messages=HELLO)
    missing = post(gateway, {"model": CLAUDE, "messages": HELLO})
    assert missing.status_code == 400
    assert missing.json()["error"] == {"type": "invalid_request_error",
                                       "message": "max_tokens: Field required"}  # fmt: skip
    assert missing.json()["request_id"] == missing.headers["x-request-id"]
    empty = post(gateway, {"model": CLAUDE, "max_tokens": 5, "messages": []}, "/messages")
    assert empty.status_code == 400 and empty.json()["error"]["type"] == "invalid_request_error"
    unauthenticated = httpx.post(gateway.url + "/v1/messages", json={"model": CLAUDE}, timeout=10)
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error"]["type"] == "authentication_error"
    assert claude.requests == []


# --- broken streams, disconnects --------------------------------------------------------------


@pytest.mark.parametrize("model", [CLAUDE, "gpt-4o-mini"])
def test_a_stream_cut_mid_way_ends_with_an_error_event_the_sdk_raises(
    gateway: RunningGateway, claude: FakeAnthropic, fake_upstream: FakeUpstream, model: str
) -> None:
    claude.enqueue(message_stream("one two three four five", drop_after=5))
    fake_upstream.enqueue(chat_stream("one two three four five", drop_after=3))
    seen: list[Any] = []
    with pytest.raises(anthropic.APIStatusError) as broken:
        with client(gateway).messages.stream(model=model, max_tokens=50, messages=HELLO) as s:
            seen.extend(s)
    assert broken.value.body["type"] == "error"  # type: ignore[index]
    assert broken.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "closed the connection" in broken.value.body["error"]["message"]  # type: ignore[index]
    text = "".join(e.delta.text for e in seen if e.type == "content_block_delta")
    assert text == "one two"
    line = last_line(gateway)
    assert line["error_type"] == "stream_interrupted" and line["tokens_estimated"] is True
    assert line["output_tokens"] == 2  # what was streamed: "one two"
    assert settled(gateway) == Decimal(str(line["cost_usd"])) > 0


def test_the_upstreams_error_event_is_relayed_and_recorded(
    gateway: RunningGateway, claude: FakeAnthropic
) -> None:
    claude.enqueue(Stream(raw_events("text.sse")[:4] + raw_events("error.sse"), done=False))
    r = post(gateway, {"model": CLAUDE, "max_tokens": 50, "messages": HELLO, "stream": True})
    assert r.text == "".join(raw_events("text.sse")[:4] + raw_events("error.sse"))
    with pytest.raises(anthropic.APIStatusError) as raised:
        claude.enqueue(Stream(raw_events("text.sse")[:4] + raw_events("error.sse"), done=False))
        list(client(gateway).messages.create(model=CLAUDE, max_tokens=50, messages=HELLO,
                                             stream=True))  # fmt: skip
    assert raised.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    line = last_line(gateway, 2)
    assert line["error_type"] == "upstream_error" and line["error_message"] == "Overloaded"


def test_an_unreadable_stream_ends_with_anthropics_error_event(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Stream([chat_chunk("hi", role="assistant"), "<html>oops</html>"]))
    r = post(gateway, {"model": "gpt-4o-mini", "max_tokens": 50, "messages": HELLO, "stream": True})
    events = sse_body(r.text)
    assert events[-1].startswith("event: error\ndata: ")
    assert event_json(events[-1])["error"]["type"] == "api_error"
    assert 'data: {"error"' not in r.text  # never OpenAI's error chunk on this route
    assert last_line(gateway)["error_type"] == "upstream_error"


def test_a_client_that_leaves_mid_stream_is_charged_what_was_streamed(
    gateway: RunningGateway, claude: FakeAnthropic
) -> None:
    claude.enqueue(message_stream(" ".join(f"w{i}" for i in range(200)), delay_s=0.02))
    body = {"model": CLAUDE, "max_tokens": 1000, "messages": HELLO, "stream": True}
    headers = {"x-api-key": KEYS["alpha"], "anthropic-version": "2023-06-01"}
    with httpx.stream("POST", gateway.url + "/v1/messages", json=body, headers=headers) as r:
        for line in r.iter_lines():
            if '"text":" w2"' in line:
                break
    wait_until(lambda: claude.disconnects == 1, within=5, what="the upstream to see it")
    line = last_line(gateway)
    assert line["cancelled"] is True and line["tokens_estimated"] is True
    assert 3 <= line["output_tokens"] < 400  # what was streamed, not the whole answer
    assert settled(gateway) == Decimal(str(line["cost_usd"])) > 0


# --- redaction, telemetry -----------------------------------------------------------------------


def test_upstream_redaction_covers_the_system_prompt(
    config: dict[str, Any], claude: FakeAnthropic
) -> None:
    email = "jane.doe@example.com"
    with run_gateway(merge(config, {"redaction": {"upstream": True}})) as gw:
        client(gw).messages.create(
            model=CLAUDE, max_tokens=20, system=f"Reply to {email}.",
            messages=[{"role": "user", "content": f"I am {email}"}],
        )  # fmt: skip
    sent = claude.requests[-1].json
    assert email not in json.dumps(sent) and "[EMAIL]" in sent["system"]


def test_spans_carry_the_genai_attributes(gateway: RunningGateway, claude: FakeAnthropic) -> None:
    claude.enqueue(Reply(json=golden_json("text.json")))
    client(gateway).messages.create(
        model=CLAUDE,
        max_tokens=100,
        system="Be brief.",
        messages=HELLO,
        extra_body={"temperature": 0.5},
    )
    [span] = spans(gateway, SpanKind.CLIENT, 1)
    a = span.attributes
    assert span.name == "chat claude-haiku-4-5"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "anthropic"
    assert a["gen_ai.request.max_tokens"] == 100 and a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.response.id"] == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"
    assert a["gen_ai.response.model"] == "claude-opus-4-1-20250805"
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (25, 15)
    assert json.loads(a["gen_ai.system_instructions"]) == [{"type": "text", "content": "Be brief."}]
    [server] = spans(gateway, SpanKind.SERVER, 1)
    assert server.attributes["url.path"] == "/v1/messages"
    assert server.attributes["tallygate.cost.usd"] == 0.0001


# --- count_tokens -----------------------------------------------------------------------------


def test_count_tokens_is_anthropics_answer_for_an_anthropic_model(
    gateway: RunningGateway, claude: FakeAnthropic
) -> None:
    c = client(gateway, default_headers={"anthropic-beta": "token-counting-2024-11-01"})
    raw = c.messages.with_raw_response.count_tokens(
        model=CLAUDE, system="Be brief.", messages=[{"role": "user", "content": "one two three"}]
    )
    assert raw.parse().input_tokens == 5  # the fake counts words
    assert "x-tallygate-tokens-estimated" not in raw.headers
    sent = claude.requests[-1]
    assert sent.path == "/v1/messages/count_tokens"
    assert sent.json["model"] == "claude-haiku-4-5" and sent.json["system"] == "Be brief."
    assert sent.headers["anthropic-beta"] == "gateway-beta,token-counting-2024-11-01"
    assert sent.headers["x-api-key"] == UPSTREAM_KEY
    line = last_line(gateway)
    assert line["path"] == "/v1/messages/count_tokens" and line["status"] == 200
    assert line["deployment"] == "claude/claude-haiku-4-5" and line["cost_usd"] is None
    assert spend(gateway) == {"spent": 0, "reserved": 0}


def test_count_tokens_is_counted_here_for_other_models_and_when_anthropic_fails(
    gateway: RunningGateway, claude: FakeAnthropic, fake_upstream: FakeUpstream
) -> None:
    body = {"model": "gpt-4o-mini", "tools": [WEATHER],
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}  # fmt: skip
    expected = TokenCounter().count_chat("gpt-4o-mini", chat_request(body)).tokens
    for path in (
        "/v1/messages/count_tokens",
        "/messages/count_tokens",
        "/v1/v1/messages/count_tokens",
    ):
        r = post(gateway, body, path)
        assert r.status_code == 200 and r.json() == {"input_tokens": expected}
        assert r.headers["x-tallygate-tokens-estimated"] == "true"
    claude.enqueue(error_reply(529, "overloaded_error"))
    fallback = post(gateway, {**body, "model": CLAUDE}, "/v1/messages/count_tokens")
    assert fallback.status_code == 200, fallback.text
    assert fallback.json()["input_tokens"] > 0
    assert fallback.headers["x-tallygate-tokens-estimated"] == "true"
    assert fake_upstream.requests == []  # an OpenAI deployment is never asked
    assert spend(gateway) == {"spent": 0, "reserved": 0}
    refused = post(gateway, body, "/v1/messages/count_tokens", key="sk-wrong")
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    not_allowed = post(gateway, body, "/v1/messages/count_tokens", key=KEYS["beta"])
    assert not_allowed.status_code == 403
    assert not_allowed.json()["error"]["type"] == "permission_error"


def test_a_translated_stream_without_done_ends_by_its_finish_reason(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    usage = usage_json(9, 2)
    fake_upstream.enqueue(
        chat_stream("hello there", done=False, usage=usage),  # finished, no [DONE]: complete
        Stream([chat_chunk("hello", role="assistant")], done=False),  # cut short, cleanly
    )
    c = client(gateway)
    with c.messages.stream(model="gpt-4o-mini", max_tokens=50, messages=HELLO) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 2
    with pytest.raises(anthropic.APIStatusError) as cut:
        with c.messages.stream(model="gpt-4o-mini", max_tokens=50, messages=HELLO) as stream:
            stream.get_final_message()
    assert "ended before its answer was complete" in cut.value.message
    line = last_line(gateway, 2)
    assert line["error_type"] == "upstream_error" and line["tokens_estimated"] is True


def test_a_team_cap_lowers_max_tokens_on_both_ways(
    config: dict[str, Any], claude: FakeAnthropic, fake_upstream: FakeUpstream
) -> None:
    with run_gateway(merge(config, {"teams": {"alpha": {"max_output_tokens": 50}}})) as gw:
        for model in (CLAUDE, "gpt-4o-mini"):
            client(gw).messages.create(model=model, max_tokens=4000, messages=HELLO)
            client(gw).messages.create(model=model, max_tokens=20, messages=HELLO)
    assert [r.json["max_tokens"] for r in claude.requests] == [50, 20]
    assert [r.json["max_tokens"] for r in fake_upstream.requests] == [50, 20]


def test_a_body_over_the_limit_is_anthropics_413(
    config: dict[str, Any], claude: FakeAnthropic
) -> None:
    with run_gateway(merge(config, {"server": {"max_body_mb": 0.001}})) as gw:
        big = [{"role": "user", "content": "x" * 2000}]
        with pytest.raises(anthropic.APIStatusError) as refused:
            client(gw).messages.create(model=CLAUDE, max_tokens=5, messages=big)
    assert refused.value.status_code == 413
    assert refused.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
    assert claude.requests == []


def test_a_client_that_leaves_before_the_answer_cancels_it(
    gateway: RunningGateway, claude: FakeAnthropic
) -> None:
    claude.enqueue(Hang(30))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway.url + "/v1/messages",
            headers={"x-api-key": KEYS["alpha"]},
            json={"model": CLAUDE, "max_tokens": 100, "messages": HELLO},
            timeout=httpx.Timeout(10, read=0.5),
        )
    wait_until(lambda: claude.disconnects == 1, within=5, what="the upstream to see it")
    line = last_line(gateway)
    assert line["status"] == 499 and line["cancelled"] is True
    assert line["input_tokens"] > 0 and line["output_tokens"] == 0  # the prompt, estimated
    assert settled(gateway) == Decimal(str(line["cost_usd"])) > 0


def test_metrics_count_the_messages_route(gateway: RunningGateway, claude: FakeAnthropic) -> None:
    client(gateway).messages.create(model=CLAUDE, max_tokens=20, messages=HELLO)
    last_line(gateway)
    points = [
        dict(p.attributes)
        for rm in gateway.metrics.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "gen_ai.client.token.usage"
        for p in m.data.data_points
    ]
    assert {(p["gen_ai.operation.name"], p["gen_ai.provider.name"]) for p in points} == {
        ("chat", "anthropic")
    }
    assert {p["gen_ai.token.type"] for p in points} == {"input", "output"}
