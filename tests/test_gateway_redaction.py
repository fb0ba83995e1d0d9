"""The choke point: with PII in prompts, replies, tool calls and upstream errors, none of it
reaches any output of the gateway process: OTLP spans, metrics and logs, stdout, stderr, /metrics."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import yaml

from tests.fake_upstream import FakeUpstream, Reply, Stream, chat_chunk
from tests.gateway_harness import KEYS, base_config, serve_command
from tests.otlp_receiver import OTLPReceiver
from tests.servers import free_port, run_process_server

SECRETS = {
    "email": "maria.lopez@example.org",
    "card": "4111 1111 1111 1111",
    "ssn": "123-45-6789",
    "phone": "+44 20 7946 0958",
    "openai_key": "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ip": "203.0.113.77",
}
PROMPT = (
    f"Customer {SECRETS['email']} paid with {SECRETS['card']}, SSN {SECRETS['ssn']}, phone "
    f"{SECRETS['phone']}, key {SECRETS['openai_key']} and {SECRETS['aws']}, IBAN {SECRETS['iban']}, "
    f"from {SECRETS['ip']}."
)


def leaks(text: str) -> list[str]:
    return [name for name, value in SECRETS.items() if value in text]


def test_no_pii_reaches_any_output(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    port = free_port()
    with OTLPReceiver() as rx:
        cfg = base_config(fake_upstream.base_url, tmp_path / "t.db")
        cfg["telemetry"] = {
            "exporter": "otlp",
            "endpoint": rx.endpoint,
            "capture_content": "redacted",
            "export_logs": True,
            "prometheus": True,
            "log_format": "json",
        }
        path = tmp_path / "cfg.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cmd = serve_command(path, port)
        with run_process_server(cmd, port, cwd=tmp_path) as server:
            messages = [
                {"role": "system", "content": f"Escalate to {SECRETS['email']}"},
                {"role": "user", "content": PROMPT},
            ]
            with openai.OpenAI(
                base_url=server.url + "/v1", api_key=KEYS["alpha"], max_retries=0
            ) as c:
                # non-stream: the fake echoes the prompt, so the reply is full of PII too
                reply = c.chat.completions.create(model="gpt-4o-mini", messages=messages)
                assert SECRETS["card"] in reply.choices[0].message.content  # the client gets it all
                # stream, echoing
                text = "".join(
                    ch.choices[0].delta.content or ""
                    for ch in c.chat.completions.create(
                        model="gpt-4o-mini", messages=messages, stream=True
                    )
                    if ch.choices
                )
                assert SECRETS["email"] in text
                # a streamed tool call whose arguments carry PII
                args = json.dumps({"to": SECRETS["email"], "card": SECRETS["card"]})
                fake_upstream.enqueue(
                    Stream(
                        [
                            chat_chunk(
                                None,
                                role="assistant",
                                tool_calls=[
                                    {
                                        "index": 0,
                                        "id": "call_1",
                                        "type": "function",
                                        "function": {"name": "pay", "arguments": ""},
                                    }
                                ],
                            ),
                            chat_chunk(
                                None,
                                tool_calls=[{"index": 0, "function": {"arguments": args[:20]}}],
                            ),
                            chat_chunk(
                                None,
                                tool_calls=[{"index": 0, "function": {"arguments": args[20:]}}],
                            ),
                            chat_chunk(None, finish_reason="tool_calls"),
                        ],
                        usage={"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70},
                    )
                )
                list(
                    c.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=messages,
                        stream=True,
                        tools=[{"type": "function", "function": {"name": "pay", "parameters": {}}}],
                    )
                )
                # a non-stream tool call
                fake_upstream.enqueue(
                    Reply(
                        json={
                            "id": "chatcmpl-t",
                            "object": "chat.completion",
                            "created": 1,
                            "model": "gpt-4o-mini",
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "tool_calls",
                                    "message": {
                                        "role": "assistant",
                                        "content": None,
                                        "tool_calls": [
                                            {
                                                "id": "call_2",
                                                "type": "function",
                                                "function": {"name": "pay", "arguments": args},
                                            }
                                        ],
                                    },
                                }
                            ],
                            "usage": {
                                "prompt_tokens": 50,
                                "completion_tokens": 20,
                                "total_tokens": 70,
                            },
                        }
                    )
                )
                c.chat.completions.create(model="gpt-4o-mini", messages=messages)
                # upstream errors quoting the prompt: a 400 passed through, a 500 retried then 502
                quoted = {
                    "error": {
                        "message": f"Invalid content: {PROMPT}",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": None,
                    }
                }
                fake_upstream.enqueue(Reply(400, json=quoted))
                r = httpx.post(
                    server.url + "/v1/chat/completions",
                    headers={"authorization": f"Bearer {KEYS['alpha']}"},
                    json={"model": "gpt-4o-mini", "messages": messages},
                )
                assert (
                    r.status_code == 400 and SECRETS["ssn"] in r.text
                )  # the caller sees its own upstream error
                fake_upstream.enqueue(Reply(500, json=quoted), Reply(500, json=quoted))
                r = httpx.post(
                    server.url + "/v1/chat/completions",
                    headers={"authorization": f"Bearer {KEYS['alpha']}"},
                    json={"model": "gpt-4o-mini", "messages": messages},
                )
                assert r.status_code == 502 and not leaks(r.text)
                # embeddings of PII
                c.embeddings.create(model="embed", input=[PROMPT])
            metrics_text = httpx.get(server.url + "/metrics").text
        # the process has exited: its exporters flushed on shutdown
        spans = rx.wait_for_spans(10)
        logs = rx.wait_for_logs(7)
        exported = repr(spans) + repr(rx.points) + repr(logs)
        captured = [s for s in spans if "gen_ai.input.messages" in s.attributes]
    assert captured, "content capture was on: some span must carry (redacted) messages"
    assert any("[EMAIL]" in str(s.attributes) for s in captured)
    assert any(
        "[CREDIT_CARD]" in str(s.attributes.get("gen_ai.output.messages", "")) for s in captured
    )
    assert leaks(exported) == []
    assert leaks(server.stdout) == [] and leaks(server.stderr) == []
    assert leaks(metrics_text) == []
    # the redactions are counted per detector as a metric
    counted = [
        line for line in metrics_text.splitlines() if line.startswith("tallygate_redactions_total{")
    ]
    assert any(
        'redaction_type="credit_card"' in line and not line.endswith(" 0.0") for line in counted
    ), counted
    lines = [json.loads(line) for line in server.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 7
    # the upstream's 400 quoted the prompt: its message is logged, but redacted
    passed = next(line for line in lines if line["status"] == 400)
    assert "[SSN]" in passed["error_message"] and "Invalid content" in passed["error_message"]


def test_upstream_redaction_masks_the_prompt_sent_to_the_provider(
    gateway_config: dict, fake_upstream: FakeUpstream
) -> None:
    from tests.gateway_harness import merge, running_gateway

    cfg = merge(gateway_config, {"redaction": {"upstream": True}})
    long_tail = " filler" * 6000  # past redaction.max_chars: the upstream copy must not be cut
    with running_gateway(cfg) as gw:
        r = httpx.post(
            gw.base_url + "/chat/completions",
            headers={"authorization": f"Bearer {KEYS['alpha']}"},
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": PROMPT + long_tail}],
            },
        )
    assert r.status_code == 200
    sent = fake_upstream.requests[-1].json["messages"][0]["content"]
    assert leaks(sent) == []
    assert "[EMAIL]" in sent and "[CREDIT_CARD]" in sent
    assert sent.endswith(long_tail) and "truncated" not in sent


def test_by_default_the_provider_gets_the_prompt_unchanged(
    gateway: object, fake_upstream: FakeUpstream
) -> None:
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {KEYS['alpha']}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]},
    )
    assert r.status_code == 200
    assert fake_upstream.requests[-1].json["messages"][0]["content"] == PROMPT
