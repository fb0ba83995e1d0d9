"""Failures say what happened, through the real HTTP path: an upstream stream or body that is
not OpenAI's format, a client that leaves before its response, /metrics when it is off."""

from __future__ import annotations

import json
import logging
import socket
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.trace import SpanKind, StatusCode

from gateway.pipeline import handle as pipeline
from pricing.encodings import get_encoding
from tests.fake_upstream import FakeUpstream, Hang, Reply, Stream, chat_chunk
from tests.gateway_harness import KEYS, RunningGateway, merge, running_gateway
from tests.servers import wait_until

HELLO = [{"role": "user", "content": "hello"}]
AUTH = {"authorization": f"Bearer {KEYS['alpha']}"}
EMAIL = "jane.doe@example.com"  # planted in upstream garbage: the log must show it redacted


def sdk(gw: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEYS["alpha"], max_retries=0)


def last_line(gw: RunningGateway, n: int = 1) -> dict[str, Any]:
    wait_until(lambda: len(gw.access_lines()) >= n, within=5, what=f"{n} access line(s)")
    return gw.access_lines()[-1]


def sse(obj: dict[str, Any], end: str = "\n\n") -> str:
    return "data: " + json.dumps(obj) + end


def stream_text(gw: RunningGateway, **extra: Any) -> str:
    with sdk(gw) as c:
        chunks = c.chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, stream=True, **extra
        )
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def spans(gw: RunningGateway, n: int = 2) -> tuple[Any, Any]:
    wait_until(lambda: len(gw.spans.get_finished_spans()) >= n, within=5, what=f"{n} spans")
    finished = gw.spans.get_finished_spans()
    [server] = [s for s in finished if s.kind == SpanKind.SERVER]
    [client] = [s for s in finished if s.kind == SpanKind.CLIENT]
    return server, client


def request_counts(gw: RunningGateway) -> list[dict[str, Any]]:
    """The attributes of each tallygate.requests point."""
    out = []
    for rm in gw.metrics.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "tallygate.requests":
                    out += [dict(p.attributes) for p in m.data.data_points]
    return out


def spend(gw: RunningGateway) -> dict[str, Decimal]:
    r = httpx.get(
        gw.url + "/admin/spend", headers={"authorization": f"Bearer {KEYS['admin']}"}, timeout=10
    )
    [row] = [x for x in r.json()["data"] if x["team"] == "alpha" and x["key"] is None]
    return {"spent": Decimal(row["spent_usd"]), "reserved": Decimal(row["reserved_usd"])}


# --- a stream that is not OpenAI's SSE ---------------------------------------------------

GARBAGE_STREAMS = {
    "html": Stream(
        [f"<html>\n<head><title>502 Bad Gateway</title></head>\n\n<body>{EMAIL}</body>\n</html>"],
        done=False,
    ),
    "plain text": Stream([f"upstream overloaded, write to {EMAIL}"], done=False),
    "binary": Stream(["\x00\xff\x10\x80\x9b garbage \x00"], done=False),
    "a whole JSON body": Stream(
        ['{"id": "x", "object": "chat.completion", "choices": []}'],
        headers={"content-type": "application/json"},
        done=False,
    ),
    "data that is not JSON": Stream([f"data: hello {EMAIL}\n\n"]),
    "data that is not an object": Stream(["data: [1, 2]\n\n"]),
    "a chunk of an unknown shape": Stream([sse({"choices": "abc"})]),
    "no bytes at all": Stream([], done=False),
    "only comments": Stream([": ping\n\n", ": ping\n\n"], done=False),
}


@pytest.mark.parametrize("step", GARBAGE_STREAMS.values(), ids=GARBAGE_STREAMS.keys())
def test_an_unreadable_stream_ends_with_an_error_event_the_sdk_raises(
    gateway: RunningGateway, fake_upstream: FakeUpstream, step: Stream
) -> None:
    fake_upstream.enqueue(step)
    with pytest.raises(openai.APIError) as info:
        stream_text(gateway)
    assert "not an OpenAI-format response" in info.value.message
    assert info.value.body["code"] == "upstream_error"  # type: ignore[index]
    line = last_line(gateway)
    assert line["status"] == 200 and line["cancelled"] is False  # the headers had gone out
    assert line["error_type"] == "upstream_error"
    assert "Received:" in line["error_message"] and EMAIL not in line["error_message"]
    # charged our own count: the prompt, and no output (none was relayed)
    assert line["tokens_estimated"] is True and line["output_tokens"] == 0
    assert line["input_tokens"] > 0 and Decimal(line["cost_usd"]) > 0


def test_the_error_event_says_what_came_and_the_log_quotes_it_redacted(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(GARBAGE_STREAMS["a whole JSON body"])
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=AUTH,
        json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True},
        timeout=10,
    )
    assert r.status_code == 200
    assert r.text.endswith("\n\n") and r.text.count("data: ") == 1  # one event, nothing else
    error = json.loads(r.text.removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (
        error["type"] == "upstream_error" and "content-type 'application/json'" in error["message"]
    )
    assert "chat.completion" not in error["message"]  # the client is not shown the bytes
    assert "chat.completion" in last_line(gateway)["error_message"]  # the log is

    fake_upstream.enqueue(GARBAGE_STREAMS["html"])
    httpx.post(
        gateway.base_url + "/chat/completions",
        headers=AUTH,
        json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True},
        timeout=10,
    )
    message = last_line(gateway, 2)["error_message"]
    assert "bytes that are not server-sent events" in message
    assert "502 Bad Gateway" in message and "[EMAIL]" not in message  # cut at the first bad event


def test_chunks_then_garbage_relays_the_chunks_and_charges_them(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(
        Stream([chat_chunk("partial", role="assistant"), chat_chunk(" answer"), "<html>oops"])
    )
    got = []
    with sdk(gateway) as c, pytest.raises(openai.APIError):
        for chunk in c.chat.completions.create(model="gpt-4o-mini", messages=HELLO, stream=True):
            got.append(chunk.choices[0].delta.content)
    assert got == ["partial", " answer"]
    line = last_line(gateway)
    assert line["error_type"] == "upstream_error" and line["tokens_estimated"] is True
    assert line["output_tokens"] == len(get_encoding("o200k_base").encode("partial answer"))


def test_an_unreadable_stream_is_an_error_on_the_spans_and_in_the_metrics(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(GARBAGE_STREAMS["html"])
    with pytest.raises(openai.APIError):
        stream_text(gateway)
    server, client = spans(gateway)
    assert client.status.status_code is StatusCode.ERROR
    assert client.attributes["error.type"] == "invalid_response"
    assert server.attributes["error.type"] == "upstream_error"
    assert server.attributes["http.response.status_code"] == 200
    wait_until(lambda: bool(request_counts(gateway)), within=5, what="the request metric")
    [point] = request_counts(gateway)
    assert point["error.type"] == "upstream_error" and point["http.response.status_code"] == 200


def test_an_unreadable_stream_sets_the_server_span_status(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(GARBAGE_STREAMS["html"])
    with pytest.raises(openai.APIError):
        stream_text(gateway)
    server, _ = spans(gateway)
    assert server.status.status_code is StatusCode.ERROR


def test_an_error_event_from_the_upstream_is_relayed_and_recorded(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    error = {"message": f"overloaded, tell {EMAIL}", "type": "server_error", "param": None,
             "code": None}  # fmt: skip
    fake_upstream.enqueue(
        Stream([chat_chunk("Hi", role="assistant"), {"error": error}], done=False)
    )
    with pytest.raises(openai.APIError) as info:
        stream_text(gateway)
    assert info.value.message == error["message"]  # the provider's own event, as it was sent
    line = last_line(gateway)
    assert line["error_type"] == "upstream_error"
    assert "overloaded" in line["error_message"] and EMAIL not in line["error_message"]


# --- what must not be mistaken for garbage -----------------------------------------------

CHUNKS = [chat_chunk("one", role="assistant"), chat_chunk(" two"), chat_chunk(" three")]


@pytest.mark.parametrize(
    "raw",
    [
        [": keep-alive\n\n", sse(CHUNKS[0]), ":\n\n", sse(CHUNKS[1]), sse(CHUNKS[2]),
         "data: [DONE]\n\n"],
        ["event: message\n" + sse(CHUNKS[0]), "retry: 1000\n" + sse(CHUNKS[1]),
         "event: message\nid: 8\n" + sse(CHUNKS[2]), "data: [DONE]\n\n"],
        [sse(c, "\r\n\r\n") for c in CHUNKS] + ["data: [DONE]\r\n\r\n"],  # CRLF
        [sse(c, "\r\r") for c in CHUNKS] + ["data: [DONE]\r\r"],  # lone CR
        [sse(CHUNKS[0]) + sse(CHUNKS[1])[:9], sse(CHUNKS[1])[9:], sse(CHUNKS[2])],  # no [DONE]
        [sse(CHUNKS[0]), sse(CHUNKS[1]), sse(CHUNKS[2], "\n")],  # last event without its blank line
        [sse(CHUNKS[0]), sse(CHUNKS[1]), sse(CHUNKS[2], "")],
        ["\n\n", sse(CHUNKS[0]), sse(CHUNKS[1]), sse(CHUNKS[2]), "data: [DONE]\n\n\n"],
    ],
    ids=["comments", "event-id-retry", "crlf", "cr", "no-done", "final-lf", "final-bare", "blank"],
)  # fmt: skip
def test_valid_sse_variants_are_relayed_as_success(
    gateway: RunningGateway, fake_upstream: FakeUpstream, raw: list[str]
) -> None:
    fake_upstream.enqueue(Stream(raw, done=False))
    assert stream_text(gateway) == "one two three"
    line = last_line(gateway)
    assert line["error_type"] is None and line["status"] == 200


def test_events_without_data_are_relayed_byte_for_byte(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    raw = [": keep-alive\n\n", "id: 7\nretry: 1000\n\n", "event: ping\n\n", sse(CHUNKS[0]),
           "data: [DONE]\n\n"]  # fmt: skip
    fake_upstream.enqueue(Stream(raw, done=False))
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        headers=AUTH,
        json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True,
              "stream_options": {"include_usage": True}},
        timeout=10,
    )  # fmt: skip
    assert r.text == "".join(raw)
    assert last_line(gateway)["error_type"] is None


# --- a whole response that is not OpenAI's JSON ------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        Reply(body=f"<html><body>{EMAIL}</body></html>", headers={"content-type": "text/html"}),
        Reply(body=b"\x00\xff garbage"),
        Reply(body=""),
        Reply(json=[1, 2]),
        Reply(json={"choices": "abc", "usage": {"prompt_tokens": 1}}),
        Reply(json={"choices": [{"message": {"tool_calls": [7]}}]}),
    ],
    ids=["html", "binary", "empty", "json-list", "choices-string", "tool-call-int"],
)
def test_an_unreadable_body_is_a_502_charged_by_our_count(
    gateway: RunningGateway, fake_upstream: FakeUpstream, reply: Reply
) -> None:
    fake_upstream.enqueue(reply)
    with sdk(gateway) as c, pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert info.value.status_code == 502
    assert "not an OpenAI-format response" in info.value.message
    assert len(fake_upstream.requests) == 1  # not retried: the upstream answered
    line = last_line(gateway)
    assert line["status"] == 502 and line["error_type"] == "upstream_error"
    assert "Received:" in line["error_message"] and EMAIL not in line["error_message"]
    assert line["tokens_estimated"] is True and Decimal(line["cost_usd"]) > 0
    assert spend(gateway)["reserved"] == 0


# --- a client that leaves ----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream-before-headers"])
def test_a_client_that_leaves_cancels_the_upstream_request(
    gateway: RunningGateway,
    fake_upstream: FakeUpstream,
    stream: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # tallygate's protocol reports the drop itself: the polling fallback must not be needed
    monkeypatch.setattr(pipeline, "forward_polled", None)
    fake_upstream.enqueue(Hang(30))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway.base_url + "/chat/completions",
            headers=AUTH,
            json={"model": "gpt-4o-mini", "messages": HELLO, "stream": stream},
            timeout=httpx.Timeout(10, read=0.5),
        )
    wait_until(lambda: fake_upstream.disconnects == 1, within=5, what="the upstream to see it")
    line = last_line(gateway)
    assert line["status"] == 499 and line["cancelled"] is True
    assert line["error_type"] == "client_closed_request"
    # charged the admitted prompt, estimated; nothing stays reserved
    assert line["tokens_estimated"] is True and line["output_tokens"] == 0
    assert line["input_tokens"] > 0
    balance = spend(gateway)
    assert balance["reserved"] == 0 and balance["spent"] == Decimal(line["cost_usd"]) > 0
    _, client = spans(gateway)
    assert client.attributes["error.type"] == "cancelled"


def test_a_client_that_leaves_is_seen_under_another_asgi_server(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    # uvicorn's own protocol has no connection_lost hook: a watcher task reads receive()
    with running_gateway(gateway_config, uvicorn_protocol=True) as gw:
        fake_upstream.enqueue(Hang(30))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gw.base_url + "/chat/completions",
                headers=AUTH,
                json={"model": "gpt-4o-mini", "messages": HELLO},
                timeout=httpx.Timeout(10, read=0.5),
            )
        wait_until(lambda: fake_upstream.disconnects == 1, within=5, what="the disconnect")
        line = last_line(gw)
    assert line["status"] == 499 and line["cancelled"] is True


def test_a_hidden_reasoning_model_is_charged_its_output_cap_when_the_client_leaves(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    # it may have billed thinking before the cancel: leaving must not be a way around the budget
    config = merge(
        gateway_config, {"models": {"reasoner": [{"provider": "up", "model": "o3-mini"}]}}
    )
    with running_gateway(config) as gw:
        fake_upstream.enqueue(Hang(30))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                gw.base_url + "/chat/completions",
                headers=AUTH,
                json={"model": "reasoner", "messages": HELLO, "max_completion_tokens": 700},
                timeout=httpx.Timeout(10, read=0.5),
            )
        wait_until(lambda: fake_upstream.disconnects == 1, within=5, what="the disconnect")
        line = last_line(gw)
    assert line["status"] == 499 and line["output_tokens"] == 700
    assert line["tokens_estimated"] is True
    cost = (Decimal("1.10") * line["input_tokens"] + Decimal("4.40") * 700) / 1_000_000
    assert Decimal(line["cost_usd"]) == cost  # o3-mini's prices


def test_a_client_that_leaves_mid_body_is_recorded_not_crashed(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\n"
        f"authorization: Bearer {KEYS['alpha']}\r\ncontent-length: 1000\r\n\r\n"
    )
    with (
        caplog.at_level(logging.ERROR),
        socket.create_connection((gateway.server.host, gateway.server.port), timeout=5) as sock,
    ):
        sock.sendall(head.encode() + b'{"model": "gpt-4o-mini", ')  # then hang up
    line = last_line(gateway)
    assert line["status"] == 499 and line["error_type"] == "client_closed_request"
    assert "failed inside the gateway" not in caplog.text


def test_a_slow_answer_keeps_its_connection_usable(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    """The watcher started for a slow upstream call is stopped cleanly: the keep-alive
    connection serves the next request, stream or not."""
    fake_upstream.enqueue(Hang(0.3), Hang(0.3))
    with httpx.Client(base_url=gateway.base_url, headers=AUTH, timeout=10) as c:
        body = {"model": "gpt-4o-mini", "messages": HELLO}
        assert c.post("/chat/completions", json=body).status_code == 200
        r = c.post("/chat/completions", json={**body, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert c.post("/chat/completions", json=body).status_code == 200
    assert fake_upstream.disconnects == 0
    assert [x["status"] for x in gateway.access_lines()] == [200, 200, 200]


# --- /metrics --------------------------------------------------------------------------


def test_metrics_with_prometheus_off_is_an_openai_shaped_404(gateway_config: dict) -> None:
    with running_gateway(merge(gateway_config, {"telemetry": {"prometheus": False}})) as gw:
        r = httpx.get(gw.url + "/metrics", timeout=10)
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "Unknown path /metrics.",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    }
