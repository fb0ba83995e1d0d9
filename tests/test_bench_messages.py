"""bench.messages' pieces, without its load: the mock's /v1/messages answer read by the real
anthropic SDK (and its chat answer, unchanged, by the openai SDK), the bench config as the
gateway loads it, the wrk script against the mock, and the messages/chat ratios of the
report. No timing is asserted (timing is bench.messages' own job)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from bench import messages
from bench import run as bench
from gateway.cli import check_prices
from gateway.config import load_config
from tests.servers import ProcessServer, free_port, run_process_server

REPLY = "Hello! How can I help you today?"


@pytest.fixture(scope="module")
def mock() -> Iterator[ProcessServer]:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.mock_upstream", "--port", str(port)]
    ready = f"http://127.0.0.1:{port}/v1/models"
    with run_process_server(cmd, port, ready_url=ready, cwd=bench.REPO) as server:
        yield server


def test_the_mocks_message_is_one_the_anthropic_sdk_parses(mock: ProcessServer) -> None:
    client = anthropic.Anthropic(base_url=mock.url, api_key="bench", max_retries=0)
    body = messages.MESSAGE_REQUEST
    message = client.messages.create(
        model=body["model"],
        max_tokens=body["max_tokens"],
        system=body["system"],
        messages=body["messages"],
    )
    assert isinstance(message, anthropic.types.Message)
    assert message.role == "assistant" and message.stop_reason == "end_turn"
    assert [block.text for block in message.content if block.type == "text"] == [REPLY]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 9)


def test_the_mocks_chat_answer_is_the_same_reply_and_usage(mock: ProcessServer) -> None:
    client = openai.OpenAI(base_url=mock.url + "/v1", api_key="bench", max_retries=0)
    completion = client.chat.completions.create(
        model=bench.MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == REPLY
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (12, 9)


def test_the_mock_refuses_a_message_stream_in_anthropics_shape(mock: ProcessServer) -> None:
    client = anthropic.Anthropic(base_url=mock.url, api_key="bench", max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="does not stream"):
        client.messages.create(
            model="bench-claude", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
            stream=True,
        )  # fmt: skip


def test_the_bench_config_loads_and_routes_both_apis() -> None:
    config = load_config(messages.CONFIG, env={"BENCH_UPSTREAM_PORT": "9001"})
    kinds = {
        alias: config.providers[deps[0].provider].kind for alias, deps in config.models.items()
    }
    assert kinds == {messages.CHAT_MODEL: "openai", messages.CLAUDE_MODEL: "anthropic"}
    team = config.teams["bench"]
    assert team.models == [messages.CHAT_MODEL, messages.CLAUDE_MODEL]
    assert [k.key for k in team.keys] == [bench.KEY]
    ops = config.teams["ops"]
    assert ops.admin and [k.key for k in ops.keys] == [messages.ADMIN_KEY]
    # every feature on, as in bench/config.bench.yaml
    assert config.telemetry.capture_content == "redacted" and config.redaction.detectors
    assert check_prices(config) == 0  # on_unknown_price is reject: each deployment is priced


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_the_wrk_script_posts_messages_the_mock_answers(mock: ProcessServer) -> None:
    before = bench.LUA, bench.MODEL
    res = messages.wrk(mock.url + "/v1/messages", "messages", 1, 1, count_status=True)
    assert res["requests"] > 0 and res["status"] == {"200": res["requests"]}
    assert res["bytes"] > res["requests"] * len(messages.MESSAGE_BODY)
    assert (bench.LUA, bench.MODEL) == before  # bench.run's own script and model are back


def run(r: int, shape: str, target: str, c: int, p50_ms: float, cpu: float) -> dict[str, Any]:
    return {
        "round": r, "mode": "plain", "shape": shape, "target": target, "concurrency": c,
        "rps": 1000.0, "p50_us": 1000 * p50_ms, "p99_us": 2000 * p50_ms,
        "cpu_ms_per_req": cpu, "errors": 0,
    }  # fmt: skip


def test_the_ratios_are_messages_over_chat_for_the_gateway() -> None:
    runs = []
    for r, (chat_cpu, msg_cpu) in enumerate([(1.0, 1.05), (1.0, 1.30)]):
        for c in messages.CONCURRENCY:
            runs += [
                run(r, "chat", "direct", c, 0.02, 0.01),
                run(r, "chat", "gateway", c, 1.02, chat_cpu),
                run(r, "messages", "direct", c, 0.03, 0.01),
                run(r, "messages", "gateway", c, 1.13, msg_cpu),
            ]
    s = messages.summarize(runs)
    assert s["shapes"]["messages"]["gateway"][1]["added_p50_ms"] == pytest.approx(1.1)
    ratios = s["ratios"][16]
    assert ratios["added_p50"] == pytest.approx(1.1)  # +1.10 ms over +1.00 ms
    assert ratios["cpu_per_req_rounds"] == pytest.approx([1.05, 1.30])
    assert ratios["cpu_per_req"] == pytest.approx(1.175)
    assert ratios["within_10pct"] is False  # CPU 1.175 > 1.10
