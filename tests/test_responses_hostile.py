"""/v1/responses against hostile input from both sides: odd request bodies (input items,
instructions, tools, caps of every type) and odd upstream answers (events and response
objects of any shape). Never a 5xx of our own making; a stream always ends readably; no
reservation is left behind."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_upstream import FakeUpstream, Reply, Stream
from tests.gateway_harness import KEYS, RunningGateway, base_config, running_gateway

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
AUTH = {"authorization": f"Bearer {KEYS['alpha']}"}
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
ODD: Any = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
PART = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]), "text": ODD}),
    st.fixed_dictionaries({"type": st.sampled_from(["input_image", "input_file"])}, optional={
        "image_url": ODD, "file_data": ODD, "filename": ODD, "detail": ODD}),
    ODD,
)  # fmt: skip
ITEM = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "developer", "assistant"])},
                          optional={"type": st.just("message"), "content": st.one_of(
                              st.text(max_size=20), st.lists(PART, max_size=3), ODD), "id": ODD}),
    st.fixed_dictionaries({"type": st.just("function_call")},
                          optional={"call_id": ODD, "name": ODD, "arguments": ODD}),
    st.fixed_dictionaries({"type": st.just("function_call_output")},
                          optional={"call_id": ODD, "output": ODD}),
    st.fixed_dictionaries({"type": ODD}),
    ODD,
)  # fmt: skip
BODY = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o-mini", "demo", "fallback"]),
     "input": st.one_of(st.text(max_size=30), st.lists(ITEM, max_size=4), ODD)},
    optional={"instructions": ODD, "tools": st.one_of(st.lists(ODD, max_size=2), ODD),
              "text": st.one_of(st.fixed_dictionaries({"format": ODD}), ODD),
              "max_output_tokens": ODD, "stream": st.booleans(), "background": ODD,
              "previous_response_id": ODD, "temperature": ODD, "n": ODD, "max_tokens": ODD},
)  # fmt: skip
EVENT_TYPES = ["response.created", "response.in_progress", "response.output_item.added",
               "response.output_item.done", "response.output_text.delta",
               "response.function_call_arguments.delta", "response.completed",
               "response.incomplete", "response.failed", "error", "response.unknown"]  # fmt: skip
RESPONSE = st.one_of(
    st.fixed_dictionaries({}, optional={
        "id": ODD, "model": ODD, "status": st.one_of(st.sampled_from(
            ["completed", "incomplete", "failed", "in_progress"]), ODD),
        "output": st.one_of(st.lists(st.one_of(st.fixed_dictionaries(
            {"type": st.sampled_from(["message", "function_call"])},
            optional={"content": ODD, "arguments": ODD, "id": ODD, "call_id": ODD}), ODD),
            max_size=2), ODD),
        "usage": st.one_of(st.fixed_dictionaries({}, optional={
            "input_tokens": ODD, "output_tokens": ODD, "total_tokens": ODD,
            "input_tokens_details": ODD, "output_tokens_details": ODD}), ODD),
        "incomplete_details": ODD, "error": ODD}),
    ODD,
)  # fmt: skip
EVENT = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(EVENT_TYPES)}, optional={
        "sequence_number": ODD, "response": RESPONSE, "item": ODD, "item_id": ODD,
        "delta": ODD, "message": ODD, "code": ODD}),
    st.fixed_dictionaries({"type": ODD}),
)  # fmt: skip


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def gateway(
    upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    config = base_config(upstream.base_url, tmp_path_factory.mktemp("hostile") / "t.db")
    with running_gateway(config) as gw:
        yield gw


def post(gw: RunningGateway, body: Any) -> httpx.Response:
    return httpx.post(gw.base_url + "/responses", headers=AUTH, json=body, timeout=30)


def reserved(gw: RunningGateway) -> Decimal:
    admin = {"authorization": f"Bearer {KEYS['admin']}"}
    rows = httpx.get(gw.url + "/admin/spend", headers=admin, timeout=10).json()["data"]
    return sum((Decimal(r["reserved_usd"]) for r in rows if r["key"] is None), Decimal(0))


def events(body: str) -> list[dict[str, Any]]:
    """Every event's data, which must be JSON."""
    out = []
    for event in body.split("\n\n"):
        data = [line[6:] for line in event.splitlines() if line.startswith("data: ")]
        if data:
            out.append(json.loads("\n".join(data)))
    return out


@SETTINGS
@given(body=BODY)
def test_any_request_body_is_answered_without_a_5xx(gateway, upstream, body) -> None:
    upstream.reset()
    upstream.enqueue(Reply(json={"id": "r", "object": "response", "status": "completed",
                                 "output": [], "usage": {"input_tokens": 1, "output_tokens": 1}}))  # fmt: skip
    upstream.answer = lambda request, number: Stream([], done=False)  # a stream: no events
    r = post(gateway, body)
    assert r.status_code < 500, (r.status_code, r.text[:300], body)
    assert reserved(gateway) == 0


@SETTINGS
@given(chunks=st.lists(EVENT, max_size=6))
def test_any_upstream_stream_ends_readably(gateway, upstream, chunks) -> None:
    upstream.reset()
    upstream.enqueue(Stream(chunks, done=False))
    r = post(gateway, {"model": "gpt-4o-mini", "input": "hi", "stream": True})
    assert r.status_code == 200
    relayed = events(r.text)  # all JSON
    ours = [e for e in relayed if e.get("type") == "error" and e.get("code") == "upstream_error"]
    assert len(ours) <= 1 and (not ours or relayed[-1] is ours[0])  # ours ends the stream
    assert all("error" not in e or e.get("type") for e in relayed)  # never chat's error shape
    assert reserved(gateway) == 0


@SETTINGS
@given(response=RESPONSE)
def test_any_upstream_response_object_is_relayed_or_a_502(gateway, upstream, response) -> None:
    upstream.reset()
    json_reply = {"content-type": "application/json"}  # (json=None would be the default answer)
    upstream.enqueue(Reply(body=json.dumps(response), headers=json_reply))
    r = post(gateway, {"model": "gpt-4o-mini", "input": "hi"})
    assert r.status_code in (200, 502), (r.status_code, r.text[:300])
    if r.status_code == 200:
        assert r.json() == response  # as it came
    assert reserved(gateway) == 0
