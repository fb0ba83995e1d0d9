"""A Claude Code-shaped exchange through the gateway, run on the README's config snippet and
environment variables ("Claude Code, Codex and other agents"): Claude Code's headers (its
betas, x-app, its user agent), a count_tokens call, a streaming turn with tools that ends in
tool_use, then the tool_result turn. Against an Anthropic deployment (native) and through
the snippet's fallback to an OpenAI one (translated); the spans, the access lines and the
spend are checked, and the gateway key never goes upstream. Then Codex: the openai SDK on
OPENAI_BASE_URL / OPENAI_API_KEY, a Responses API stream with a function call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml
from opentelemetry.trace import SpanKind

from tests.fake_anthropic import (
    FakeAnthropic,
    error_reply,
    message_stream,
    text_block,
    tokens,
    tool_block,
)
from tests.fake_upstream import FakeUpstream, Stream, chat_chunk, chat_stream, usage_json
from tests.gateway_harness import KEYS, UPSTREAM_KEY, RunningGateway, base_config
from tests.gateway_harness import running_gateway as run_gateway
from tests.servers import wait_until

README = Path(__file__).parent.parent / "README.md"
RESPONSES = Path(__file__).parent / "data" / "responses"
# the model ids Claude Code asks for, routed by the README's config: one to an Anthropic
# deployment, one that falls back (here: always) to an OpenAI one
MODELS = {"native": "claude-haiku-4-5-20251001", "translated": "claude-sonnet-4-5-20250929"}
BETAS = ["claude-code-20250219", "interleaved-thinking-2025-05-14",
         "fine-grained-tool-streaming-2025-05-14"]  # fmt: skip
CLI_HEADERS = {
    "x-app": "cli",
    "user-agent": "claude-cli/2.0.14 (external, cli)",
    "anthropic-dangerous-direct-browser-access": "true",
}
SYSTEM = [
    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
     "cache_control": {"type": "ephemeral"}},
    {"type": "text", "text": "Use the tools available to you to assist the user."},
]  # fmt: skip
TOOLS = [
    {"name": "Bash", "description": "Executes a given bash command.",
     "input_schema": {"type": "object", "properties": {
         "command": {"type": "string", "description": "The command to execute"},
         "description": {"type": "string", "description": "What this command does"}},
         "required": ["command"]}},
    {"name": "Read", "description": "Reads a file from the local filesystem.",
     "input_schema": {"type": "object", "properties": {
         "file_path": {"type": "string", "description": "The absolute path to the file"}},
         "required": ["file_path"]}},
]  # fmt: skip
ASK = {"role": "user", "content": [
    {"type": "text", "text": "Which files are in this directory?",
     "cache_control": {"type": "ephemeral"}}]}  # fmt: skip
LS = {"command": "ls", "description": "List files in the current directory"}
ANSWER = "There are two files: README.md and main.py."
M = Decimal(10**6)


@pytest.fixture(scope="module")
def _anthropic_server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture(params=["native", "translated"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def claude(_anthropic_server: FakeAnthropic) -> FakeAnthropic:
    _anthropic_server.reset()
    return _anthropic_server


def readme_config(claude_url: str, openai_url: str, db: Path) -> dict[str, Any]:
    """The README's agents config, as written, pointed at the fakes: the providers' base
    URLs and keys, the team key (its ${VAR}s), and the harness's store and telemetry."""
    section = README.read_text().split("## Claude Code, Codex and other agents", 1)[1]
    snippet = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config: dict[str, Any] = yaml.safe_load(snippet)
    providers = config["providers"]
    providers["anthropic"].update(base_url=claude_url, api_key=UPSTREAM_KEY, timeout_s=5)
    providers["openai"].update(base_url=openai_url, api_key=UPSTREAM_KEY, timeout_s=5)
    config["teams"]["platform"]["keys"][0]["key"] = KEYS["alpha"]
    harness = base_config(openai_url, db)
    config["teams"]["ops"] = harness["teams"]["ops"]  # for /admin/spend
    for name in ("store", "telemetry", "pricing"):
        config[name] = harness[name]
    config["routing"] = {"retries": 0}  # one 529, then the fallback
    return config


@pytest.fixture
def gateway(
    claude: FakeAnthropic, fake_upstream: FakeUpstream, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[RunningGateway]:  # fmt: skip
    with run_gateway(readme_config(claude.url, fake_upstream.base_url, tmp_path / "t.db")) as gw:
        # what the README has a Claude Code (and a Codex) user export
        monkeypatch.setenv("ANTHROPIC_BASE_URL", gw.url)
        monkeypatch.setenv("ANTHROPIC_AUTH_TOKEN", KEYS["alpha"])
        monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
        monkeypatch.setenv("OPENAI_BASE_URL", gw.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEYS["alpha"])
        yield gw


def script(backend: str, claude: FakeAnthropic, upstream: FakeUpstream) -> None:
    """Turn 1 ends in a Bash tool call; turn 2 answers from its result. Translated: the
    Anthropic deployment is overloaded each turn, and the fallback answers."""
    if backend == "native":
        claude.enqueue_for(
            "/v1/messages",
            message_stream(
                [text_block("I'll list the files."), tool_block("toolu_01A", "Bash", LS)],
                stop_reason="tool_use", output_tokens=40,
                start_usage=tokens(3, 0, cache_read=1800, cache_write=200),
            ),
            message_stream(ANSWER, start_usage=tokens(30, 0, cache_read=2000), output_tokens=12),
        )  # fmt: skip
        return
    call = {"index": 0, "id": "call_01A", "type": "function",
            "function": {"name": "Bash", "arguments": ""}}  # fmt: skip
    arguments = json.dumps(LS)
    pieces = [arguments[:10], arguments[10:30], arguments[30:]]
    chunks = [
        chat_chunk("", role="assistant"),
        chat_chunk("I'll list the files."),
        chat_chunk(tool_calls=[call]),
        *[chat_chunk(tool_calls=[{"index": 0, "function": {"arguments": p}}]) for p in pieces],
        chat_chunk(finish_reason="tool_calls"),
    ]
    cached = {**usage_json(2003, 40), "prompt_tokens_details": {"cached_tokens": 1800}}
    upstream.enqueue(Stream(chunks, usage=cached), chat_stream(ANSWER, usage=usage_json(2030, 12)))
    overloaded = error_reply(529, "overloaded_error", "Overloaded")
    claude.enqueue_for("/v1/messages", overloaded, overloaded)


def turn(c: anthropic.Anthropic, model: str, messages: list[dict[str, Any]]) -> Any:
    with c.beta.messages.stream(
        model=model, max_tokens=32000, system=SYSTEM, tools=TOOLS, messages=messages,  # type: ignore[arg-type]
        betas=BETAS, metadata={"user_id": "user_3f2a_account__session_9c1e"},
        extra_body={"temperature": 1},
    ) as stream:  # fmt: skip
        return stream.get_final_message()


def spans(gw: RunningGateway, kind: SpanKind, n: int) -> list[Any]:
    def finished() -> list[Any]:
        return [s for s in gw.spans.get_finished_spans() if s.kind == kind]

    wait_until(lambda: len(finished()) >= n, within=5, what=f"{n} {kind} spans")
    return finished()


@pytest.mark.filterwarnings("ignore:The model 'claude-sonnet-4-5:DeprecationWarning")
def test_a_claude_code_session_through_the_gateway(
    gateway: RunningGateway, backend: str, claude: FakeAnthropic, fake_upstream: FakeUpstream
) -> None:
    script(backend, claude, fake_upstream)
    model = MODELS[backend]
    c = anthropic.Anthropic(default_headers=CLI_HEADERS, max_retries=0)  # from the environment

    counted = c.beta.messages.with_raw_response.count_tokens(
        model=model, system=SYSTEM, tools=TOOLS, messages=[ASK], betas=BETAS  # type: ignore[arg-type,list-item]
    )  # fmt: skip
    assert counted.parse().input_tokens > 0  # Anthropic's count: both models route there
    assert "x-tallygate-tokens-estimated" not in counted.headers

    first = turn(c, model, [ASK])
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    call = first.content[1]
    assert call.name == "Bash" and call.input == LS

    result = {"type": "tool_result", "tool_use_id": call.id,
              "content": "README.md\nmain.py"}  # fmt: skip
    history = [ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                                      for b in first.content]},
               {"role": "user", "content": [result]}]  # fmt: skip
    second = turn(c, model, history)
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == ANSWER  # type: ignore[union-attr]

    if backend == "native":
        check_native_upstream(claude, history)
    else:
        check_translated_upstream(claude, fake_upstream, call.id)
    check_telemetry(gateway, backend, [first, second])


def check_native_upstream(claude: FakeAnthropic, history: list[dict[str, Any]]) -> None:
    sent = claude.requests
    assert [r.path for r in sent] == ["/v1/messages/count_tokens", "/v1/messages", "/v1/messages"]
    check_anthropic_headers(claude)
    assert sent[0].json["model"] == "claude-haiku-4-5-20251001" and sent[0].json["tools"] == TOOLS
    # the tool_result turn: the client's body as it was (the alias is the upstream model)
    assert sent[2].json == {
        "max_tokens": 32000, "messages": history, "model": "claude-haiku-4-5-20251001",
        "system": SYSTEM, "tools": TOOLS, "metadata": {"user_id": "user_3f2a_account__session_9c1e"},
        "temperature": 1, "stream": True,
    }  # fmt: skip


def check_anthropic_headers(claude: FakeAnthropic) -> None:
    for r in claude.requests:
        assert set(BETAS) <= set(r.headers["anthropic-beta"].split(","))  # as the client sent
        assert r.headers["x-api-key"] == UPSTREAM_KEY and "authorization" not in r.headers
        assert not any(KEYS["alpha"] in value for value in r.headers.values())
        assert "x-app" not in r.headers  # only anthropic-version and anthropic-beta go on


def check_translated_upstream(claude: FakeAnthropic, upstream: FakeUpstream, call_id: str) -> None:
    assert [r.path for r in claude.requests] == [
        "/v1/messages/count_tokens", "/v1/messages", "/v1/messages"]  # fmt: skip
    check_anthropic_headers(claude)
    first, second = (r.json for r in upstream.requests)
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions"] * 2
    # gpt-5 reasons out of sight: it takes the cap as max_completion_tokens
    assert first["model"] == "gpt-5" and first["max_completion_tokens"] == 32000
    assert "max_tokens" not in first
    assert first["messages"][0]["role"] == "system"
    assert [t["function"]["name"] for t in first["tools"]] == ["Bash", "Read"]
    assert first["user"] == "user_3f2a_account__session_9c1e"
    assert second["messages"][-2]["tool_calls"][0]["id"] == call_id
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": call_id,
                                      "content": "README.md\nmain.py"}  # fmt: skip
    for r in upstream.requests:
        assert "anthropic-beta" not in r.headers and "x-api-key" not in r.headers
        assert r.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def check_telemetry(gw: RunningGateway, backend: str, turns: list[Any]) -> None:
    servers = spans(gw, SpanKind.SERVER, 3)
    chats = [s for s in spans(gw, SpanKind.CLIENT, 2) if s.name.startswith("chat ")]
    if backend == "translated":  # each turn: the overloaded Anthropic attempt, the fallback
        assert [s.attributes.get("error.type") for s in chats] == ["529", None, "529", None]
        chats = chats[1::2]
    assert [s.attributes["url.path"] for s in servers] == [
        "/v1/messages/count_tokens", "/v1/messages", "/v1/messages"]  # fmt: skip
    assert all("claude-cli/2.0.14" in s.attributes["user_agent.original"] for s in servers)
    assert [tuple(s.attributes["gen_ai.response.finish_reasons"]) for s in chats] == [
        ("tool_calls",), ("stop",)]  # fmt: skip
    provider = "anthropic" if backend == "native" else "openai"
    assert {s.attributes["gen_ai.provider.name"] for s in chats} == {provider}
    assert all(s.attributes["gen_ai.request.stream"] is True for s in chats)
    tools = json.loads(chats[0].attributes["gen_ai.tool.definitions"])
    assert [t["name"] for t in tools] == ["Bash", "Read"]
    wait_until(lambda: len(gw.access_lines()) == 3, within=5, what="three access lines")
    count, *messages = gw.access_lines()
    assert count["path"] == "/v1/messages/count_tokens" and count["cost_usd"] is None
    assert [line["status"] for line in gw.access_lines()] == [200, 200, 200]
    prices = (  # $ per M: input, output, cache read, cache write (haiku 4.5; gpt-5)
        (Decimal(1), Decimal(5), Decimal("0.10"), Decimal("1.25"))
        if backend == "native"
        else (Decimal("1.25"), Decimal(10), Decimal("0.125"), Decimal(0))
    )
    costs = [cost(prices, t.usage) for t in turns]
    assert [Decimal(str(line["cost_usd"])) for line in messages] == costs
    assert [line["tokens_estimated"] for line in messages] == [False, False]
    assert turns[0].usage.cache_read_input_tokens == 1800
    admin = {"authorization": f"Bearer {KEYS['admin']}"}
    rows = httpx.get(gw.url + "/admin/spend", headers=admin, timeout=10).json()["data"]
    [row] = [r for r in rows if r["team"] == "platform" and r["key"] is None]
    assert Decimal(row["spent_usd"]) == sum(costs) and Decimal(row["reserved_usd"]) == 0


def cost(prices: tuple[Decimal, ...], usage: Any) -> Decimal:
    inp, out, read, write = prices
    reads = usage.cache_read_input_tokens or 0
    writes = usage.cache_creation_input_tokens or 0
    total = usage.input_tokens * inp + reads * read + writes * write + usage.output_tokens * out
    return total / M


def test_codex_on_the_responses_api(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    events = (RESPONSES / "function_call.sse").read_text()
    fake_upstream.enqueue(Stream([e + "\n\n" for e in events.split("\n\n") if e.strip()],
                                 done=False))  # fmt: skip
    shell = {"type": "function", "name": "shell", "description": "Runs a shell command.",
             "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}  # fmt: skip
    with openai.OpenAI(max_retries=0) as c:  # OPENAI_BASE_URL, OPENAI_API_KEY
        stream = c.responses.create(
            model="gpt-5-codex", instructions="You are Codex.", input="List the files.",
            tools=[shell], stream=True,  # type: ignore[list-item]
        )  # fmt: skip
        final = list(stream)[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == ["function_call"]
    sent = fake_upstream.requests[-1]
    assert sent.path == "/v1/responses" and sent.json["model"] == "gpt-5-codex"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    line = gateway.access_lines()[-1]
    assert line["path"] == "/v1/responses" and line["model"] == "gpt-5-codex"
    # its usage (291 in, 256 of them cached; 23 out) at gpt-5-codex's $1.25 / $0.125 / $10 per M
    cost = (35 * Decimal("1.25") + 256 * Decimal("0.125") + 23 * 10) / M
    assert Decimal(str(line["cost_usd"])) == cost
