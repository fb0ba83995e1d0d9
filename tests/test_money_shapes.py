"""Money holds for every request shape: reservations that cover the worst case, usage that
cannot poison the ledger, budget 429s the SDKs do not retry, cost on streams.

Each test goes through the real HTTP path (the openai SDK where a client is involved) in
front of the scripted fake upstream, on both stores where a store is involved.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from tests.fake_upstream import FakeUpstream, Reply, Stream, chat_chunk
from tests.gateway_harness import KEYS, merge, running_gateway

ALPHA = {"authorization": f"Bearer {KEYS['alpha']}"}
ADMIN = {"authorization": f"Bearer {KEYS['admin']}"}
WORDS = " ".join(f"w{i}" for i in range(40))  # the fake echoes it, cut to max_tokens words
MTOK = Decimal(10**6)


def chat(model: str = "gpt-4o-mini", content: str = WORDS, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def post(url: str, body: dict[str, Any], headers: dict[str, str] = ALPHA) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def spent(url: str, team: str = "alpha") -> Decimal:
    rows = httpx.get(url + "/admin/spend", params={"team": team}, headers=ADMIN).json()["data"]
    return Decimal(next(r for r in rows if r["key"] is None)["spent_usd"])


def cost(r: httpx.Response) -> Decimal:
    return Decimal(r.headers["x-tallygate-cost-usd"])


def usage_reply(usage: dict[str, Any], text: str = "ok") -> Reply:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "finish_reason": "stop"}
    body = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [choice], "usage": usage}  # fmt: skip
    return Reply(json=body)


async def fire(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return await asyncio.gather(
            *(client.post(url + "/v1/chat/completions", json=b, headers=ALPHA) for b in bodies)
        )


def budget(cfg: dict[str, Any], limit: Decimal | str, period: str = "total") -> dict[str, Any]:
    return merge(cfg, {"teams": {"alpha": {"budget": {"limit_usd": str(limit), "period": period}}}})


# ---- the reservation covers n, best_of and the model's whole output ------------------------


def test_n_2_under_200_concurrent_requests_never_passes_the_limit(
    gateway_config: dict, store: dict
) -> None:
    body = chat(n=2, max_tokens=8)
    cfg = merge(gateway_config, {"store": store})
    with running_gateway(cfg) as gw:
        unit = cost(post(gw.url, body))  # one request's actual cost, with the same shape
        before = spent(gw.url)
    limit = before + unit * 10 + unit / 2  # room for 10 more
    with running_gateway(budget(cfg, limit)) as gw:
        responses = asyncio.run(fire(gw.url, [body] * 200))
        after = spent(gw.url)
    ok = [r for r in responses if r.status_code == 200]
    assert {r.status_code for r in responses} <= {200, 429}
    assert all(len(r.json()["choices"]) == 2 for r in ok)
    assert after - before == sum(cost(r) for r in ok)  # every admitted cost is recorded
    assert after <= limit  # and the budget held (n=2 spent 193% of it before)
    assert 1 <= len(ok) <= 10


def test_n_1000_is_reserved_in_full(gateway_config: dict) -> None:
    # a budget that one n=1 request fits easily, n=1000 does not
    with running_gateway(budget(gateway_config, "0.001")) as gw:
        single = post(gw.url, chat(max_tokens=16))
        big = post(gw.url, chat(max_tokens=16, n=1000))
        junk = [post(gw.url, chat(n=n)) for n in (0, -1, 1.5, "2", True)]
    assert single.status_code == 200
    assert big.status_code == 429
    err = big.json()["error"]
    assert err["code"] == "budget_exceeded"
    assert "max_tokens <=" in err["message"]  # says what would fit
    for r in junk:
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_best_of_and_batched_prompts_multiply_the_reservation(gateway_config: dict) -> None:
    def completion(**extra: Any) -> httpx.Response:
        body = {"model": "instruct", "prompt": "a b c", "max_tokens": 1000, **extra}
        return httpx.post(gw.url + "/v1/completions", json=body, headers=ALPHA, timeout=30)

    # gpt-3.5-turbo: 1000 output tokens ~ $0.0015-0.002; a budget of $0.01 fits ~5 of them
    with running_gateway(budget(gateway_config, "0.01")) as gw:
        assert completion().status_code == 200
        assert completion(best_of=8).status_code == 429
        assert completion(prompt=["a"] * 8).status_code == 429
        assert completion(n=2, best_of=3).status_code == 200


def test_a_model_without_a_max_output_reserves_its_context_window(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    # an override with a context window but no max output: the window bounds the output
    cfg = merge(
        gateway_config,
        {
            "models": {"custom": [{"provider": "up", "model": "custom-100k"}]},
            "pricing": {"overrides": {"custom-100k": {
                "input_per_mtok": 1, "output_per_mtok": 1, "context_window": 100_000}}},
        },
    )  # fmt: skip
    # one request at the full 100k output fits; two do not (4096 reserved each did, before)
    cfg = budget(cfg, "0.15")
    with running_gateway(cfg) as gw:
        fake_upstream.enqueue(usage_reply({"prompt_tokens": 20, "completion_tokens": 100_000}))
        first = post(gw.url, chat("custom"))
        second = post(gw.url, chat("custom"))
        total = spent(gw.url)
    assert first.status_code == 200
    assert cost(first) == Decimal("0.10002")
    assert second.status_code == 429
    assert total == Decimal("0.10002") <= Decimal("0.15")


# ---- usage that cannot poison the ledger ----------------------------------------------------


def test_absurd_usage_is_clamped_and_no_spend_is_lost(
    gateway_config: dict, fake_upstream: FakeUpstream, store: dict
) -> None:
    cfg = merge(gateway_config, {"store": store})
    with running_gateway(cfg) as gw:
        beta = httpx.post(
            gw.url + "/v1/chat/completions",
            json=chat("demo", "one two three"),
            headers={"authorization": f"Bearer {KEYS['beta']}"},
        )
        assert beta.status_code == 200
        fake_upstream.enqueue(usage_reply({"prompt_tokens": 10**18, "completion_tokens": 10**18,
                                "total_tokens": 2 * 10**18}))  # fmt: skip
        absurd = post(gw.url, chat())
        huge_cap = post(gw.url, chat(max_tokens=10**17))
        float_cap = post(gw.url, chat(max_tokens=1e17))
        alpha_before, beta_before = spent(gw.url), spent(gw.url, "beta")
        lines = gw.access_lines()
        metrics = httpx.get(gw.url + "/metrics").text
        marked = [
            s.attributes["tallygate.usage.anomalies"]
            for s in gw.spans.get_finished_spans()
            if "tallygate.usage.anomalies" in (s.attributes or {})
        ]
    assert absurd.status_code == 200
    # clamped to gpt-4o-mini's context window (x n=1) for input and for output
    window = _context_window("gpt-4o-mini")
    assert cost(absurd) == (window * Decimal("0.15") + window * Decimal("0.6")) / MTOK
    assert huge_cap.status_code == 200 and float_cap.status_code in (200, 400)
    assert beta_before == cost(beta)
    assert any(x["request_id"] == absurd.headers["x-request-id"] for x in lines)
    assert 'tallygate_event="usage_clamped"' in metrics
    assert len(marked) == 1 and any("above the bound" in a for a in marked[0])
    # a restart: every team's spend is intact to the nano-dollar
    with running_gateway(cfg) as gw:
        assert spent(gw.url) == alpha_before
        assert spent(gw.url, "beta") == beta_before


@pytest.mark.parametrize(
    ("usage", "model", "expected"),
    [
        # OpenAI-shaped usage with cache writes (Anthropic-compatible servers)
        ({"prompt_tokens": 3000, "completion_tokens": 10, "cache_creation_input_tokens": 2000},
         "claude", (1000 * Decimal(3) + 2000 * Decimal("3.75") + 10 * Decimal(15)) / MTOK),
        # reasoning outside completion_tokens, only in total_tokens
        ({"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 750},
         "gpt-4o-mini", (100 * Decimal("0.15") + 650 * Decimal("0.6")) / MTOK),
        # audio tokens read (inside the buckets)
        ({"prompt_tokens": 100, "completion_tokens": 50,
          "prompt_tokens_details": {"audio_tokens": 60}},
         "gpt-4o-mini", (100 * Decimal("0.15") + 50 * Decimal("0.6")) / MTOK),
    ],
)  # fmt: skip
def test_usage_shapes_are_priced_exactly(
    gateway_config: dict, fake_upstream: FakeUpstream, usage: dict, model: str, expected: Decimal
) -> None:
    cfg = merge(gateway_config, {"models": {"claude": [{"provider": "up",
                                                        "model": "claude-sonnet-4-5"}]}})  # fmt: skip
    with running_gateway(cfg) as gw:
        fake_upstream.enqueue(usage_reply(usage))
        r = post(gw.url, chat(model))
    assert r.status_code == 200
    assert cost(r) == expected


def test_a_stream_without_usage_from_a_reasoning_model_charges_its_output_cap(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    cfg = merge(gateway_config, {"models": {"o3": [{"provider": "up", "model": "o3-mini"}]}})
    chunks = [
        chat_chunk("", role="assistant"),
        chat_chunk("visible"),
        chat_chunk(finish_reason="stop"),
    ]
    with running_gateway(cfg) as gw:
        fake_upstream.enqueue(Stream(chunks))  # no usage chunk at all
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEYS["alpha"], max_retries=0)
        text = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                **chat("o3", "hi"), stream=True, max_completion_tokens=500
            )
            if c.choices
        )
        total = spent(gw.url)
        line = gw.access_lines()[-1]
    assert text == "visible"
    # hidden reasoning is unknown but within the cap: 500 output tokens charged, estimated
    prompt_max = total - 500 * Decimal("4.4") / MTOK
    assert Decimal(0) < prompt_max < 100 * Decimal("1.1") / MTOK
    assert line["tokens_estimated"] is True


# ---- team max_output_tokens -----------------------------------------------------------------


def test_team_max_output_tokens_is_the_default_cap_and_the_ceiling(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    cfg = merge(gateway_config, {
        "teams": {"alpha": {"max_output_tokens": 64}},
        "models": {"o3": [{"provider": "up", "model": "o3-mini"}]},
    })  # fmt: skip
    up = fake_upstream
    with running_gateway(cfg) as gw:
        assert post(gw.url, chat()).status_code == 200
        assert post(gw.url, chat(max_tokens=5000)).status_code == 200
        assert post(gw.url, chat(max_tokens=10)).status_code == 200
        assert post(gw.url, chat("o3")).status_code == 200
    sent = [r.json for r in up.requests]
    assert sent[0].get("max_tokens") == 64 and "max_completion_tokens" not in sent[0]
    assert sent[1]["max_tokens"] == 64
    assert sent[2]["max_tokens"] == 10  # a smaller cap is the client's to keep
    assert sent[3].get("max_completion_tokens") == 64 and "max_tokens" not in sent[3]


def test_a_tiny_remaining_budget_still_serves_a_capped_hello(gateway_config: dict) -> None:
    # $0.002 left: gpt-4o-mini's whole 16,384-token output ($0.0098) does not fit, 256 does
    plain = budget(gateway_config, "0.002")
    capped = merge(plain, {"teams": {"alpha": {"max_output_tokens": 256}}})
    with running_gateway(plain) as gw:
        refused = post(gw.url, chat(content="hello"))
    with running_gateway(capped) as gw:
        served = post(gw.url, chat(content="hello"))
    assert refused.status_code == 429
    assert "max_tokens <=" in refused.json()["error"]["message"]
    assert served.status_code == 200


# ---- a budget 429 the clients handle well ---------------------------------------------------


def test_budget_429_is_not_retried_by_the_openai_sdk(gateway_config: dict) -> None:
    with running_gateway(budget(gateway_config, "0.000001", period="daily")) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEYS["alpha"])  # default retries
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**chat())
        elapsed = time.monotonic() - started
        lines = gw.access_lines()
    response = info.value.response
    assert response.headers["x-should-retry"] == "false"
    to_midnight = 86400 - (time.time() % 86400)
    assert abs(int(response.headers["retry-after"]) - to_midnight) <= 5
    assert len([x for x in lines if x.get("status") == 429]) == 1  # one request, no retries
    assert elapsed < 1.0  # (the SDK's backoff would have added >= 0.5 s per retry)
    assert info.value.code == "budget_exceeded"


# ---- cost on streams ------------------------------------------------------------------------


def test_the_usage_chunk_carries_the_cost_a_whole_response_reports(gateway_config: dict) -> None:
    with running_gateway(gateway_config) as gw:
        whole = post(gw.url, chat(max_tokens=12))
        client = openai.OpenAI(base_url=gw.base_url, api_key=KEYS["alpha"], max_retries=0)
        chunks = list(client.chat.completions.create(
            **chat(max_tokens=12), stream=True, stream_options={"include_usage": True}))  # fmt: skip
        hidden = list(client.chat.completions.create(**chat(max_tokens=12), stream=True))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 12
    assert usage.model_extra["cost"] == float(cost(whole))
    assert all(c.usage is None for c in hidden)  # usage we asked for is still not shown


def _context_window(model: str) -> int:
    from pricing.table import PriceTable

    price = PriceTable.load().lookup(model)
    assert price is not None and price.context_window
    return price.context_window


# ---- prices that are true and traceable -----------------------------------------------------


@pytest.mark.parametrize(
    ("model", "input_per_mtok", "output_per_mtok"),
    [
        ("gpt-3.5-turbo-0613", "1.5", "2"),
        ("mistral-large-2402", "4", "12"),
        ("mistral-medium-2312", "2.7", "8.1"),
        ("codestral-2405", "1", "3"),
        ("gpt-4o-2024-08-06", "2.5", "10"),  # a snapshot of a family that shares its price
    ],
)
def test_dated_names_are_priced_from_their_own_row(
    gateway_config: dict, fake_upstream: FakeUpstream, model: str, input_per_mtok: str,
    output_per_mtok: str,
) -> None:  # fmt: skip
    cfg = merge(gateway_config, {"models": {"dated": [{"provider": "up", "model": model}]}})
    with running_gateway(cfg) as gw:
        fake_upstream.enqueue(usage_reply({"prompt_tokens": 1000, "completion_tokens": 100}))
        r = post(gw.url, chat("dated", max_tokens=100))
    assert r.status_code == 200
    assert cost(r) == (1000 * Decimal(input_per_mtok) + 100 * Decimal(output_per_mtok)) / MTOK


def test_a_snapshot_of_a_family_that_does_not_share_its_price_is_unknown(
    gateway_config: dict,
) -> None:
    cfg = merge(gateway_config, {"models": {"dated": [{"provider": "up", "model": "gpt-3.5-turbo-0999"}]}})  # fmt: skip
    with running_gateway(cfg) as gw:
        r = post(gw.url, chat("dated"))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "price_unknown"


# ---- every input part counts ----------------------------------------------------------------


def test_fifty_high_detail_images_are_reserved_by_the_published_formula(
    gateway_config: dict,
) -> None:
    # gpt-4o-mini bills an image 2,833 + 5,667 per tile: 50 of unknown size are >= 1.27M
    # tokens (~$0.19); counted as 765 each (38k tokens, ~$0.006) they passed a $0.1 budget
    image = {"type": "image_url", "image_url": {"url": "https://example.com/i.png", "detail": "high"}}  # fmt: skip
    parts = [{"type": "text", "text": "describe these"}] + [image] * 50
    with running_gateway(budget(gateway_config, "0.1")) as gw:
        refused = post(gw.url, chat(content=parts, max_tokens=10))
        served = post(gw.url, chat(content=parts[:2], max_tokens=10))
    assert refused.status_code == 429
    prompt = int(refused.json()["error"]["message"].split("alone (~")[1].split(" ")[0])
    assert prompt >= 1_270_000
    assert served.status_code == 200


def test_a_file_part_is_counted_from_its_size(gateway_config: dict) -> None:
    import base64

    pdf = b"%PDF-1.4\n" + b"".join(
        b"%d 0 obj << /Type /Page >> endobj\n" % i for i in range(40)
    ) + b"x" * 400_000  # fmt: skip
    data = "data:application/pdf;base64," + base64.b64encode(pdf).decode()
    part = {"type": "file", "file": {"filename": "report.pdf", "file_data": data}}
    with running_gateway(budget(gateway_config, "0.005")) as gw:
        refused = post(gw.url, chat(content=[{"type": "text", "text": "summarise"}, part], max_tokens=10))  # fmt: skip
        served = post(gw.url, chat(content="summarise", max_tokens=10))
    assert refused.status_code == 429  # counted as 0 tokens before
    assert served.status_code == 200
