"""Properties of the parsers (hypothesis): the request body parser, the SSE decoder and the
config loader never let an exception escape except the documented ones, and their results
do not depend on how their input was cut."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from gateway.config import Config, ConfigError, load_config, parse_config
from gateway.errors import InvalidRequest
from gateway.pipeline.context import RequestContext
from gateway.pipeline.handle import REQUIRED_FIELD, ClientLeft, parse
from gateway.pipeline.sse import BOM, SSEDecoder, event_data, is_sse, lf_line_ends
from gateway.state import Gateway

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)
)
JSON: Any = st.recursive(
    SCALAR,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """`data` cut at any points (empty pieces included)."""
    cuts = st.lists(st.integers(min_value=0, max_value=len(data)), max_size=8).map(sorted)
    return cuts.map(lambda c: [data[a:b] for a, b in zip([0, *c], [*c, len(data)], strict=True)])


# --- the body parser ---------------------------------------------------------------------

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def parser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asyncio.Runner, Gateway]]:
    """A real Gateway (mock provider, local store) on a loop of its own, for parse()."""
    config = parse_config(
        {
            "server": {"max_body_mb": 0.001, "max_json_depth": 8},  # ~1 KB: the limit is reachable
            "providers": {"p": {"kind": "mock"}},
            "models": {"m": [{"provider": "p", "model": "gpt-4o-mini"}]},
            "teams": {"t": {"keys": [{"name": "k", "key": "sk-1"}]}},
            "store": {"backend": "local", "path": str(tmp_path_factory.mktemp("parse") / "t.db")},
            "telemetry": {"exporter": "none"},
        },
        env={},
    )
    with asyncio.Runner() as runner:
        gw = runner.run(Gateway.start(config))
        yield runner, gw
        runner.run(gw.close())


def run_parse(
    runner: asyncio.Runner, gw: Gateway, operation: str, pieces: list[bytes], *,
    declared: int | None = None, leave: bool = False,
) -> RequestContext | BaseException:  # fmt: skip
    """parse() on a real starlette Request whose body arrives in `pieces` (then, with
    `leave`, an http.disconnect before the end): the context, or what it raised."""
    messages = [
        {"type": "http.request", "body": p, "more_body": leave or i < len(pieces) - 1}
        for i, p in enumerate(pieces or [b""])
    ]
    messages.append({"type": "http.disconnect"})

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/x", "headers": headers}
    ctx = RequestContext("req", "POST", "/v1/x", operation)
    try:
        runner.run(parse(gw, ctx, Request(scope, receive)))  # type: ignore[arg-type]
    except (InvalidRequest, ClientLeft) as exc:  # InvalidRequest includes RequestTooLarge
        return exc
    return ctx


BODY = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": JSON},
        optional={"messages": JSON, "prompt": JSON, "input": JSON, "stream": JSON},
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"model": st.text(min_size=1, max_size=10),
         "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": JSON}),
                              min_size=1, max_size=3),
         "prompt": JSON, "input": JSON},
        optional={"stream": st.booleans()},
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from([b"", b"[" * 50 + b"]" * 50, b'{"model": "m", "x": ' + b"[" * 20 + b"]" * 20 + b"}",
                     b"1e400", b"NaN", b'{"a": "\\ud800"}', b"\xef\xbb\xbf{}"]),
)  # fmt: skip


@SETTINGS
@given(operation=st.sampled_from(sorted(REQUIRED_FIELD)), body=BODY, data=st.data())
def test_the_body_parser_only_raises_invalid_request(parser, operation, body, data) -> None:
    runner, gw = parser
    whole = run_parse(runner, gw, operation, [body])
    pieces = data.draw(splits(body))
    cut = run_parse(runner, gw, operation, pieces)
    # the same outcome however the body arrived
    assert type(whole) is type(cut)
    if isinstance(whole, RequestContext):
        assert isinstance(cut, RequestContext) and cut.body == whole.body
        assert (
            isinstance(whole.body, dict) and whole.body.get(REQUIRED_FIELD[operation]) is not None
        )
        assert isinstance(whole.requested_model, str) and whole.requested_model
        assert isinstance(whole.stream, bool)
    else:
        assert isinstance(whole, InvalidRequest) and str(whole) == str(cut)
        assert whole.status in (400, 413)


@SETTINGS
@given(body=BODY, extra=st.integers(min_value=0, max_value=3 * MIB))
def test_the_body_parser_refuses_a_declared_length_over_the_limit(parser, body, extra) -> None:
    runner, gw = parser
    declared = gw.max_body_bytes + 1 + extra
    result = run_parse(runner, gw, "chat", [body], declared=declared)
    assert isinstance(result, InvalidRequest) and result.status == 413


@SETTINGS
@given(body=BODY, data=st.data())
def test_a_client_that_leaves_mid_body_is_client_left(parser, body, data) -> None:
    runner, gw = parser
    assume(len(body) <= gw.max_body_bytes)
    result = run_parse(runner, gw, "chat", data.draw(splits(body)), leave=True)
    assert isinstance(result, ClientLeft)


# --- the SSE decoder ---------------------------------------------------------------------

# bytes near SSE: line ends of every kind, field names, colons, [DONE]
SSE_ALPHABET = st.sampled_from(
    [b"\n", b"\r", b"\r\n", b"\n\n", b":", b" ", b"data", b"data: ", b"event: ", b"id: ",
     b"retry: ", b"{}", b'{"a": 1}', b"[DONE]", b"x", b"\xff", b"\x00"]
)  # fmt: skip
STREAM = st.one_of(st.binary(max_size=300), st.lists(SSE_ALPHABET, max_size=40).map(b"".join))


def decode(pieces: list[bytes]) -> tuple[list[tuple[bytes, bytes | None]], bytes]:
    decoder = SSEDecoder()
    events = [event for piece in pieces for event in decoder.feed(piece)]
    return events, decoder.tail()


@settings(max_examples=1000, deadline=None)
@given(stream=STREAM, data=st.data())
def test_any_split_of_any_stream_gives_the_same_events(stream: bytes, data) -> None:
    whole = decode([stream])
    assert decode(data.draw(splits(stream))) == whole
    events, tail = whole
    # nothing lost or invented: the events and the tail are the input, line ends made LF
    # (less one leading BOM, which the SSE spec says to ignore)
    assert b"".join(raw for raw, _ in events) + tail == lf_line_ends(stream.removeprefix(BOM))
    for raw, payload in events:
        assert raw.endswith(b"\n\n") and b"\n\n" not in raw[:-1] and b"\r" not in raw
        assert payload == event_data(raw)
        assert (payload is None) == (not any(x.startswith(b"data:") for x in raw.split(b"\n")))
        is_sse(raw)  # never raises


DATA_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30
)
EVENT = st.one_of(
    st.lists(DATA_TEXT, min_size=1, max_size=3).map(lambda lines: ("data", lines)),
    DATA_TEXT.map(lambda text: ("comment", [text])),
)


@SETTINGS
@given(
    events=st.lists(EVENT, max_size=6), end=st.sampled_from(["\n", "\r\n", "\r"]), data=st.data()
)
def test_well_formed_events_decode_to_their_data(events, end, data) -> None:
    text = ""
    for kind, lines in events:
        if kind == "data":
            text += "".join(f"data: {line}{end}" for line in lines) + end
        else:
            text += f":{lines[0]}{end}{end}"
    stream = text.encode()
    decoded, tail = decode(data.draw(splits(stream)))
    expected = ["\n".join(lines).encode() if kind == "data" else None for kind, lines in events]
    if end == "\r" and events:  # the final CR waits for the next byte: it may start a CRLF
        assert tail.endswith(b"\n\r")
        decoded += SSEDecoder().feed(tail + b"\n")
    else:
        assert tail == b""
    assert [payload for _, payload in decoded] == expected
    assert all(is_sse(raw) for raw, payload in decoded if payload is None)


@given(line=st.binary(max_size=40))
def test_lines_that_are_not_sse_fields_are_told_apart(line: bytes) -> None:
    line = line.replace(b"\n", b"").replace(b"\r", b"")
    field = line.partition(b":")[0]
    expected = not line or line.startswith(b":") or field in (b"data", b"event", b"id", b"retry")
    assert is_sse(line + b"\n\n") is expected


# --- the config loader -------------------------------------------------------------------

SECTIONS = ("server", "providers", "models", "teams", "store", "routing", "pricing",
            "redaction", "telemetry")  # fmt: skip
KEYS = ("kind", "base_url", "api_key", "port", "workers", "max_body_mb", "provider", "model",
        "keys", "name", "key", "sha256", "budget", "limit_usd", "period", "rate_limit", "rpm",
        "models", "backend", "path", "retries", "detectors", "custom", "pattern", "exporter",
        "prometheus", "weight", "timeout_s", "admin", "max_output_tokens", "${X}")  # fmt: skip
YAML_SCALAR = st.one_of(
    SCALAR,
    st.sampled_from(["mock", "openai", "local", "redis", "daily", "${X}", "${X:-1}", "${", "[a",
                     "0x10", "1e999", "-1", "\x00", "(?P<", "EMP-\\d{6}"]),
)  # fmt: skip
TREE: Any = st.recursive(
    YAML_SCALAR,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers()),
                      inner, max_size=4),
    max_leaves=20,
)  # fmt: skip
CONFIG = st.one_of(TREE, st.dictionaries(st.sampled_from(SECTIONS), TREE, max_size=5))


@SETTINGS
@given(data=CONFIG, env=st.dictionaries(st.sampled_from(["X", "Y"]), st.text(max_size=8)))
def test_any_tree_is_a_config_or_a_config_error(data: Any, env: dict[str, str]) -> None:
    try:
        assert isinstance(parse_config(data, source="c.yaml", env=env), Config)
    except ConfigError as exc:
        assert str(exc).startswith("c.yaml")


def yaml_text(tree: Any) -> bytes:
    return yaml.safe_dump(tree, allow_unicode=True).encode()


CONFIG_FILE = st.one_of(
    CONFIG.map(yaml_text),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.sampled_from([b"", b"- a\n- b\n", b"a: [\n", b"!!python/object:os.system x", b"*x",
                     b"[" * 200, b"a: !!binary AAAA", b"\xef\xbb\xbfserver: {}"]),
)  # fmt: skip
# Two inputs that once escaped as other exceptions: a file that is not UTF-8, a self-alias.
NOT_UTF8 = b"server: {host: caf\xe9}\n"
SELF_ALIAS = b"server: &s {host: *s}\n"


@SETTINGS
@given(content=CONFIG_FILE)
def test_any_file_is_a_config_or_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    try:
        assert isinstance(load_config(path, env={}), Config)
    except ConfigError as exc:
        assert str(exc).startswith(str(path))


@pytest.mark.parametrize("content", [NOT_UTF8, SELF_ALIAS], ids=["not-utf8", "self-alias"])
def test_a_file_that_is_not_utf8_or_contains_itself_is_a_config_error(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError):
        load_config(path, env={})
