"""Nothing a client sends produces a 500: hostile bodies, headers, paths and methods at every
route, through the real HTTP path (hypothesis), against a fake upstream that answers normally.

A 5xx here is a bug in the stage that should have refused the input (parse, validate), not
something to catch later: the fake upstream is never told to fail, so even 502/504 are wrong.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fake_upstream import FakeUpstream, RecordedRequest, Reply, Stream, chat_answer
from tests.gateway_harness import KEYS, RunningGateway, base_config, running_gateway

INFERENCE = ("/chat/completions", "/completions", "/embeddings")
GETS = ("/v1/models", "/models", "/admin/spend", "/healthz", "/readyz", "/metrics")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")
MODELS = ("gpt-4o-mini", "demo", "embed", "instruct", "fallback", "unknown-model")

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- values: odd types for every field, and plausible ones often enough to get far -------

SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # beyond 64 bits too
    st.floats(),  # NaN and Infinity: not JSON, sent anyway
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "\ud7ff", "💥", "a" * 300]),
)
ODD: Any = st.recursive(
    SCALAR,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
COUNT = st.one_of(
    st.integers(min_value=-3, max_value=5),
    st.integers(min_value=2**31, max_value=2**64 - 1),
    st.floats(allow_nan=False),
    ODD,
)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=30), ODD)}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.one_of(st.fixed_dictionaries({"url": ODD}), ODD),
        }
    ),
    st.fixed_dictionaries({"type": ODD}),
    ODD,
)
CONTENT = st.one_of(st.text(max_size=40), st.lists(PART, max_size=3), ODD)
TOOL_CALL = st.one_of(
    st.fixed_dictionaries(
        {"id": ODD, "type": st.just("function"),
         "function": st.one_of(st.fixed_dictionaries({"name": ODD, "arguments": ODD}), ODD)}
    ),
    ODD,
)  # fmt: skip
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer"]), ODD)},
        optional={"content": CONTENT, "name": ODD, "tool_calls": st.lists(TOOL_CALL, max_size=2) | ODD,
                  "tool_call_id": ODD},
    ),
    ODD,
)  # fmt: skip
MESSAGES = st.one_of(st.lists(MESSAGE, min_size=1, max_size=4), ODD)
TOKENS = st.lists(st.integers(min_value=-5, max_value=300_000), max_size=5)
PROMPT = st.one_of(
    st.text(max_size=40),
    st.lists(st.text(max_size=10), max_size=3),
    TOKENS,
    st.lists(TOKENS, max_size=3),
    ODD,
)
TOOL = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("function"),
         "function": st.one_of(st.fixed_dictionaries({"name": ODD}, optional={"parameters": ODD}), ODD)}
    ),
    ODD,
)  # fmt: skip
STREAM_OPTIONS = st.one_of(st.fixed_dictionaries({"include_usage": ODD}), ODD)
BODY = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(MODELS), ODD),
        "messages": MESSAGES,
        "prompt": PROMPT,
        "input": PROMPT,
        "n": COUNT,
        "best_of": COUNT,
        "max_tokens": COUNT,
        "max_completion_tokens": COUNT,
        "max_output_tokens": COUNT,
        "stream": st.one_of(st.booleans(), ODD),
        "stream_options": STREAM_OPTIONS,
        "tools": st.one_of(st.lists(TOOL, max_size=3), ODD),
        "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]), ODD),
        "response_format": st.one_of(st.fixed_dictionaries({"type": ODD}), ODD),
        "temperature": ODD,
        "stop": ODD,
        "logit_bias": ODD,
        "user": ODD,
        "metadata": ODD,
        "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), ODD),
        "dimensions": COUNT,
        "seed": ODD,
    },
)
# a body that passes the required-field checks, so the later stages see the odd values
FULL_BODY = st.builds(
    lambda body, model, messages, prompt: {"model": model, "messages": messages, "prompt": prompt,
                                           "input": prompt, **body},
    BODY,
    st.sampled_from(MODELS[:-1]),
    st.lists(MESSAGE, min_size=1, max_size=3),
    PROMPT.filter(lambda p: p is not None),
)  # fmt: skip
RAW_BODY = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"null", b"[]", b"[1]", b'"x"', b"1e999", b"{", b"{}" * 3, b"\xff\xfe",
                     b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\ud800"}]}',
                     b'{"model": "gpt-4o-mini", "model": 1, "messages": []}']),
)  # fmt: skip
# header values as bytes: anything HTTP lets through (UTF-8, latin-1, obs-text), no controls
HEADER_VALUE = st.one_of(st.text(max_size=40), st.binary(max_size=40)).map(
    lambda v: bytes(
        b for b in (v.encode("utf-8") if isinstance(v, str) else v) if b >= 0x20 and b != 0x7F
    ).strip()
)
HEADER_NAMES = ("authorization", "x-api-key", "api-key", "x-request-id", "traceparent", "tracestate",
                "baggage", "content-type", "user-agent", "accept", "accept-encoding", "x-stainless-os",
                "openai-organization", "expect")  # fmt: skip
ODD_HEADERS = st.lists(st.tuples(st.sampled_from(HEADER_NAMES), HEADER_VALUE), max_size=4)
PATH = st.one_of(
    st.sampled_from(["/", "/v1", "/v1/", "/v1/chat", "/v1/chat/completions/", "/v2/chat/completions",
                     "/admin", "/admin/spend/x", "/metrics/", "//v1/models", "/v1/models/gpt-4o-mini",
                     "/v1/%2e%2e/admin/spend", "/%00", "/v1/models?x=%ff"]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30).map(lambda p: "/" + p),
)  # fmt: skip


def dumps(value: Any) -> bytes:
    """JSON as a permissive client writes it (NaN, Infinity, big integers allowed)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# --- the gateway, once per module ------------------------------------------------------


def bounded(request: RecordedRequest, number: int) -> Reply | Stream | None:
    """The fake's default answer, with at most 4 choices: the gateway admits an `n` in the
    millions (it reserves for them), which the fake would otherwise build in memory."""
    body = request.json
    if request.path.endswith("/chat/completions") and isinstance(body, dict):
        n = body.get("n")
        if isinstance(n, int) and n > 4:
            return chat_answer({**body, "n": 4}, number)
    return None


@pytest.fixture(scope="module")
def hostile_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    with FakeUpstream(answer=bounded) as fake:
        config = base_config(fake.base_url, tmp_path_factory.mktemp("no500") / "t.db")
        config["telemetry"]["prometheus"] = False  # /metrics is then a 404 (it once was a 500)
        with running_gateway(config) as gw:
            yield gw


@pytest.fixture(scope="module")
def client(hostile_gateway: RunningGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile_gateway.url, timeout=30) as c:
        yield c


def auth(key: str = "alpha") -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {KEYS[key]}".encode())]


def send(
    client: httpx.Client, method: str, path: str, body: bytes | None, headers: list
) -> httpx.Response:
    request = client.build_request(method, path, content=body, headers=headers)
    response = client.send(request, stream=True)
    try:
        response.read()  # a stream too: its end is where a late failure would show
    finally:
        response.close()
    return response


def assert_no_5xx(r: httpx.Response, what: object) -> None:
    event(f"HTTP {r.status_code}")  # --hypothesis-show-statistics: how far the inputs got
    assert r.status_code < 500, f"{r.status_code} {r.content[:300]!r} for {what!r}"


def raw_status(gw: RunningGateway, request: bytes) -> int | None:
    """Send `request` as is on a new connection; the response's status (None: no response)."""
    with socket.create_connection((gw.server.host, gw.server.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            part = sock.recv(4096)
            if not part:
                return None
            data += part
    return int(data.split(b" ", 2)[1])


CHAT = dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def request_bytes(headers: list[bytes], body: bytes = CHAT) -> bytes:
    lines = [b"POST /v1/chat/completions HTTP/1.1", b"host: test",
             f"authorization: Bearer {KEYS['alpha']}".encode(), *headers]  # fmt: skip
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --- the properties --------------------------------------------------------------------


@SETTINGS
@given(path=st.sampled_from(INFERENCE), prefix=st.sampled_from(["/v1", ""]), body=BODY)
def test_any_json_body_at_every_inference_route(client, path, prefix, body) -> None:
    r = send(client, "POST", prefix + path, dumps(body), auth())
    assert_no_5xx(r, body)


@SETTINGS
@given(path=st.sampled_from(INFERENCE), body=FULL_BODY)
def test_odd_field_values_past_the_required_fields(client, path, body) -> None:
    r = send(client, "POST", "/v1" + path, dumps(body), auth())
    assert_no_5xx(r, body)


@SETTINGS
@given(path=st.sampled_from(INFERENCE), body=RAW_BODY)
def test_any_bytes_as_a_body(client, path, body) -> None:
    r = send(client, "POST", "/v1" + path, body, auth())
    assert_no_5xx(r, body)
    assert r.status_code in (400, 413)


@SETTINGS
@given(
    path=st.sampled_from([*(f"/v1{p}" for p in INFERENCE), *GETS]),
    key=st.sampled_from(["alpha", "beta", "admin"]),
    headers=ODD_HEADERS,
    stream=st.booleans(),
)
def test_odd_headers_at_every_route(client, path, key, headers, stream) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "input": "hi", "prompt": "hi", "stream": stream}  # fmt: skip
    method = "GET" if path in GETS else "POST"
    r = send(client, method, path, dumps(body), auth(key) + headers)
    assert_no_5xx(r, headers)


@SETTINGS
@given(method=st.sampled_from(METHODS), path=st.one_of(st.sampled_from(
    [*(f"/v1{p}" for p in INFERENCE), *INFERENCE, *GETS]), PATH),
    key=st.sampled_from(["alpha", "admin", None]), query=st.text(max_size=20))  # fmt: skip
def test_every_method_and_path(hostile_gateway, method, path, key, query) -> None:
    target = path + (f"?team={quote(query)}" if query else "")
    lines = [f"{method} {target} HTTP/1.1", "host: test", "content-length: 0"]
    if key:
        lines.append(f"authorization: Bearer {KEYS[key]}")
    status = raw_status(hostile_gateway, "\r\n".join(lines).encode() + b"\r\n\r\n")
    assert status is None or status < 500, (method, target, status)


# framing and auth headers a hand-written client may send; None: the server hung up
@pytest.mark.parametrize(
    "request_",
    [
        request_bytes([b"content-length: 5"]),  # shorter than the body: the rest is garbage
        request_bytes([b"content-length: 5x"]),
        request_bytes([b"content-length: -1"]),
        request_bytes([b"content-length: \xc2\xb2"]),  # a digit to str.isdigit()
        request_bytes([b"transfer-encoding: chunked"], f"{len(CHAT):x}\r\n".encode() + CHAT + b"\r\n0\r\n\r\n"),
        request_bytes([b"transfer-encoding: chunked"], b"zz\r\n"),
        request_bytes([b"content-length: 2", b"content-type: text/plain"], b"{}"),
        request_bytes([b"authorization: Bearer", b"content-length: 2"], b"{}"),
        request_bytes([b"x-api-key: \xff\xfe", b"content-length: 2"], b"{}"),
        request_bytes([b"expect: 100-continue", f"content-length: {len(CHAT)}".encode()]),
    ],
)  # fmt: skip
def test_odd_framing(hostile_gateway: RunningGateway, request_: bytes) -> None:
    status = raw_status(hostile_gateway, request_)
    assert status is None or status < 500, status
