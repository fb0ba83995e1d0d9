"""Metering through the gateway: the upstream's usage priced per bucket, estimates, unknown prices."""

from __future__ import annotations

from decimal import Decimal

import httpx

from pricing.encodings import get_encoding
from tests.fake_upstream import FakeUpstream, Reply
from tests.gateway_harness import KEYS, RunningGateway, merge, running_gateway

ALPHA = {"authorization": f"Bearer {KEYS['alpha']}"}
HELLO = [{"role": "user", "content": "hello"}]


def completion(usage: dict | None, content: str = "fine", model: str = "gpt-4o-mini") -> dict:
    body = {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def chat(gw: RunningGateway, model: str = "gpt-4o-mini") -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions", json={"model": model, "messages": HELLO}, headers=ALPHA
    )


def test_cached_and_reasoning_tokens_are_priced(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    usage = {
        "prompt_tokens": 10_000,
        "completion_tokens": 2_000,
        "total_tokens": 12_000,
        "prompt_tokens_details": {"cached_tokens": 4_000},
        "completion_tokens_details": {"reasoning_tokens": 1_500},
    }
    fake_upstream.enqueue(Reply(json=completion(usage)))
    r = chat(gateway)
    # gpt-4o-mini: 6,000 uncached x $0.15/M = 900,000 nano; 4,000 cached x $0.075/M = 300,000 nano;
    # 2,000 output (reasoning included) x $0.60/M = 1,200,000 nano → 2,400,000 nano = $0.0024
    assert r.headers["x-tallygate-cost-usd"] == "0.0024"
    line = gateway.access_lines()[-1]
    assert line["input_tokens"] == 10_000 and line["output_tokens"] == 2_000
    assert Decimal(line["cost_usd"]) == Decimal("0.0024")


def test_dated_model_ids_are_priced_as_their_family(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    cfg = merge(
        gateway_config, {"models": {"dated": [{"provider": "up", "model": "gpt-4o-2024-08-06"}]}}
    )
    with running_gateway(cfg) as gw:
        fake_upstream.enqueue(
            Reply(json=completion({"prompt_tokens": 1000, "completion_tokens": 100}))
        )
        r = chat(gw, "dated")
    # gpt-4o: 1,000 x $2.50/M + 100 x $10/M = 2,500,000 + 1,000,000 nano
    assert r.headers["x-tallygate-cost-usd"] == "0.0035"


def test_override_wins_over_the_table(gateway_config: dict, fake_upstream: FakeUpstream) -> None:
    cfg = merge(
        gateway_config,
        {"pricing": {"overrides": {"gpt-4o-mini": {"input_per_mtok": 1, "output_per_mtok": 2}}}},
    )
    with running_gateway(cfg) as gw:
        fake_upstream.enqueue(
            Reply(json=completion({"prompt_tokens": 1000, "completion_tokens": 500}))
        )
        r = chat(gw)
    assert r.headers["x-tallygate-cost-usd"] == "0.002"  # 1,000 x $1/M + 500 x $2/M


def test_missing_usage_is_counted_with_tiktoken_and_marked(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Reply(json=completion(None, content="four words of output")))
    r = chat(gateway)
    assert r.status_code == 200
    line = gateway.access_lines()[-1]
    enc = get_encoding("o200k_base")
    assert line["output_tokens"] == len(enc.encode("four words of output"))
    assert line["input_tokens"] == 3 + (3 + len(enc.encode("user")) + len(enc.encode("hello")))
    assert line["tokens_estimated"] is True
    assert Decimal(r.headers["x-tallygate-cost-usd"]) > 0


def test_unknown_price_rejected_or_allowed(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    cfg = merge(
        gateway_config, {"models": {"mystery": [{"provider": "up", "model": "mystery-model-9000"}]}}
    )
    with running_gateway(cfg) as gw:
        r = chat(gw, "mystery")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "price_unknown"
    assert fake_upstream.requests == []  # refused before anything was sent
    cfg["pricing"]["on_unknown_price"] = "allow"
    with running_gateway(cfg) as gw:
        r = chat(gw, "mystery")
        line = gw.access_lines()[-1]
    assert r.status_code == 200 and "x-tallygate-cost-usd" not in r.headers
    assert line["input_tokens"] > 0 and line["cost_usd"] is None


def test_embeddings_are_charged_input_only(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    with running_gateway(gateway_config) as gw:
        fake_upstream.enqueue(
            Reply(
                json={
                    "object": "list",
                    "model": "text-embedding-3-small",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                    "usage": {"prompt_tokens": 5_000, "total_tokens": 5_000},
                }
            )
        )
        r = httpx.post(
            gw.url + "/v1/embeddings", json={"model": "embed", "input": "x"}, headers=ALPHA
        )
    # 5,000 x $0.02/M (one input: a report above the model's 8,191-token window is clamped)
    assert r.headers["x-tallygate-cost-usd"] == "0.0001"
