"""Golden tests of the Anthropic <-> OpenAI translation (gateway/translate), both ways.

The Anthropic streams are the event sequences Anthropic documents ("Streaming Messages":
a basic text stream, a stream with tool use, an error event); translated output is also
read back with the real openai and anthropic SDK types, which must accept it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.pipeline.sse import SSEDecoder
from gateway.providers.anthropic import translate_events
from gateway.translate.anthropic_common import (
    TranslationError,
    anthropic_error_from_openai,
    anthropic_usage,
    openai_error_from_anthropic,
    openai_usage,
    parse_arguments,
)
from gateway.translate.anthropic_ingress import EventTranslator, chat_request, encode, message
from gateway.translate.anthropic_upstream import (
    JSON_TOOL,
    MessagesRequest,
    StreamTranslator,
    chat_completion,
    messages_request,
)
from pricing.cost import cost_nano
from pricing.table import PriceTable
from pricing.usage import Usage, read_openai_usage

# ---- documented Anthropic streams (platform.claude.com, "Streaming Messages") -----------

BASIC_STREAM = """\
event: message_start
data: {"type": "message_start", "message": {"id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [], "model": "claude-opus-4-1-20250805", "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 25, "output_tokens": 1}}}

event: content_block_start
data: {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}}

event: content_block_delta
data: {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}}

event: content_block_stop
data: {"type": "content_block_stop", "index": 0}

event: message_delta
data: {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence":null}, "usage": {"output_tokens": 15}}

event: message_stop
data: {"type": "message_stop"}

"""

TOOL_STREAM = """\
event: message_start
data: {"type":"message_start","message":{"id":"msg_014p7gG3wDgGV9EUtLvnow3U","type":"message","role":"assistant","model":"claude-opus-4-1-20250805","stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2},"content":[],"stop_reason":null}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay"}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":", let's check"}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\\"location\\":"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \\"San Francisco, CA\\""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":", \\"unit\\": \\"fahrenheit\\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"""

ERROR_EVENT = """\
event: error
data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}

"""

CREATED = 1_700_000_000


def chunks_of(raw: str, *, include_usage: bool = False, json_tool: str | None = None) -> list:
    """An Anthropic SSE text through the provider's byte translation → OpenAI chunk dicts
    (and the string "[DONE]")."""
    translator = StreamTranslator(created=CREATED, include_usage=include_usage, json_tool=json_tool)
    out = translate_events(translator, SSEDecoder().feed(raw.encode()))
    events = []
    for event, data in SSEDecoder().feed(out):
        assert event.startswith(b"data: ")
        events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def chunk(delta: dict[str, Any], finish: str | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "id": meta.get("id", "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"),
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": "claude-opus-4-1-20250805",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


# ---- Messages SSE → chat chunks ---------------------------------------------------------


def test_documented_basic_stream_becomes_chat_chunks() -> None:
    assert chunks_of(BASIC_STREAM) == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hello"}),
        chunk({"content": "!"}),
        chunk({}, "stop"),
        "[DONE]",
    ]


def test_stream_usage_chunk_when_asked_from_message_start_and_message_delta() -> None:
    events = chunks_of(BASIC_STREAM, include_usage=True)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"] == []
    assert final["usage"] == {
        "prompt_tokens": 25,  # message_start
        "completion_tokens": 15,  # message_delta (cumulative), not message_start's 1
        "total_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 0},
        "cache_creation_input_tokens": 0,
    }
    for event in events[:-1]:
        ChatCompletionChunk.model_validate(event)  # the openai SDK reads every chunk


def test_documented_tool_stream_becomes_tool_call_deltas() -> None:
    events = chunks_of(TOOL_STREAM)
    meta = {"id": "msg_014p7gG3wDgGV9EUtLvnow3U"}
    call = {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert events[:4] == [
        chunk({"role": "assistant", "content": ""}, **meta),
        chunk({"content": "Okay"}, **meta),
        chunk({"content": ", let's check"}, **meta),
        chunk({"tool_calls": [call]}, **meta),
    ]
    assert events[-2:] == [chunk({}, "tool_calls", **meta), "[DONE]"]
    pieces = [e["choices"][0]["delta"]["tool_calls"][0] for e in events[4:-2]]
    assert all(p["index"] == 0 and set(p) == {"index", "function"} for p in pieces)
    arguments = "".join(p["function"]["arguments"] for p in pieces)
    assert json.loads(arguments) == {"location": "San Francisco, CA", "unit": "fahrenheit"}


def test_documented_error_event_becomes_openai_in_band_error() -> None:
    started = BASIC_STREAM.split("event: content_block_stop")[0]
    events = chunks_of(started + ERROR_EVENT + BASIC_STREAM.split("event: content_block_stop")[1])
    assert events[-1] == {
        "error": {
            "message": "Overloaded",
            "type": "server_error",
            "param": None,
            "code": "overloaded_error",
        }
    }
    assert "[DONE]" not in events  # a broken stream does not claim to be complete
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["Hello", "!"]


def test_stream_is_the_same_however_the_bytes_are_split() -> None:
    whole = chunks_of(TOOL_STREAM, include_usage=True)
    data = TOOL_STREAM.encode()
    for size in (1, 7, 64):
        translator = StreamTranslator(created=CREATED, include_usage=True)
        decoder, out = SSEDecoder(), b""
        for i in range(0, len(data), size):
            out += translate_events(translator, decoder.feed(data[i : i + size]))
        parsed = ["[DONE]" if d == b"[DONE]" else json.loads(d) for _, d in SSEDecoder().feed(out)]
        assert parsed == whole


def test_stream_cache_usage_and_cumulative_message_delta_fields() -> None:
    translator = StreamTranslator(created=CREATED, include_usage=True)
    start = {"id": "m", "model": "claude", "usage": {"input_tokens": 10,
             "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 200,
             "output_tokens": 1}}  # fmt: skip
    translator.feed("message_start", {"type": "message_start", "message": start})
    # newer API versions repeat the input counts in message_delta: they replace, not add
    delta = {"stop_reason": "max_tokens", "stop_sequence": None}
    out = translator.feed(None, {"type": "message_delta", "delta": delta,
                                 "usage": {"input_tokens": 10, "output_tokens": 7}})  # fmt: skip
    assert out[0]["choices"][0]["finish_reason"] == "length"
    final = translator.feed(None, {"type": "message_stop"})[-1]
    assert final["usage"]["prompt_tokens"] == 1210
    assert final["usage"]["prompt_tokens_details"] == {"cached_tokens": 1000}
    assert final["usage"]["cache_creation_input_tokens"] == 200
    assert final["usage"]["completion_tokens"] == 7
    assert translator.done and translator.feed(None, {"type": "ping"}) == []


def test_stream_thinking_and_unknown_events() -> None:
    translator = StreamTranslator(created=CREATED, include_usage=False)
    translator.feed(None, {"type": "message_start", "message": {"id": "m", "model": "c"}})
    block = {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}}
    assert translator.feed(None, block) == []
    delta = {"type": "thinking_delta", "thinking": "Let me think"}
    out = translator.feed(None, {"type": "content_block_delta", "index": 0, "delta": delta})
    assert out[0]["choices"][0]["delta"] == {"reasoning_content": "Let me think"}
    signature = {"type": "signature_delta", "signature": "abc"}
    assert (
        translator.feed(None, {"type": "content_block_delta", "index": 0, "delta": signature}) == []
    )
    assert translator.feed("some_future_event", {"type": "some_future_event"}) == []


def test_stream_json_tool_streams_as_content() -> None:
    translator = StreamTranslator(created=CREATED, include_usage=False, json_tool=JSON_TOOL)
    translator.feed(None, {"type": "message_start", "message": {"id": "m", "model": "c"}})
    start = {"type": "tool_use", "id": "t", "name": JSON_TOOL, "input": {}}
    assert translator.feed(None, {"type": "content_block_start", "index": 0,
                                  "content_block": start}) == []  # fmt: skip
    delta = {"type": "input_json_delta", "partial_json": '{"a": 1}'}
    out = translator.feed(None, {"type": "content_block_delta", "index": 0, "delta": delta})
    assert out[0]["choices"][0]["delta"] == {"content": '{"a": 1}'}
    end = {"type": "message_delta", "delta": {"stop_reason": "tool_use"}}
    assert translator.feed(None, end)[0]["choices"][0]["finish_reason"] == "stop"


def test_non_event_bytes_pass_through_for_the_relay_to_report() -> None:
    translator = StreamTranslator(created=CREATED, include_usage=False)
    html = b"<html>\n<body>Bad gateway</body>\n\n"
    assert translate_events(translator, SSEDecoder().feed(html)) == html
    not_json = b"event: message_start\ndata: {oops\n\n"
    assert translate_events(translator, SSEDecoder().feed(not_json)) == not_json


# ---- chat request → Messages request ----------------------------------------------------


def translate(body: dict[str, Any], default: int = 4096) -> MessagesRequest:
    return messages_request({"model": "claude", **body}, default)


def test_system_and_developer_messages_become_system() -> None:
    body = translate({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]}).body  # fmt: skip
    assert body["system"] == "Be brief."
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    body = translate({"messages": [
        {"role": "system", "content": "One."},
        {"role": "developer", "content": [{"type": "text", "text": "Two.",
                                           "cache_control": {"type": "ephemeral"}}]},
        {"role": "user", "content": "hi"},
    ]}).body  # fmt: skip
    assert body["system"] == [
        {"type": "text", "text": "One."},
        {"type": "text", "text": "Two.", "cache_control": {"type": "ephemeral"}},
    ]


def test_images_data_urls_and_http_urls() -> None:
    content = [
        {"type": "text", "text": "What are these?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
    ]
    body = translate({"messages": [{"role": "user", "content": content}]}).body
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What are these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
    ]  # fmt: skip
    with pytest.raises(TranslationError) as exc:
        translate({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}}]}]})  # fmt: skip
    assert exc.value.param == "messages[0].content[0]"


def test_pdf_file_part_becomes_a_document() -> None:
    part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
    }
    body = translate({"messages": [{"role": "user", "content": [part]}]}).body
    assert body["messages"][0]["content"] == [{
        "type": "document", "title": "a.pdf",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
    }]  # fmt: skip


def test_tool_calls_and_tool_results_round_trip_into_alternating_turns() -> None:
    body = translate({"messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": ""}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "21C"}]},
        {"role": "user", "content": "Thanks"},
    ]}).body  # fmt: skip
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "weather", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "call_2",
             "content": [{"type": "text", "text": "21C"}]},
            {"type": "text", "text": "Thanks"},
        ]},
    ]  # fmt: skip


def test_same_role_turns_merge_and_tool_results_come_first() -> None:
    body = translate({"messages": [
        {"role": "user", "content": "one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "interjection"},
        {"role": "tool", "tool_call_id": "c", "content": "done"},
    ]}).body  # fmt: skip
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert [b["type"] for b in body["messages"][0]["content"]] == ["text", "text"]
    assert [b["type"] for b in body["messages"][2]["content"]] == ["tool_result", "text"]


def test_tool_arguments_that_are_not_an_object_are_kept_raw() -> None:
    assert parse_arguments('{"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_arguments("") == {} and parse_arguments(None) == {}
    assert parse_arguments('{"a": 1') == {"_raw_arguments": '{"a": 1'}
    assert parse_arguments("[1]") == {"_raw_arguments": "[1]"}
    # and back again: the model sees what it said
    reply = chat_completion({"content": [{"type": "tool_use", "id": "t", "name": "f",
                                          "input": {"_raw_arguments": '{"a": 1'}}]},
                            created=0)  # fmt: skip
    assert reply["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"a": 1'


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, 4096),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50, "max_tokens": 100}, 50),
        ({"max_tokens": 0}, 4096),
    ],
)
def test_max_tokens_from_the_request_else_the_default(fields: dict, expected: int) -> None:
    body = translate({"messages": [{"role": "user", "content": "x"}], **fields}).body
    assert body["max_tokens"] == expected


def test_sampling_stop_user_stream_and_native_fields() -> None:
    request = translate({
        "messages": [{"role": "user", "content": "x"}],
        "stop": "END", "temperature": 1.7, "top_p": 0.9, "user": "user-42",
        "stream": True, "stream_options": {"include_usage": True},
        "top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 2048},
        "frequency_penalty": 0.5, "seed": 7, "logprobs": True,
    })  # fmt: skip
    body = request.body
    assert body["stop_sequences"] == ["END"]
    assert body["temperature"] == 1.0  # Anthropic's range is 0..1
    assert body["top_p"] == 0.9 and body["top_k"] == 5
    assert body["metadata"] == {"user_id": "user-42"}
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["stream"] is True and request.include_usage is True
    for dropped in ("frequency_penalty", "seed", "logprobs", "stream_options", "user", "stop"):
        assert dropped not in body
    assert translate({"messages": [{"role": "user", "content": "x"}],
                      "stop": ["a", "b"]}).body["stop_sequences"] == ["a", "b"]  # fmt: skip


@pytest.mark.parametrize(
    ("bad", "param"),
    [
        ({"n": 2}, "n"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio",
                        "input_audio": {"data": "x", "format": "wav"}}]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [{"role": "user", "content": [{"type": "file",
                        "file": {"file_id": "file-1"}}]}]}, "messages[0].content[0]"),
    ],
)  # fmt: skip
def test_what_anthropic_cannot_take_is_refused_naming_the_field(bad: dict, param: str) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], **bad}
    with pytest.raises(TranslationError) as exc:
        translate(body)
    assert exc.value.param == param


TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look up.",
          "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]  # fmt: skip


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ("auto", {"type": "auto"}),
        ("none", {"type": "none"}),
        ("required", {"type": "any"}),
        ({"type": "function", "function": {"name": "lookup"}}, {"type": "tool", "name": "lookup"}),
    ],
)
def test_tools_and_tool_choice(choice: Any, expected: dict | None) -> None:
    fields = {"tools": TOOLS} | ({"tool_choice": choice} if choice else {})
    body = translate({"messages": [{"role": "user", "content": "x"}], **fields}).body
    assert body["tools"] == [{"name": "lookup", "description": "Look up.",
                              "input_schema": TOOLS[0]["function"]["parameters"]}]  # fmt: skip
    assert body.get("tool_choice") == expected


def test_parallel_tool_calls_false_disables_parallel_tool_use() -> None:
    body = translate({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                      "parallel_tool_calls": False}).body  # fmt: skip
    assert body["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    body = translate({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                      "tool_choice": "required", "parallel_tool_calls": False}).body  # fmt: skip
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


def test_tool_choice_without_tools_is_not_sent() -> None:
    body = translate({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto"}).body
    assert "tool_choice" not in body and "tools" not in body


def test_response_format_json_schema_becomes_a_forced_tool() -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
    request = translate({"messages": [{"role": "user", "content": "x"}], "response_format": fmt})
    assert request.json_tool == JSON_TOOL
    assert request.body["tools"][-1]["input_schema"] == schema
    assert request.body["tool_choice"] == {"type": "tool", "name": JSON_TOOL}
    # with tools of the client's own, the model may call them: the format tool is offered
    request = translate({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                         "response_format": {"type": "json_object"}})  # fmt: skip
    assert [t["name"] for t in request.body["tools"]] == ["lookup", JSON_TOOL]
    assert "tool_choice" not in request.body
    text = translate({"messages": [{"role": "user", "content": "x"}],
                      "response_format": {"type": "text"}})  # fmt: skip
    assert text.json_tool is None and "tools" not in text.body


def test_cache_control_on_parts_messages_and_tools() -> None:
    marker = {"type": "ephemeral"}
    tools = [{**TOOLS[0], "cache_control": marker}]
    body = translate({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "long doc", "cache_control": marker}]},
        {"role": "assistant", "content": "ok", "cache_control": marker},
        {"role": "user", "content": "q"},
    ], "tools": tools}).body  # fmt: skip
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "long doc", "cache_control": marker}
    ]
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "ok", "cache_control": marker}
    ]
    assert body["tools"][0]["cache_control"] == marker


# ---- Message → chat completion ----------------------------------------------------------

MESSAGE = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [
        {"type": "text", "text": "I'll look that up."},
        {"type": "tool_use", "id": "toolu_01A", "name": "lookup", "input": {"q": "tallygate"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {"input_tokens": 100, "cache_creation_input_tokens": 2000,
              "cache_read_input_tokens": 30000, "output_tokens": 50},
}  # fmt: skip


def test_message_becomes_chat_completion() -> None:
    reply = chat_completion(MESSAGE, created=CREATED)
    assert reply == {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "object": "chat.completion",
        "created": CREATED,
        "model": "claude-sonnet-4-5-20250929",
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "I'll look that up.",
                "refusal": None,
                "tool_calls": [{"id": "toolu_01A", "type": "function",
                                "function": {"name": "lookup", "arguments": '{"q":"tallygate"}'}}],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }],
        "usage": {
            "prompt_tokens": 32100,
            "completion_tokens": 50,
            "total_tokens": 32150,
            "prompt_tokens_details": {"cached_tokens": 30000},
            "cache_creation_input_tokens": 2000,
        },
    }  # fmt: skip
    ChatCompletion.model_validate(reply)


def test_translated_cache_usage_is_priced_in_three_buckets() -> None:
    usage = read_openai_usage(chat_completion(MESSAGE, created=0)["usage"]).usage
    assert usage == Usage(input_tokens=32100, output_tokens=50, cache_read_input_tokens=30000,
                          cache_creation_input_tokens=2000)  # fmt: skip
    price = PriceTable.load().lookup("claude-sonnet-4-5")
    assert price is not None
    # 100 x $3 + 30000 x $0.30 + 2000 x $3.75 + 50 x $15, per million tokens
    assert cost_nano(price, usage) == 300_000 + 9_000_000 + 7_500_000 + 750_000


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("refusal", "content_filter"),
        ("some_new_reason", "stop"),
        (None, "stop"),
    ],
)
def test_stop_reasons(stop_reason: str | None, finish: str) -> None:
    reply = chat_completion({**MESSAGE, "content": [{"type": "text", "text": "x"}],
                             "stop_reason": stop_reason}, created=0)  # fmt: skip
    assert reply["choices"][0]["finish_reason"] == finish


def test_thinking_and_json_tool_in_a_whole_message() -> None:
    content = [
        {"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
        {"type": "tool_use", "id": "t", "name": JSON_TOOL, "input": {"answer": "42"}},
    ]
    reply = chat_completion({**MESSAGE, "content": content, "stop_reason": "tool_use"},
                            created=0, json_tool=JSON_TOOL)  # fmt: skip
    assert reply["choices"][0]["message"] == {
        "role": "assistant", "content": '{"answer":"42"}', "refusal": None,
        "reasoning_content": "Hmm.",
    }  # fmt: skip
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_usage_counts_that_are_not_counts_reach_the_usage_reader_unchanged() -> None:
    usage = openai_usage({"input_tokens": -5, "cache_read_input_tokens": 10, "output_tokens": 3})
    assert usage["prompt_tokens"] == -5 and "total_tokens" not in usage
    reading = read_openai_usage(usage)
    assert "prompt_tokens: negative" in reading.anomalies


# ---- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "openai_type"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (402, "billing_error", "insufficient_quota"),
        (403, "permission_error", "permission_error"),
        (404, "not_found_error", "invalid_request_error"),
        (413, "request_too_large", "invalid_request_error"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, "api_error", "server_error"),
        (504, "timeout_error", "server_error"),
        (529, "overloaded_error", "server_error"),
    ],
)
def test_anthropic_errors_become_openai_errors(status: int, kind: str, openai_type: str) -> None:
    body = {"type": "error", "error": {"type": kind, "message": "what happened"},
            "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}  # fmt: skip
    assert openai_error_from_anthropic(status, body) == {
        "error": {"message": "what happened", "type": openai_type, "param": None, "code": kind}
    }
    # and back: the status names the Anthropic type
    back = anthropic_error_from_openai(status, openai_error_from_anthropic(status, body))
    assert back == {"type": "error", "error": {"type": kind, "message": "what happened"}}


def test_error_bodies_that_are_not_json() -> None:
    out = openai_error_from_anthropic(502, None, b"<html>Bad Gateway</html>")
    assert out["error"]["type"] == "server_error" and out["error"]["code"] == "api_error"
    assert "Bad Gateway" in out["error"]["message"]


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
     (429, "rate_limit_error"), (502, "api_error"), (503, "overloaded_error"),
     (504, "timeout_error"), (418, "invalid_request_error")],
)  # fmt: skip
def test_openai_errors_become_anthropic_errors(status: int, kind: str) -> None:
    body = {"error": {"message": "m", "type": "whatever", "param": None, "code": None}}
    assert anthropic_error_from_openai(status, body)["error"] == {"type": kind, "message": "m"}


# ---- ingress: Messages request → chat request -------------------------------------------


def test_ingress_request_translation() -> None:
    body = chat_request({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "You are helpful.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "found"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "boom"}]},
                {"type": "text", "text": "Go on."},
            ]},
        ],
        "tools": [{"name": "lookup", "description": "Look up.",
                   "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_k": 3,
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }, cap_field="max_completion_tokens")  # fmt: skip
    assert body == {
        "model": "claude-sonnet-4-5",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
            ]},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "lookup", "arguments": '{"q":"x"}'}},
            ]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "found"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
            {"role": "user", "content": "Go on."},
        ],
        "max_completion_tokens": 1024,
        "stop": ["END"],
        "temperature": 0.2,
        "user": "u-1",
        "tools": [{"type": "function", "function": {"name": "lookup", "description": "Look up.",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip


def test_ingress_refuses_server_tools() -> None:
    with pytest.raises(TranslationError) as exc:
        chat_request({"model": "m", "max_tokens": 5, "messages": [],
                      "tools": [{"type": "web_search_20250305", "name": "web_search"}]})  # fmt: skip
    assert exc.value.param == "tools.0"


def test_round_trip_chat_to_messages_and_back_keeps_the_conversation() -> None:
    original = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3C"},
        {"role": "assistant", "content": "Cold: -3C."},
    ]  # fmt: skip
    there = translate({"messages": original, "max_tokens": 10}).body
    back = chat_request(there)
    assert back["messages"] == original
    assert back["max_tokens"] == 10


# ---- ingress: chat completion → Message ------------------------------------------------


def test_chat_completion_becomes_message() -> None:
    completion = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Sure.", "tool_calls": [{"id": "call_9",
            "type": "function", "function": {"name": "lookup", "arguments": '{"q": "y"}'}}]}}],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 30, "total_tokens": 1230,
                  "prompt_tokens_details": {"cached_tokens": 1000}},
    }  # fmt: skip
    out = message(completion, model="claude-sonnet-4-5")
    assert out == {
        "id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Sure."},
                    {"type": "tool_use", "id": "call_9", "name": "lookup", "input": {"q": "y"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 200, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 1000, "output_tokens": 30},
    }  # fmt: skip
    Message.model_validate(out)


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_finish_reasons_become_stop_reasons(finish: str | None, stop: str) -> None:
    completion = {"choices": [{"message": {"content": "x"}, "finish_reason": finish}]}
    assert message(completion)["stop_reason"] == stop


def test_usage_round_trips_through_both_shapes() -> None:
    anthropic = {"input_tokens": 7, "cache_creation_input_tokens": 11,
                 "cache_read_input_tokens": 13, "output_tokens": 17}  # fmt: skip
    assert anthropic_usage(openai_usage(anthropic)) == anthropic


# ---- ingress: chat chunks → Messages events ---------------------------------------------


def openai_chunks() -> list[dict[str, Any]]:
    def c(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o", "choices": [{"index": 0, "delta": delta,
                                                "finish_reason": finish}]}  # fmt: skip

    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": ""}}  # fmt: skip
    return [
        c({"role": "assistant", "content": ""}),
        c({"content": "Let me "}),
        c({"content": "check."}),
        c({"tool_calls": [call]}),
        c({"tool_calls": [{"index": 0, "function": {"arguments": '{"q": '}}]}),
        c({"tool_calls": [{"index": 0, "function": {"arguments": '"z"}'}}]}),
        c({}, "tool_calls"),
        {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
         "choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}},
    ]  # fmt: skip


def test_chat_chunks_become_messages_events() -> None:
    translator = EventTranslator(model="claude-sonnet-4-5")
    events = [e for c in openai_chunks() for e in translator.feed(c)] + translator.finish()
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert all(data["type"] == name for name, data in events)
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "call_1",
                                             "name": "lookup", "input": {}}  # fmt: skip
    assert events[9][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 40, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 9},
    }  # fmt: skip
    # the anthropic SDK's own accumulator builds the message from these events
    snapshot, bufs = None, {}
    for _, data in events:
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    final = snapshot.model_dump(exclude_none=True)
    assert final["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_1", "name": "lookup", "input": {"q": "z"}},
    ]
    assert final["model"] == "claude-sonnet-4-5" and final["stop_reason"] == "tool_use"
    assert final["usage"]["input_tokens"] == 40 and final["usage"]["output_tokens"] == 9
    assert translator.feed(openai_chunks()[1]) == [] and translator.finish() == []


def test_encoded_events_carry_event_lines() -> None:
    translator = EventTranslator(model="m")
    raw = encode(translator.feed(openai_chunks()[1]) + translator.finish())
    decoded = list(SSEDecoder().feed(raw))
    assert [e.split(b"\n")[0] for e, _ in decoded] == [
        b"event: message_start", b"event: content_block_start", b"event: content_block_delta",
        b"event: content_block_stop", b"event: message_delta", b"event: message_stop",
    ]  # fmt: skip
    assert all(json.loads(d)["type"] == e.split(b"\n")[0][7:].decode() for e, d in decoded)


def test_in_band_error_chunk_becomes_an_error_event() -> None:
    translator = EventTranslator(model="m")
    translator.feed(openai_chunks()[1])
    gateway_error = {"error": {"message": "The upstream deployment 'x' timed out.",
                               "type": "upstream_timeout", "param": None,
                               "code": "upstream_timeout"}}  # fmt: skip
    assert translator.feed(gateway_error) == [
        ("error", {"type": "error", "error": {"type": "api_error",
                                              "message": "The upstream deployment 'x' timed out."}})
    ]  # fmt: skip
    assert translator.done and translator.finish() == []
    overloaded = EventTranslator(model="m").feed(
        {"error": {"message": "Overloaded", "type": "server_error", "code": "overloaded_error"}}
    )
    assert overloaded[-1][1]["error"]["type"] == "overloaded_error"


def test_reasoning_then_text_are_separate_blocks() -> None:
    translator = EventTranslator(model="m")
    chunks = [{"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]},
              {"choices": [{"index": 0, "delta": {"content": "answer"}}]},
              {"choices": [{"index": 1, "delta": {"content": "other choice: ignored"}}]}]  # fmt: skip
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    starts = [d["content_block"]["type"] for n, d in events if n == "content_block_start"]
    assert starts == ["thinking", "text"]
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas == [{"type": "thinking_delta", "thinking": "think"},
                      {"type": "text_delta", "text": "answer"}]  # fmt: skip
    assert [d["index"] for n, d in events if n.startswith("content_block")] == [0, 0, 0, 1, 1, 1]


def test_ingress_structured_output_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = chat_request({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                         "output_config": {"format": {"type": "json_schema", "schema": schema}}})  # fmt: skip
    assert body["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "response", "schema": schema}
    }  # fmt: skip
    assert "stream" not in body and "stream_options" not in body
