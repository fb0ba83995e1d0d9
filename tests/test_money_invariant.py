"""The budget invariant, property-based (hypothesis), through the real gateway on both stores.

- Honest upstream (usage within what was asked), any mix of request shapes (n, caps, images,
  tools, stream or not, clients that leave mid-stream), all at once: the team's spend never
  passes its limit, and nothing stays reserved once the requests are done.
- Dishonest upstream (usage far beyond what was asked): the overspend is at most that one
  request's cost, and the next request is refused.

Each example gets a team of its own (a fresh ledger), from a config with many teams.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_upstream import FakeUpstream, RecordedRequest, Reply, chat_answer, usage_json
from tests.gateway_harness import KEYS, merge, running_gateway

TEAMS = 40
LIMITS = ("0.0005", "0.002", "0.006")  # a few requests' worth, up to dozens
ADMIN = {"authorization": f"Bearer {KEYS['admin']}"}
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}  # fmt: skip


def team_key(i: int) -> str:
    return f"sk-prop-team-{i:04d}"


def config(base: dict[str, Any], store: dict[str, Any]) -> dict[str, Any]:
    teams = {
        f"t{i}": {
            "keys": [{"name": f"t{i}-app", "key": team_key(i)}],
            "budget": {"limit_usd": LIMITS[i % len(LIMITS)], "period": "total"},
            **({"max_output_tokens": 200} if i % 2 else {}),
        }
        for i in range(TEAMS)
    }
    return merge(base, {"teams": teams, "store": store})


shape = st.fixed_dictionaries(
    {
        "n": st.sampled_from([None, 1, 2, 3]),
        "max_tokens": st.sampled_from([None, 1, 5, 40, 300]),
        "images": st.integers(0, 2),
        "tools": st.booleans(),
        "stream": st.booleans(),
        "include_usage": st.booleans(),
        "leave": st.booleans(),  # a streaming client that goes away after the first chunk
        "words": st.integers(1, 60),
    }
)


def body_of(s: dict[str, Any]) -> dict[str, Any]:
    text = " ".join(f"w{i}" for i in range(s["words"]))
    content: Any = text if not s["images"] else [{"type": "text", "text": text}] + [IMAGE] * s["images"]  # fmt: skip
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}  # fmt: skip
    for name in ("n", "max_tokens"):
        if s[name] is not None:
            body[name] = s[name]
    if s["tools"]:
        body["tools"] = [TOOL]
    if s["stream"]:
        body["stream"] = True
        if s["include_usage"]:
            body["stream_options"] = {"include_usage": True}
    return body


def honest(request: RecordedRequest, number: int) -> Reply | None:
    """The default answer, with a usage report anywhere within what was asked: the prompt
    no larger than the words sent, the output no larger than n x the cap sent upstream."""
    body = request.json
    if not isinstance(body, dict) or body.get("stream"):
        return None  # streams: the default answer (usage = the words echoed, within the cap)
    reply = chat_answer(body, number)
    assert isinstance(reply, Reply)
    rng = random.Random(number)
    n = body.get("n") or 1
    cap = body.get("max_tokens") or body.get("max_completion_tokens") or 16_384
    usage = usage_json(
        rng.randint(0, reply.json["usage"]["prompt_tokens"]), rng.randint(0, n * cap)
    )
    return Reply(json={**reply.json, "usage": usage})


async def run_batch(url: str, key: str, shapes: list[dict[str, Any]]) -> list[int]:
    headers = {"authorization": f"Bearer {key}"}

    async def one(client: httpx.AsyncClient, s: dict[str, Any]) -> int:
        body = body_of(s)
        if not s["stream"]:
            return (
                await client.post(url + "/v1/chat/completions", json=body, headers=headers)
            ).status_code
        async with client.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers
        ) as r:
            async for _ in r.aiter_bytes():
                if s["leave"]:
                    break  # leaving closes the connection mid-stream
            return r.status_code

    limits = httpx.Limits(max_connections=len(shapes))
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(*(one(client, s) for s in shapes))


def ledger(url: str, team: str) -> tuple[Decimal, Decimal]:
    rows = httpx.get(url + "/admin/spend", params={"team": team}, headers=ADMIN).json()["data"]
    row = next(r for r in rows if r["key"] is None)
    return Decimal(row["spent_usd"]), Decimal(row["reserved_usd"])


def settled(url: str, team: str) -> tuple[Decimal, Decimal]:
    """The team's ledger once every request (a left stream settles in the background) is done."""
    deadline = time.monotonic() + 20  # generous: the machine may be busy
    while time.monotonic() < deadline:
        spent, reserved = ledger(url, team)
        if reserved == 0:
            return spent, reserved
        time.sleep(0.02)
    return ledger(url, team)


def test_honest_upstream_concurrent_shapes_never_pass_the_limit(
    gateway_config: dict, fake_upstream: FakeUpstream, store: dict
) -> None:
    fake_upstream.answer = honest
    teams = itertools.count()
    seen: set[int] = set()
    with running_gateway(config(gateway_config, store)) as gw:

        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.lists(shape, min_size=4, max_size=24))
        def batch(shapes: list[dict[str, Any]]) -> None:
            i = next(teams)
            assert i < TEAMS, "more examples than teams"
            statuses = asyncio.run(run_batch(gw.url, team_key(i), shapes))
            assert set(statuses) <= {200, 429}
            seen.update(statuses)
            spent, reserved = settled(gw.url, f"t{i}")
            assert reserved == 0  # nothing left reserved once every request is done
            assert spent <= Decimal(LIMITS[i % len(LIMITS)])

        batch()
    assert seen == {200, 429}  # the examples both served and refused: the property was tested


def test_dishonest_upstream_overspends_by_at_most_one_request(
    gateway_config: dict, fake_upstream: FakeUpstream, store: dict
) -> None:
    teams = itertools.count()
    with running_gateway(config(gateway_config, store)) as gw:

        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.integers(10**5, 10**19), st.sampled_from([None, 5, 300]))
        def lie(completion: int, max_tokens: int | None) -> None:
            i = next(teams)
            limit = Decimal(LIMITS[i % len(LIMITS)])
            body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            headers = {"authorization": f"Bearer {team_key(i)}"}
            fake_upstream.answer = lambda request, number: Reply(json={
                "id": "x", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                             "finish_reason": "stop"}],
                "usage": usage_json(3, completion)})  # fmt: skip
            before = Decimal(0)
            for _ in range(50):  # until refused
                r = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers)
                if r.status_code == 429:
                    break
                assert r.status_code == 200
                last = Decimal(r.headers["x-tallygate-cost-usd"])
                spent, _ = ledger(gw.url, f"t{i}")
                assert spent == before + last  # recorded, to the nano
                if spent > limit:
                    # overspent: by no more than this one request, and the next is refused
                    assert spent - limit <= last
                    nxt = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers)
                    assert nxt.status_code == 429
                    break
                before = spent
            else:
                pytest.fail("a lying upstream was served 50 times")

        lie()
