"""The fake upstream behaves like an OpenAI-compatible provider, seen through the real SDK."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.fake_upstream import (
    Close,
    FakeUpstream,
    Hang,
    Reply,
    Stream,
    chat_chunk,
    chat_stream,
    error_json,
    fake_embedding,
)
from tests.servers import async_wait_until, free_port, run_process_server, wait_until

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there world"},
]


@pytest.fixture
def client(fake_upstream: FakeUpstream) -> Iterator[OpenAI]:
    with OpenAI(base_url=fake_upstream.base_url, api_key="x", max_retries=0, timeout=5) as client:
        yield client


@pytest.fixture
async def aclient(fake_upstream: FakeUpstream) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(
        base_url=fake_upstream.base_url, api_key="x", max_retries=0, timeout=5
    ) as client:
        yield client


def test_chat_echoes_last_user_message_with_word_usage(
    client: OpenAI, fake_upstream: FakeUpstream
) -> None:
    completion = client.chat.completions.create(model="m-1", messages=MESSAGES)  # type: ignore[arg-type]

    assert completion.id == "chatcmpl-fake-1"
    assert completion.model == "m-1"
    assert completion.choices[0].message.content == "hello there world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    # 2 + 3 words in the messages, + 7; 3 words in the reply
    assert completion.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    ) == {
        "prompt_tokens": 12,
        "completion_tokens": 3,
        "total_tokens": 15,
    }
    [request] = fake_upstream.requests
    assert (request.method, request.path, request.query) == ("POST", "/v1/chat/completions", "")
    assert request.headers["authorization"] == "Bearer x"
    assert request.json == {"model": "m-1", "messages": MESSAGES}


def test_chat_max_tokens_cuts_the_reply(client: OpenAI) -> None:
    completion = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]

    assert completion.choices[0].message.content == "hello there"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 2


def test_chat_stream_with_include_usage_ends_with_a_usage_chunk(
    client: OpenAI, fake_upstream: FakeUpstream
) -> None:
    with client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    ) as stream:
        chunks = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "hello there world"
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (12, 3)
    assert all(c.usage is None for c in chunks[:-1])
    assert fake_upstream.sent_chunks == 5  # role, 3 words, finish (usage and [DONE] not counted)


def test_chat_stream_without_include_usage_has_no_usage(client: OpenAI) -> None:
    with client.chat.completions.create(model="m", messages=MESSAGES, stream=True) as stream:  # type: ignore[arg-type]
        chunks = list(stream)

    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hello there world"


def test_raw_stream_is_openai_sse(fake_upstream: FakeUpstream) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", fake_upstream.base_url + "/chat/completions", json=body) as response:
        text = response.read().decode()

    assert response.headers["content-type"] == "text/event-stream"
    events = text.split("\n\n")
    assert all(e.startswith("data: ") for e in events[:-1]) and events[-1] == ""
    assert events[-2] == "data: [DONE]"
    assert len(events) == 1 + 3 + 1  # role, "hi", finish, [DONE], trailing ""


async def test_completions_echo_prompt_and_stream(aclient: AsyncOpenAI) -> None:
    completion = await aclient.completions.create(model="c", prompt="say this back")
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "say this back"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 3)

    stream = await aclient.completions.create(
        model="c", prompt="say this back", stream=True, stream_options={"include_usage": True}
    )
    async with stream:
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "say this back"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 6


def test_embeddings_are_deterministic(client: OpenAI) -> None:
    result = client.embeddings.create(model="e", input=["one two", "three"])

    assert [d.embedding for d in result.data] == [
        fake_embedding("one two"),
        fake_embedding("three"),
    ]
    assert len(result.data[0].embedding) == 8
    assert result.usage.prompt_tokens == 3
    base64_result = client.embeddings.create(model="e", input="three", encoding_format="base64")
    assert base64_result.data[0].embedding  # base64 text; the SDK leaves it to the caller


def test_models_lists_the_configured_models(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-model"]


def test_scripted_429_with_retry_after_raises_rate_limit_error(
    client: OpenAI, fake_upstream: FakeUpstream
) -> None:
    body = error_json("slow down", type="rate_limit_error", code="rate_limit_exceeded")
    fake_upstream.enqueue(Reply(429, json=body, headers={"Retry-After": "7"}))

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"
    assert fake_upstream.pending == 0
    # the script is used up: the default answers again
    assert client.chat.completions.create(model="m", messages=MESSAGES).choices  # type: ignore[arg-type]


def test_reply_without_body_is_an_error_or_the_default_answer(
    client: OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Reply(503), Reply(headers={"x-upstream": "yes"}))

    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.body == {
        "message": "fake upstream: HTTP 503",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert raw.headers["x-upstream"] == "yes"
    assert raw.parse().choices[0].message.content == "hello there world"


def test_enqueue_for_a_path_goes_before_the_shared_queue(
    client: OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Reply(json={"object": "list", "data": []}))
    fake_upstream.enqueue_for("/v1/embeddings", Reply(400, json=error_json("bad input")))

    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="e", input="x")
    assert list(client.models.list()) == []
    assert client.embeddings.create(model="e", input="x").data


def test_stream_dropped_midway_makes_the_sdk_raise(
    client: OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(chat_stream("one two three four", drop_after=2))
    received = []

    with pytest.raises(openai.APIConnectionError) as caught:
        with client.chat.completions.create(model="m", messages=MESSAGES, stream=True) as stream:  # type: ignore[arg-type]
            received.extend(stream)
    assert type(caught.value.__cause__).__name__ == "RemoteProtocolError"  # incomplete chunked read
    assert len(received) == 2
    assert fake_upstream.disconnects == 0  # we dropped it, the client did not leave


def test_close_drops_the_connection_without_a_response(
    client: OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Close())

    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]


def test_hang_times_out_the_client_and_sees_it_leave(fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(Hang(30))
    with OpenAI(base_url=fake_upstream.base_url, api_key="x", max_retries=0, timeout=0.3) as client:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]

    wait_until(lambda: fake_upstream.disconnects == 1, what="the hang to see the client leave")


def test_short_hang_then_default_answer(client: OpenAI, fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(Hang(0.2))

    assert client.chat.completions.create(model="m", messages=MESSAGES).choices  # type: ignore[arg-type]
    assert fake_upstream.disconnects == 0


def test_gated_stream_goes_out_one_chunk_per_release(
    client: OpenAI, fake_upstream: FakeUpstream
) -> None:
    chunks = [chat_chunk("a", role="assistant"), chat_chunk(" b"), chat_chunk(finish_reason="stop")]
    fake_upstream.enqueue(
        Stream(
            chunks, gate=True, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        )
    )

    with client.chat.completions.create(model="m", messages=MESSAGES, stream=True) as stream:  # type: ignore[arg-type]
        events = iter(stream)
        assert next(events).choices[0].delta.content == "a"
        assert fake_upstream.sent_chunks == 1
        fake_upstream.release()
        assert next(events).choices[0].delta.content == " b"
        assert fake_upstream.sent_chunks == 2
        fake_upstream.release()
        assert next(events).choices[0].finish_reason == "stop"
        usage = next(events).usage  # not gated, nor is [DONE]
        assert usage is not None and usage.total_tokens == 3
        assert list(events) == []
    assert fake_upstream.disconnects == 0


def test_client_leaving_a_gated_stream_counts_a_disconnect(
    client: OpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(chat_stream("one two three", gate=True))

    with client.chat.completions.create(model="m", messages=MESSAGES, stream=True) as stream:  # type: ignore[arg-type]
        next(iter(stream))

    wait_until(lambda: fake_upstream.disconnects == 1, what="the fake to see the client leave")
    assert fake_upstream.sent_chunks == 1


async def test_async_client_closing_a_slow_stream_counts_a_disconnect(
    aclient: AsyncOpenAI, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(chat_stream(" ".join(["word"] * 50), delay_s=0.05))

    stream = await aclient.chat.completions.create(model="m", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    async with stream:
        async for _ in stream:
            break

    await async_wait_until(lambda: fake_upstream.disconnects == 1, what="a disconnect")
    assert fake_upstream.sent_chunks < 52


def test_requests_record_query_and_raw_body(fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(Reply(json={"ok": True}))
    response = httpx.post(
        fake_upstream.url + "/anything?api-version=1",
        content=b"not json",
        headers={"X-Custom": "v"},
    )

    assert response.json() == {"ok": True}
    [request] = fake_upstream.requests
    assert (request.path, request.query, request.body, request.json) == (
        "/anything",
        "api-version=1",
        b"not json",
        None,
    )
    assert request.headers["x-custom"] == "v"
    assert httpx.get(fake_upstream.url + "/nope").status_code == 404


def test_run_process_server_waits_until_ready_and_returns_output() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]

    with run_process_server(cmd, port, ready_url=f"http://127.0.0.1:{port}/") as server:
        assert httpx.get(server.url + "/").status_code == 200

    assert server.returncode is not None
    assert '"GET / HTTP/1.1" 200' in server.stderr


def test_run_process_server_reports_a_process_that_dies() -> None:
    cmd = [sys.executable, "-c", "import sys; sys.exit('boom at startup')"]

    with pytest.raises(RuntimeError, match="boom at startup"):
        with run_process_server(cmd, free_port()):
            pass
