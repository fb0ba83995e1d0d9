"""gateway.telemetry.semconv: request bodies, attempts, usage and content → attributes."""

from __future__ import annotations

from gateway.telemetry import semconv as gen
from pricing.usage import Usage


def test_chat_request_attributes() -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 100,
        "max_completion_tokens": 50,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "seed": 7,
        "n": 2,
        "stop": "END",
        "response_format": {"type": "json_schema", "json_schema": {}},
        "service_tier": "flex",
    }
    assert gen.request_attributes(body, "chat") == {
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.max_tokens": 50,  # max_completion_tokens wins
        "gen_ai.request.frequency_penalty": 0.5,
        "gen_ai.request.presence_penalty": -0.5,
        "gen_ai.request.seed": 7,
        "gen_ai.request.choice.count": 2,
        "gen_ai.request.stop_sequences": ("END",),
        "gen_ai.output.type": "json",
        "openai.request.service_tier": "flex",
    }


def test_defaults_and_wrong_types_are_left_out() -> None:
    body = {
        "n": 1,  # the default: not recorded
        "temperature": True,  # a bool is not a number here
        "top_p": "0.9",
        "max_tokens": 1.5,
        "stop": ["a", 3],
        "response_format": {"type": "text"},
    }
    assert gen.request_attributes(body, "chat") == {"gen_ai.output.type": "text"}
    assert gen.request_attributes(None, "chat") == {}


def test_anthropic_and_responses_request_attributes() -> None:
    anthropic = {"max_tokens": 1024, "top_k": 5, "stop_sequences": ["\n\nHuman:"]}
    assert gen.request_attributes(anthropic, "chat") == {
        "gen_ai.request.max_tokens": 1024,
        "gen_ai.request.top_k": 5,
        "gen_ai.request.stop_sequences": ("\n\nHuman:",),
    }
    responses = {"max_output_tokens": 300, "text": {"format": {"type": "json_object"}}}
    assert gen.request_attributes(responses, "chat") == {
        "gen_ai.request.max_tokens": 300,
        "gen_ai.output.type": "json",
    }


def test_embeddings_request_attributes() -> None:
    body = {"input": ["a", "b"], "encoding_format": "base64", "dimensions": 256}
    assert gen.request_attributes(body, "embeddings") == {
        "gen_ai.request.encoding_formats": ("base64",),
        "gen_ai.embeddings.dimension.count": 256,
    }
    # the same keys mean nothing for chat
    assert gen.request_attributes(body, "chat") == {}


def test_provider_names() -> None:
    assert gen.provider_name("openai") == "openai"
    assert gen.provider_name("azure") == "azure.ai.openai"
    assert gen.provider_name("anthropic") == "anthropic"
    assert gen.provider_name("mock") == "tallygate.mock"
    assert gen.provider_name("vllm") == "vllm"  # a custom flavour passes through


def test_attempt_attributes() -> None:
    attrs = gen.attempt_attributes(
        operation="chat",
        upstream_model="claude-sonnet-4-5",
        provider_kind="anthropic",
        server_address="api.anthropic.com",
        server_port=443,
        number=2,
        deployment="smart#0:anthropic",
        stream=True,
    )
    assert attrs == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-sonnet-4-5",
        "server.address": "api.anthropic.com",
        "server.port": 443,
        "tallygate.attempt": 2,
        "tallygate.deployment": "smart#0:anthropic",
        "gen_ai.request.stream": True,
    }
    local = gen.attempt_attributes(
        operation="embeddings",
        upstream_model="m",
        provider_kind="mock",
        server_address=None,
        server_port=None,
        number=1,
        deployment="d",
        stream=False,
    )
    assert "server.address" not in local and "server.port" not in local
    assert "gen_ai.request.stream" not in local  # only true is recorded


def test_usage_and_response_attributes() -> None:
    plain = Usage(input_tokens=10, output_tokens=5)
    assert gen.usage_attributes(plain) == {
        "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 5,
    }
    full = Usage(
        input_tokens=1000,
        output_tokens=300,
        cache_read_input_tokens=800,
        cache_creation_input_tokens=100,
        reasoning_output_tokens=200,
    )
    assert gen.response_attributes(
        response_id="chatcmpl-1",
        response_model="gpt-4o-mini-2024-07-18",
        finish_reasons=["stop", "length"],
        usage=full,
        time_to_first_chunk_s=0.25,
        service_tier="default",
        system_fingerprint="fp_1",
    ) == {
        "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.response.finish_reasons": ("stop", "length"),
        "gen_ai.usage.input_tokens": 1000,
        "gen_ai.usage.output_tokens": 300,
        "gen_ai.usage.cache_read.input_tokens": 800,
        "gen_ai.usage.cache_creation.input_tokens": 100,
        "gen_ai.usage.reasoning.output_tokens": 200,
        "gen_ai.response.time_to_first_chunk": 0.25,
        "openai.response.service_tier": "default",
        "openai.response.system_fingerprint": "fp_1",
    }
    assert gen.response_attributes(response_id=None, response_model=None) == {}


def test_error_and_server_attributes() -> None:
    assert gen.error_attributes("timeout") == {"error.type": "timeout"}
    assert gen.error_attributes(None, 503) == {"error.type": "503"}
    assert gen.error_attributes(None, 200) == {}
    assert gen.server_request_attributes(
        method="POST", path="/v1/chat/completions", request_id="r1", user_agent="OpenAI/Python"
    ) == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "tallygate.request_id": "r1",
        "user_agent.original": "OpenAI/Python",
    }


def test_model_buckets_keep_metric_series_bounded() -> None:
    buckets = gen.ModelBuckets({"gpt-4o-mini", "smart"}, limit=3)
    assert buckets("gpt-4o-mini") == "gpt-4o-mini"
    assert buckets("smart") == "smart"
    assert buckets("gpt-4o-mini-2024-07-18") == "gpt-4o-mini-2024-07-18"  # a dated snapshot
    assert buckets("some-user-typo") == "_OTHER"
    assert buckets("gpt-4o-minimal") == "_OTHER"  # a prefix, not a snapshot
    assert buckets(None) == ""
    buckets("x1")  # the memo is full now
    assert buckets("gpt-4o-mini-2025-01-01") == "_OTHER"


def test_chat_input_content() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
    }
    system, messages = gen.input_content(body)
    assert system is None  # system messages in the history stay in the history
    assert messages == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Weather?"}]},
        {
            "role": "assistant",
            "parts": [
                {
                    "type": "tool_call",
                    "id": "call_1",
                    "name": "weather",
                    "arguments": '{"city":"Paris"}',
                }
            ],
        },
        {
            "role": "tool",
            "parts": [{"type": "tool_call_response", "id": "call_1", "response": "sunny"}],
        },
    ]


def test_anthropic_responses_and_completions_input_content() -> None:
    system, messages = gen.input_content(
        {
            "system": "You are terse.",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}],
                },
            ],
        }
    )
    assert system == [{"type": "text", "content": "You are terse."}]
    assert messages is not None
    assert messages[1]["parts"] == [
        {"type": "tool_call", "id": "t1", "name": "f", "arguments": {"a": 1}}
    ]
    assert messages[2]["parts"] == [{"type": "tool_call_response", "id": "t1", "response": "ok"}]

    system, messages = gen.input_content({"instructions": "Rhyme.", "input": "A poem"})
    assert system == [{"type": "text", "content": "Rhyme."}]
    assert messages == [{"role": "user", "parts": [{"type": "text", "content": "A poem"}]}]

    _, messages = gen.input_content({"prompt": ["one", "two"]})
    assert messages == [
        {"role": "user", "parts": [{"type": "text", "content": "one"}]},
        {"role": "user", "parts": [{"type": "text", "content": "two"}]},
    ]


def test_images_are_referenced_not_inlined() -> None:
    _, messages = gen.input_content(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ]
        }
    )
    assert messages is not None
    uri, blob = messages[0]["parts"]
    assert uri == {
        "type": "uri",
        "modality": "image",
        "mime_type": None,
        "uri": "https://x.test/a.png",
    }
    assert blob["type"] == "blob" and blob["content"] == ""


def test_output_content_and_tool_definitions() -> None:
    out = gen.output_content(
        ["Hel", "lo"],
        [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}],
        ["tool_calls"],
    )
    assert out == [
        {
            "role": "assistant",
            "parts": [
                {"type": "text", "content": "Hello"},
                {"type": "tool_call", "id": "c1", "name": "f", "arguments": "{}"},
            ],
            "finish_reason": "tool_calls",
        }
    ]
    tools = gen.tool_definitions(
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "description": "d", "parameters": {}},
                },
                {"name": "g", "input_schema": {"type": "object"}},  # anthropic
            ]
        }
    )
    assert tools == [
        {"type": "function", "name": "f", "description": "d", "parameters": {}},
        {"type": "function", "name": "g", "description": None, "parameters": {"type": "object"}},
    ]


def test_content_attributes() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    attrs = gen.content_attributes(body, "chat", ["yo"], [], ["stop"], has_output=True)
    assert set(attrs) == {"gen_ai.input.messages", "gen_ai.output.messages"}
    failed = gen.content_attributes(body, "chat", [], [], [], has_output=False)
    assert set(failed) == {"gen_ai.input.messages"}
    assert gen.content_attributes({"input": "x"}, "embeddings", [], [], [], has_output=False) == {}
