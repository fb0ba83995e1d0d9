"""The real openai SDK, sync and async, streaming and not, against the gateway unchanged."""

from __future__ import annotations

import httpx
import openai

from pricing.encodings import get_encoding
from tests.fake_upstream import FakeUpstream, Stream, chat_chunk
from tests.gateway_harness import KEYS, UPSTREAM_KEY, RunningGateway

HELLO = [{"role": "user", "content": "hello there gateway"}]


def client(gw: RunningGateway, key: str = KEYS["alpha"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0)


def test_chat_non_stream_echoes_and_reports_usage(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HELLO)
        reply = raw.parse()
    assert reply.choices[0].message.content == "hello there gateway"
    assert reply.usage is not None and reply.usage.prompt_tokens == 3 + 7
    assert raw.headers["x-tallygate-deployment"] == "up/gpt-4o-mini"
    assert raw.headers["x-tallygate-attempts"] == "1"
    assert raw.headers["x-request-id"].startswith("req_")
    # 10 prompt tokens at $0.15/M + 3 output tokens at $0.60/M = 1500 + 1800 nano-USD
    assert raw.headers["x-tallygate-cost-usd"] == "0.0000033"
    assert float(raw.headers["x-tallygate-overhead-ms"]) >= 0


def test_upstream_gets_provider_key_and_untouched_fields(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    tools = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    with client(gateway) as c:
        c.chat.completions.create(
            model="fallback",
            messages=HELLO,
            temperature=0.3,
            n=1,
            tools=tools,
            response_format={"type": "json_object"},
            extra_body={"custom_field": {"kept": True}},
        )
    sent = fake_upstream.requests[-1]
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert KEYS["alpha"] not in str(sent.headers)
    assert sent.json["model"] == "gpt-4o-mini"  # rewritten to the deployment's model
    assert sent.json["temperature"] == 0.3
    assert sent.json["tools"] == tools
    assert sent.json["response_format"] == {"type": "json_object"}
    assert sent.json["custom_field"] == {"kept": True}
    assert sent.json["messages"] == HELLO


def test_chat_stream_hides_injected_usage(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    with client(gateway) as c:
        chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "hello there gateway"
    assert all(ch.choices for ch in chunks), "the usage chunk the client did not ask for leaked"
    assert fake_upstream.requests[-1].json["stream_options"] == {"include_usage": True}
    line = wait_access_line(gateway)
    assert line["input_tokens"] == 10 and line["output_tokens"] == 3
    assert line["tokens_estimated"] is False


def test_chat_stream_with_usage_requested(gateway: RunningGateway) -> None:
    with client(gateway) as c:
        chunks = list(
            c.chat.completions.create(
                model="gpt-4o-mini",
                messages=HELLO,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].choices == []


def test_stream_without_upstream_usage_is_estimated(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        Stream(
            [
                chat_chunk("Hi", role="assistant"),
                chat_chunk(" you"),
                chat_chunk(None, finish_reason="stop"),
            ]
        )
    )
    with client(gateway) as c:
        chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Hi you"
    line = wait_access_line(gateway)
    assert line["tokens_estimated"] is True
    assert line["output_tokens"] == 2  # "Hi you" in o200k_base


async def test_async_client_stream_and_not(gateway: RunningGateway) -> None:
    async with openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=KEYS["alpha"], max_retries=0
    ) as c:
        reply = await c.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
        assert reply.choices[0].message.content == "hello there gateway"
        stream = await c.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
        parts = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
    assert "".join(parts) == "hello there gateway"


def test_mock_provider_non_stream_and_stream(gateway: RunningGateway) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "echo me back"},
    ]
    with client(gateway, KEYS["beta"]) as c:
        reply = c.chat.completions.create(model="demo", messages=messages)
        chunks = list(c.chat.completions.create(model="demo", messages=messages, stream=True))
    assert reply.choices[0].message.content == "echo me back"
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    # the mock counts the prompt with tiktoken as OpenAI's cookbook does: 3 per message,
    # its role and content, and 3 to prime the reply
    enc = get_encoding("o200k_base")
    per_message = sum(
        3 + len(enc.encode(m["role"])) + len(enc.encode(m["content"])) for m in messages
    )
    assert reply.usage.prompt_tokens == per_message + 3
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "echo me back"
    )


def test_completions_and_embeddings(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    with client(gateway) as c:
        done = c.completions.create(model="instruct", prompt="say this")
        emb = c.embeddings.create(model="embed", input=["one", "two words"])
    assert done.choices[0].text.strip() != "" and done.usage is not None
    assert fake_upstream.requests[-2].path == "/v1/completions"
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
    assert fake_upstream.requests[-1].path == "/v1/embeddings"
    assert fake_upstream.requests[-1].json["model"] == "text-embedding-3-small"


def test_models_lists_only_the_teams_models(gateway: RunningGateway) -> None:
    with client(gateway, KEYS["beta"]) as c:
        beta = [m.id for m in c.models.list()]
    with client(gateway) as c:
        alpha = sorted(m.id for m in c.models.list())
    assert beta == ["demo"]
    assert alpha == sorted(["gpt-4o-mini", "fallback", "embed", "instruct", "demo"])


def test_paths_without_v1_prefix_and_x_api_key(gateway: RunningGateway) -> None:
    r = httpx.post(
        gateway.url + "/chat/completions",
        headers={"x-api-key": KEYS["alpha"], "x-request-id": "my-req-1"},
        json={"model": "demo", "messages": HELLO},
    )
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "hello there gateway"
    assert r.headers["x-request-id"] == "my-req-1"


def test_sha256_key(gateway_config: dict) -> None:
    import hashlib

    from tests.gateway_harness import running_gateway

    digest = hashlib.sha256(b"sk-hashed-only").hexdigest()
    gateway_config["teams"]["hashed"] = {"keys": [{"name": "h", "sha256": digest}]}
    with running_gateway(gateway_config) as gw:
        ok = httpx.post(
            gw.base_url + "/chat/completions",
            headers={"authorization": "Bearer sk-hashed-only"},
            json={"model": "demo", "messages": HELLO},
        )
        bad = httpx.post(
            gw.base_url + "/chat/completions",
            headers={"authorization": f"Bearer {digest}"},
            json={"model": "demo", "messages": HELLO},
        )
    assert ok.status_code == 200
    assert bad.status_code == 401


def wait_access_line(gw: RunningGateway) -> dict:
    from tests.servers import wait_until

    wait_until(lambda: bool(gw.log.getvalue().strip()), within=5, what="access log line")
    return gw.access_lines()[-1]


def test_tokenizers_load_at_start_and_readiness_waits_for_them(gateway: RunningGateway) -> None:
    from tests.servers import wait_until

    warming = gateway.gateway.warming
    assert warming is not None  # started in the lifespan, not left to the first request
    wait_until(lambda: httpx.get(gateway.url + "/readyz").status_code == 200, within=30)
    body = httpx.get(gateway.url + "/readyz").json()
    assert body == {"status": "ready", "config": True, "store": True, "tokenizer": True}
    assert warming.done() and warming.exception() is None
