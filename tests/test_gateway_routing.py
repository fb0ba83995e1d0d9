"""Retries, Retry-After, fallback, cooldown, weights, and the stream's no-retry-after-first-byte rule."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from pricing.encodings import get_encoding
from tests.fake_upstream import Close, FakeUpstream, Reply, Stream, chat_chunk, error_reply
from tests.gateway_harness import KEYS, RunningGateway, merge, running_gateway
from tests.servers import free_port, wait_until

HELLO = [{"role": "user", "content": "hello"}]
AUTH = {"authorization": f"Bearer {KEYS['alpha']}"}


def chat(gw: RunningGateway, model: str = "gpt-4o-mini", **extra) -> httpx.Response:
    return httpx.post(
        gw.base_url + "/chat/completions",
        json={"model": model, "messages": HELLO, **extra},
        headers=AUTH,
        timeout=30,
    )


def test_retry_then_success(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(error_reply(503))
    r = chat(gateway)
    assert r.status_code == 200
    assert r.headers["x-tallygate-attempts"] == "2"
    assert len(fake_upstream.requests) == 2


def test_retry_after_is_honoured(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(
        Reply(
            429,
            json={"error": {"message": "wait", "type": "requests", "param": None, "code": None}},
            headers={"retry-after": "0.4"},
        )
    )
    t0 = time.monotonic()
    r = chat(gateway)
    waited = time.monotonic() - t0
    assert r.status_code == 200 and r.headers["x-tallygate-attempts"] == "2"
    assert waited >= 0.4  # the gateway waited as told before retrying


def test_fallback_to_second_deployment(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(error_reply(500), error_reply(500))
    r = chat(gateway, "fallback")
    assert r.status_code == 200
    assert r.headers["x-tallygate-deployment"] == "secondary"
    assert r.headers["x-tallygate-attempts"] == "3"
    assert [q.json["model"] for q in fake_upstream.requests] == [
        "gpt-4o-mini",
        "gpt-4o-mini",
        "gpt-4o",
    ]


def test_fallback_when_first_deployment_refuses_connections(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    gateway_config["providers"]["up"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"
    with running_gateway(gateway_config) as gw:
        r = chat(gw, "fallback")
    assert r.status_code == 200 and r.headers["x-tallygate-deployment"] == "secondary"
    assert [q.json["model"] for q in fake_upstream.requests] == ["gpt-4o"]


def test_cooldown_skips_a_failing_deployment(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    cfg = merge(
        gateway_config, {"routing": {"retries": 0, "cooldown_after_failures": 2, "cooldown_s": 60}}
    )
    with running_gateway(cfg) as gw:
        for _ in range(2):  # primary fails twice in a row (each time the secondary answers)
            fake_upstream.enqueue(error_reply(500))
            assert chat(gw, "fallback").headers["x-tallygate-deployment"] == "secondary"
        fake_upstream.reset()
        r = chat(gw, "fallback")
    assert r.status_code == 200 and r.headers["x-tallygate-attempts"] == "1"
    assert [q.json["model"] for q in fake_upstream.requests] == ["gpt-4o"]  # primary skipped


def test_weights_reach_the_gateway_router(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    # The shares themselves are a unit test (tests/test_routing.py, seeded). Here: the
    # weights are wired through. The second deployment listed carries nearly all the
    # weight, so it goes first (P(not) = 1e-6 per request) where config order would not.
    cfg = merge(
        gateway_config,
        {
            "models": {
                "weighted": [
                    {"provider": "up", "model": "gpt-4o-mini", "weight": 0.001},
                    {"provider": "up2", "model": "gpt-4o", "weight": 1000},
                ]
            }
        },
    )
    with running_gateway(cfg) as gw:
        seen = {chat(gw, "weighted").headers["x-tallygate-deployment"] for _ in range(4)}
    assert seen == {"up2/gpt-4o"}
    assert [q.json["model"] for q in fake_upstream.requests] == ["gpt-4o"] * 4


def test_weighted_deployments_fall_back_to_one_another(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    gateway_config["providers"]["up"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"
    cfg = merge(
        gateway_config,
        {
            "models": {
                "weighted": [
                    {"provider": "up", "model": "gpt-4o-mini", "weight": 1},
                    {"provider": "up2", "model": "gpt-4o", "weight": 1},
                ]
            },
            "routing": {"retries": 0, "cooldown_after_failures": 100},
        },
    )
    with running_gateway(cfg) as gw:
        codes = {chat(gw, "weighted").status_code for _ in range(10)}
    assert codes == {200}


def test_stream_is_relayed_chunk_by_chunk(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    words = ["one ", "two ", "three"]
    fake_upstream.enqueue(Stream([chat_chunk(w) for w in words], gate=True))
    received: list[str] = []
    with openai.OpenAI(
        base_url=gateway.base_url, api_key=KEYS["alpha"], max_retries=0, timeout=5
    ) as c:
        stream = c.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
        for i, chunk in enumerate(stream):
            received.append(chunk.choices[0].delta.content or "")
            # chunk i reached us before the upstream may send chunk i+1 (it waits for our
            # release): a gateway that buffered would stall here until the client timeout
            assert fake_upstream.sent_chunks <= i + 1
            if i + 1 < len(words):
                fake_upstream.release()
    assert "".join(received) == "one two three"


def test_mid_stream_drop_is_not_retried_and_ends_with_an_error_event(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Stream([chat_chunk("partial "), chat_chunk("answer ")], drop_after=2))
    got = []
    with openai.OpenAI(base_url=gateway.base_url, api_key=KEYS["alpha"], max_retries=0) as c:
        stream = c.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True)
        with pytest.raises(openai.APIError):
            for chunk in stream:
                got.append(chunk.choices[0].delta.content)
    assert got == ["partial ", "answer "]
    assert len(fake_upstream.requests) == 1  # nothing retried after the first byte
    wait_until(lambda: bool(gateway.log.getvalue()), within=5)
    line = gateway.access_lines()[-1]
    expected = len(get_encoding("o200k_base").encode("partial answer "))
    assert line["output_tokens"] == expected and line["tokens_estimated"] is True


def test_client_disconnect_cancels_the_upstream_request(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Stream([chat_chunk(f"w{i} ") for i in range(200)], delay_s=0.02))
    with httpx.stream(
        "POST",
        gateway.base_url + "/chat/completions",
        headers=AUTH,
        timeout=10,
        json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True},
    ) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data:") and "w2 " in line:
                break
    wait_until(
        lambda: fake_upstream.disconnects == 1, within=5, what="upstream sees the disconnect"
    )
    wait_until(lambda: bool(gateway.log.getvalue()), within=5)
    line = gateway.access_lines()[-1]
    assert line["cancelled"] is True
    assert (
        3 <= line["output_tokens"] < 200 * 2
    )  # charged for what was streamed, not the whole answer
    assert fake_upstream.sent_chunks < 200


def test_stream_upstream_error_before_first_byte_falls_back(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(error_reply(502), error_reply(502))
    with openai.OpenAI(base_url=gateway.base_url, api_key=KEYS["alpha"], max_retries=0) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="fallback", messages=HELLO, stream=True
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    assert text == "hello"
    assert raw.headers["x-tallygate-deployment"] == "secondary"


def test_concurrent_requests_through_one_pool(gateway: RunningGateway) -> None:
    results: list[int] = []

    def worker() -> None:
        with httpx.Client(timeout=30) as h:
            for _ in range(10):
                results.append(
                    h.post(
                        gateway.base_url + "/chat/completions",
                        headers=AUTH,
                        json={"model": "gpt-4o-mini", "messages": HELLO},
                    ).status_code
                )

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 80


def test_closed_connection_then_success(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Close())
    r = chat(gateway)
    assert r.status_code == 200 and r.headers["x-tallygate-attempts"] == "2"


def test_a_server_that_rejects_stream_options_is_asked_again_without(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    refusal = {
        "error": {
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    fake_upstream.enqueue(Reply(400, json=refusal))
    with openai.OpenAI(base_url=gateway.base_url, api_key=KEYS["alpha"], max_retries=0) as c:
        chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "hello"
    first, second = fake_upstream.requests
    assert first.json["stream_options"] == {"include_usage": True}
    assert "stream_options" not in second.json
    wait_until(lambda: bool(gateway.log.getvalue()), within=5)
    line = gateway.access_lines()[-1]
    assert line["attempts"] == 2 and line["tokens_estimated"] is True and line["output_tokens"] == 1
