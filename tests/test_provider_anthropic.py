"""The `anthropic` provider through the real gateway: the openai SDK as the client, a scripted
Anthropic Messages API (tests/fake_anthropic.py) on loopback as the upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
from opentelemetry.trace import SpanKind

from gateway.config import ProviderConfig
from gateway.providers.anthropic import AnthropicProvider
from tests.fake_anthropic import (
    FakeAnthropic,
    error_reply,
    event,
    message_events,
    message_reply,
    message_stream,
    tokens,
    tool_block,
)
from tests.fake_upstream import FakeUpstream, Reply, Stream
from tests.gateway_harness import KEYS, UPSTREAM_KEY, RunningGateway, base_config, merge
from tests.gateway_harness import running_gateway as run_gateway
from tests.servers import wait_until

HELLO = [{"role": "user", "content": "hello there claude"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def _anthropic_server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def anthropic(_anthropic_server: FakeAnthropic) -> FakeAnthropic:
    _anthropic_server.reset()
    return _anthropic_server


def claude_config(anthropic_url: str, openai_url: str, db: Path) -> dict[str, Any]:
    provider = {"kind": "anthropic", "base_url": anthropic_url, "api_key": UPSTREAM_KEY,
                "timeout_s": 5, "headers": {"anthropic-beta": "test-beta"}}  # fmt: skip
    return merge(base_config(openai_url, db), {
        "providers": {"claude": provider},
        "models": {
            "claude": [{"provider": "claude", "model": "claude-sonnet-4-5"}],
            "smart": [{"provider": "claude", "model": "claude-sonnet-4-5"},
                      {"provider": "up", "model": "gpt-4o-mini"}],
        },
    })  # fmt: skip


@pytest.fixture
def gateway(
    anthropic: FakeAnthropic, fake_upstream: FakeUpstream, tmp_path: Path
) -> Iterator[RunningGateway]:
    config = claude_config(anthropic.url, fake_upstream.base_url, tmp_path / "t.db")
    with run_gateway(config) as gw:
        yield gw


def client(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEYS["alpha"], max_retries=0)


def last_line(gw: RunningGateway) -> dict[str, Any]:
    wait_until(lambda: bool(gw.log.getvalue().strip()), within=5, what="access log line")
    return gw.access_lines()[-1]


# ---- whole and streamed chat ------------------------------------------------------------


def test_chat_is_translated_to_messages_and_back(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, *HELLO]
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model="claude", messages=messages)
        reply = raw.parse()
    assert reply.choices[0].message.content == "hello there claude"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.id == "msg_fake_1" and reply.object == "chat.completion"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 3)  # words
    sent = anthropic.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.json == {
        "model": "claude-sonnet-4-5",
        "messages": HELLO,
        "system": "Be brief.",
        "max_tokens": 64000,  # none asked: the model's max output (the price table's)
    }
    assert raw.headers["x-tallygate-deployment"] == "claude/claude-sonnet-4-5"
    # 5 x $3 + 3 x $15 per million tokens
    assert raw.headers["x-tallygate-cost-usd"] == "0.00006"


def test_upstream_headers_carry_the_provider_key_never_the_gateway_key(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    with client(gateway) as c:
        c.chat.completions.create(model="claude", messages=HELLO, max_tokens=20)
    headers = anthropic.requests[-1].headers
    assert headers["x-api-key"] == UPSTREAM_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "test-beta"  # the provider's configured headers
    assert "authorization" not in headers
    assert KEYS["alpha"] not in json.dumps(headers)
    assert headers["x-request-id"].startswith("req_")
    assert anthropic.requests[-1].json["max_tokens"] == 20


def test_stream_is_translated_chunk_by_chunk(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    with client(gateway) as c:
        chunks = list(c.chat.completions.create(model="claude", messages=HELLO, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "hello there claude"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(ch.choices for ch in chunks), "the usage chunk the client did not ask for leaked"
    assert anthropic.requests[-1].json["stream"] is True
    assert "stream_options" not in anthropic.requests[-1].json
    line = last_line(gateway)
    assert (line["input_tokens"], line["output_tokens"]) == (3, 3)
    assert line["tokens_estimated"] is False  # read from message_start + message_delta


def test_stream_with_usage_requested_carries_cost(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    with client(gateway) as c:
        chunks = list(c.chat.completions.create(
            model="claude", messages=HELLO, stream=True, stream_options={"include_usage": True}
        ))  # fmt: skip
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, 3)
    # 3 x $3 + 3 x $15 per million tokens
    assert final.usage.model_extra is not None and final.usage.model_extra["cost"] == 0.000054


def test_stop_reason_max_tokens_is_length(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    anthropic.enqueue(
        message_reply("cut", stop_reason="max_tokens"),
        message_stream("cut short", stop_reason="max_tokens"),
    )
    with client(gateway) as c:
        whole = c.chat.completions.create(model="claude", messages=HELLO, max_tokens=2)
        streamed = list(c.chat.completions.create(model="claude", messages=HELLO, stream=True))
    assert whole.choices[0].finish_reason == "length"
    assert streamed[-1].choices[0].finish_reason == "length"


# ---- images, tools, tool results --------------------------------------------------------


def test_images_and_system_prompt_reach_anthropic_as_blocks(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    with client(gateway) as c:
        c.chat.completions.create(
            model="claude",
            messages=[{"role": "developer", "content": "Describe images."},
                      {"role": "user", "content": content}],
        )  # fmt: skip
    sent = anthropic.requests[-1].json
    assert sent["system"] == "Describe images."
    assert sent["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]  # fmt: skip


def test_tool_call_and_tool_result_round_trip(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    call = tool_block("toolu_01A", "get_weather", {"city": "Paris"})
    anthropic.enqueue(
        message_reply([{"type": "text", "text": "Checking."}, call], stop_reason="tool_use"),
        message_reply("It is 18C in Paris."),
    )
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    with client(gateway) as c:
        first = c.chat.completions.create(model="claude", messages=messages, tools=[WEATHER_TOOL],
                                          tool_choice="required")  # fmt: skip
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Checking."
        [tool_call] = choice.message.tool_calls or []
        assert tool_call.id == "toolu_01A" and tool_call.function.name == "get_weather"
        assert json.loads(tool_call.function.arguments) == {"city": "Paris"}
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": tool_call.id, "content": "18C"}]  # fmt: skip
        second = c.chat.completions.create(model="claude", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "It is 18C in Paris."
    first_sent, second_sent = (r.json for r in anthropic.requests[-2:])
    assert first_sent["tools"] == [{"name": "get_weather", "description": "The weather in a city.",
                                    "input_schema": WEATHER_TOOL["function"]["parameters"]}]  # fmt: skip
    assert first_sent["tool_choice"] == {"type": "any"}
    assert second_sent["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A",
                                      "content": "18C"}]},
    ]  # fmt: skip


def test_streamed_tool_call(gateway: RunningGateway, anthropic: FakeAnthropic) -> None:
    call = tool_block("toolu_01B", "get_weather", {"city": "Rome"})
    anthropic.enqueue(message_stream([call], stop_reason="tool_use"))
    with client(gateway) as c:
        chunks = list(c.chat.completions.create(model="claude", messages=HELLO, stream=True,
                                                tools=[WEATHER_TOOL]))  # fmt: skip
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or ()]
    assert deltas[0].id == "toolu_01B" and deltas[0].function.name == "get_weather"
    assert {d.index for d in deltas} == {0}
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == {"city": "Rome"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    line = last_line(gateway)
    assert line["status"] == 200 and line["error_type"] is None


# ---- cache usage ------------------------------------------------------------------------

CACHED = tokens(1000, 500, cache_read=20000, cache_write=4000)
# 1000 x $3 + 20000 x $0.30 + 4000 x $3.75 + 500 x $15, per million tokens
CACHED_COST = "0.0315"


def test_cache_reads_and_writes_are_priced_separately(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    anthropic.enqueue(message_reply("cached answer", usage=CACHED))
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model="claude", messages=HELLO)
    usage = raw.parse().usage
    assert usage is not None and usage.prompt_tokens == 25000  # OpenAI's: cache included
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 20000
    assert raw.headers["x-tallygate-cost-usd"] == CACHED_COST
    assert Decimal(last_line(gateway)["cost_usd"]) == Decimal(CACHED_COST)


def test_streamed_cache_usage_is_priced_the_same(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    anthropic.enqueue(message_stream("cached", start_usage=CACHED, output_tokens=500))
    with client(gateway) as c:
        chunks = list(c.chat.completions.create(
            model="claude", messages=HELLO, stream=True, stream_options={"include_usage": True}
        ))  # fmt: skip
    usage = chunks[-1].usage
    assert usage is not None and usage.model_extra is not None
    assert usage.model_extra["cost"] == float(CACHED_COST)
    assert (usage.prompt_tokens, usage.completion_tokens) == (25000, 500)


# ---- errors -----------------------------------------------------------------------------


def test_anthropic_errors_reach_the_client_in_openai_shape(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    anthropic.enqueue(
        error_reply(401, "authentication_error", "invalid x-api-key"),
        error_reply(400, "invalid_request_error", "messages: roles must alternate"),
    )
    with client(gateway) as c:
        with pytest.raises(openai.AuthenticationError) as auth:
            c.chat.completions.create(model="claude", messages=HELLO)
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model="claude", messages=HELLO)
    assert auth.value.status_code == 401
    assert auth.value.body == {"message": "invalid x-api-key", "type": "authentication_error",
                               "param": None, "code": "authentication_error"}  # fmt: skip
    assert bad.value.body["code"] == "invalid_request_error"  # type: ignore[index]
    assert bad.value.message.endswith("messages: roles must alternate")
    assert len(anthropic.requests) == 2  # 4xx: not retried


def test_rate_limit_is_retried_honouring_retry_after_then_passed_on(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    limited = error_reply(429, "rate_limit_error", "Number of request tokens has exceeded "
                          "your per-minute rate limit", **{"retry-after": "0"})  # fmt: skip
    anthropic.enqueue(limited, message_reply("after the wait"))
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model="claude", messages=HELLO)
        assert raw.parse().choices[0].message.content == "after the wait"
        assert raw.headers["x-tallygate-attempts"] == "2"
        anthropic.enqueue(limited, limited)
        with pytest.raises(openai.RateLimitError) as exc:
            c.chat.completions.create(model="claude", messages=HELLO)
    assert exc.value.response.headers["retry-after"] == "0"
    assert exc.value.body["type"] == "rate_limit_error"  # type: ignore[index]
    assert exc.value.body["code"] == "rate_limit_error"  # type: ignore[index]


def test_overloaded_529_is_retried(gateway: RunningGateway, anthropic: FakeAnthropic) -> None:
    anthropic.enqueue(error_reply(529, "overloaded_error", "Overloaded"), message_reply("ok now"))
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model="claude", messages=HELLO)
    assert raw.parse().choices[0].message.content == "ok now"
    assert raw.headers["x-tallygate-attempts"] == "2"


def test_error_event_mid_stream_becomes_an_in_band_error(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    started = message_events("partial answer")[:5]  # message_start, ping, block start, 2 deltas
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    anthropic.enqueue(Stream([*started, event("error", overloaded)], done=False))
    with client(gateway) as c:
        stream = c.chat.completions.create(model="claude", messages=HELLO, stream=True)
        received = []
        with pytest.raises(openai.APIError) as exc:
            for ch in stream:
                received.append(ch.choices[0].delta.content or "")
    assert "".join(received) == "partial answer"
    assert "Overloaded" in exc.value.message
    line = last_line(gateway)
    assert line["status"] == 200 and line["error_type"] == "upstream_error"


def test_what_anthropic_cannot_do_is_refused_without_a_call(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    with client(gateway) as c:
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(model="claude", messages=HELLO, n=2)
    assert exc.value.body["param"] == "n"  # type: ignore[index]
    assert anthropic.requests == []


def test_success_body_that_is_not_a_message_is_reported_unreadable(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    anthropic.enqueue(Reply(200, body="<html>proxy login</html>",
                            headers={"content-type": "text/html"}))  # fmt: skip
    with client(gateway) as c:
        with pytest.raises(openai.InternalServerError) as exc:
            c.chat.completions.create(model="claude", messages=HELLO)
    assert exc.value.status_code == 502


def test_client_span_names_the_anthropic_provider(
    gateway: RunningGateway, anthropic: FakeAnthropic
) -> None:
    with client(gateway) as c:
        c.chat.completions.create(model="claude", messages=HELLO)
    wait_until(lambda: len(gateway.spans.get_finished_spans()) >= 2, within=5, what="spans")
    [chat] = [s for s in gateway.spans.get_finished_spans()
              if s.kind == SpanKind.CLIENT and s.attributes.get("gen_ai.operation.name")]  # fmt: skip
    assert chat.attributes["gen_ai.provider.name"] == "anthropic"
    assert chat.attributes["server.address"] == "127.0.0.1"
    assert chat.attributes["gen_ai.response.id"] == "msg_fake_1"


# ---- the provider on its own: native pass-through, base URLs ----------------------------


def provider(anthropic: FakeAnthropic, base: str | None = None) -> AnthropicProvider:
    config = ProviderConfig(kind="anthropic", base_url=base or anthropic.url, api_key=UPSTREAM_KEY)
    return AnthropicProvider("claude", config, max_output=lambda model: 1234)


async def test_send_native_relays_anthropic_bytes_untranslated(anthropic: FakeAnthropic) -> None:
    p = provider(anthropic, anthropic.url + "/v1/")  # a base URL ending in /v1 works too
    body = json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True,
                       "messages": HELLO}).encode()  # fmt: skip
    caller = {"x-api-key": "sk-client-key", "anthropic-beta": "tools-2024", "x-request-id": "r1"}
    try:
        up = await p.send_native("/v1/messages", body, caller, stream=True, timeout_s=5)
        assert up.status == 200 and up.chunks is not None
        raw = b"".join([piece async for piece in up.chunks])
        await up.close()
        count = {"input_tokens": 3}
        anthropic.enqueue_for("/v1/messages/count_tokens", Reply(json=count))
        counted = await p.send_native("/v1/messages/count_tokens", {"model": "m", "messages": HELLO},
                                      {}, stream=False, timeout_s=5)  # fmt: skip
    finally:
        await p.aclose()
    assert raw.decode() == "".join(message_events("hello there claude", id="msg_fake_1",
                                                  model="claude-sonnet-4-5",
                                                  start_usage=tokens(3, 0), output_tokens=3))  # fmt: skip
    sent = anthropic.requests[0]
    assert sent.body == body  # the bytes as given
    assert sent.headers["x-api-key"] == UPSTREAM_KEY  # the caller's key never goes
    assert sent.headers["anthropic-beta"] == "tools-2024" and sent.headers["x-request-id"] == "r1"
    assert counted.status == 200 and json.loads(counted.body or b"") == count
    assert anthropic.requests[1].path == "/v1/messages/count_tokens"


async def test_send_uses_the_default_max_tokens_and_translates_errors(
    anthropic: FakeAnthropic,
) -> None:
    p = provider(anthropic)
    anthropic.enqueue(error_reply(529, "overloaded_error", "Overloaded", **{"retry-after": "3"}))
    try:
        ok = await p.send("chat", "claude-x", {"model": "claude-x", "messages": HELLO},
                          stream=False, timeout_s=5, headers={})  # fmt: skip
        ok2 = await p.send("chat", "claude-x", {"model": "claude-x", "messages": HELLO},
                           stream=False, timeout_s=5, headers={})  # fmt: skip
        embed = await p.send("embeddings", "claude-x", {"input": "x"}, stream=False,
                             timeout_s=5, headers={})  # fmt: skip
    finally:
        await p.aclose()
    assert ok.status == 529 and ok.headers["retry-after"] == "3"
    assert json.loads(ok.body or b"")["error"] == {
        "message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded_error"
    }  # fmt: skip
    assert ok2.status == 200 and anthropic.requests[-1].json["max_tokens"] == 1234
    assert embed.status == 400 and len(anthropic.requests) == 2


async def test_a_stream_cut_after_message_delta_still_ends_with_usage(
    anthropic: FakeAnthropic,
) -> None:
    events = message_events("all said", output_tokens=2)
    anthropic.enqueue(Stream(events[:-1], done=False))  # no message_stop
    p = provider(anthropic)
    body = {"model": "m", "messages": HELLO, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    try:
        up = await p.send("chat", "m", body, stream=True, timeout_s=5, headers={})
        assert up.chunks is not None
        raw = b"".join([piece async for piece in up.chunks])
        await up.close()
    finally:
        await p.aclose()
    datas = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert datas[-1] == b"[DONE]"
    assert json.loads(datas[-2])["usage"]["completion_tokens"] == 2


def test_fake_default_answer_requires_max_tokens(anthropic: FakeAnthropic) -> None:
    import httpx

    r = httpx.post(anthropic.url + "/v1/messages", json={"model": "m", "messages": HELLO})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_fallback_from_anthropic_to_openai(
    gateway: RunningGateway, anthropic: FakeAnthropic, fake_upstream: FakeUpstream
) -> None:
    down = error_reply(500, "api_error", "Internal server error")
    anthropic.enqueue(down, down)
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model="smart", messages=HELLO)
    assert raw.parse().choices[0].message.content == "hello there claude"
    assert raw.headers["x-tallygate-deployment"] == "up/gpt-4o-mini"
    assert fake_upstream.requests[-1].json["messages"] == HELLO
