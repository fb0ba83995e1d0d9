"""TokenCounter against tiktoken: the cookbook chat formula, approximations, and the fallback.

Needs the encodings: TIKTOKEN_CACHE_DIR=/work/shared/tiktoken-cache on a machine offline.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import tiktoken

from pricing import tokens as tokens_module
from pricing.encodings import get_encoding
from pricing.tokens import TokenCount, TokenCounter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def o200k() -> tiktoken.Encoding:
    return get_encoding("o200k_base")  # the packaged file (pricing/encodings)


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    return get_encoding("cl100k_base")


@pytest.fixture
def counter() -> TokenCounter:
    return TokenCounter(cache_dir=os.environ.get("TIKTOKEN_CACHE_DIR"))


def cookbook(enc: tiktoken.Encoding, messages: list[dict[str, str]]) -> int:
    """OpenAI cookbook num_tokens_from_messages, for gpt-3.5-turbo-0613 and later."""
    num_tokens = 0
    for message in messages:
        num_tokens += 3
        for key, value in message.items():
            num_tokens += len(enc.encode(value))
            if key == "name":
                num_tokens += 1
    return num_tokens + 3


EXACT_CASES = {
    "system_user": [
        {"role": "system", "content": "You are a helpful assistant that answers in French."},
        {"role": "user", "content": "What is the capital of Australia, and why not Sydney?"},
    ],
    "names": [
        {"role": "system", "content": "You are a helpful, pattern-following assistant."},
        {
            "role": "system",
            "name": "example_user",
            "content": "New synergies will help drive top-line growth.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Things working well together will increase revenue.",
        },
        {
            "role": "user",
            "name": "maria",
            "content": "Please translate: 'Let's circle back when we have more bandwidth.'",
        },
    ],
    "multi_turn": [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Summarise: The quick brown fox jumps over the lazy dog."},
        {"role": "assistant", "content": "A fox jumps over a dog."},
        {"role": "user", "content": "Now in Japanese, please. 日本語でお願いします 🙏"},
    ],
    "whitespace_and_code": [
        {"role": "user", "content": "def f(x):\n    return x ** 2\n\n\nprint(f(3))\t# 9\n"},
    ],
    "empty_content": [{"role": "user", "content": ""}],
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
@pytest.mark.parametrize(
    "model", ["gpt-4o", "gpt-4o-mini-2024-07-18", "gpt-4.1", "o3-mini", "gpt-5"]
)
def test_chat_matches_cookbook_o200k(
    counter: TokenCounter, o200k: tiktoken.Encoding, case: str, model: str
) -> None:
    messages = EXACT_CASES[case]
    assert counter.count_chat(model, {"messages": messages}) == TokenCount(
        cookbook(o200k, messages), False
    )


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
@pytest.mark.parametrize("model", ["gpt-4", "gpt-4-turbo", "gpt-3.5-turbo"])
def test_chat_matches_cookbook_cl100k(
    counter: TokenCounter, cl100k: tiktoken.Encoding, case: str, model: str
) -> None:
    messages = EXACT_CASES[case]
    assert counter.count_chat(model, {"messages": messages}) == TokenCount(
        cookbook(cl100k, messages), False
    )


def test_cookbook_published_example(counter: TokenCounter) -> None:
    # The cookbook's example_messages; it prints 129 for gpt-3.5-turbo / gpt-4 (cl100k).
    messages = [
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
    ]  # fmt: skip
    assert counter.count_chat("gpt-4", {"messages": messages}) == TokenCount(129, False)


def test_count_text(
    counter: TokenCounter, o200k: tiktoken.Encoding, cl100k: tiktoken.Encoding
) -> None:
    text = "Tokenizers split text into sub-word units; 12345 and emoji 🎉 count too."
    assert counter.count_text("gpt-4o", text) == TokenCount(len(o200k.encode(text)), False)
    assert counter.count_text("gpt-4", text) == TokenCount(len(cl100k.encode(text)), False)
    assert counter.count_text("gpt-4o", "") == TokenCount(0, False)


def test_loaded_encoding_keeps_no_python_rank_table(counter: TokenCounter) -> None:
    # tiktoken's Python copy of the ranks (~30 MB for o200k) only serves pickling
    text = "Rank tables live in Rust; this sentence still round-trips. 🎉"
    n = counter.count_text("gpt-4o", text).tokens
    encoding = get_encoding("o200k_base")  # the registry's object, now lean
    assert encoding._mergeable_ranks == {}
    ids = encoding.encode_ordinary(text)
    assert len(ids) == n > 5
    assert encoding.decode(ids) == text


def test_special_token_text_is_counted_as_text(
    counter: TokenCounter, o200k: tiktoken.Encoding
) -> None:
    text = "ignore <|endoftext|> and <|im_start|>"
    expected = len(o200k.encode(text, disallowed_special=()))
    assert counter.count_text("gpt-4o", text) == TokenCount(expected, False)


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("chatgpt-4o-latest", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-2025-04-16", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo-2024-04-09", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("davinci-002", "cl100k_base"),  # from tiktoken's own table
        ("claude-sonnet-4-5", None),
        ("gemini-2.5-pro", None),
        ("meta-llama/Llama-3.3-70B-Instruct-Turbo", None),
        ("mistral-large-latest", None),
    ],
)
def test_encoding_name(model: str, encoding: str | None) -> None:
    assert TokenCounter().encoding_name(model) == encoding


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "gemini-2.5-flash", "llama-3.1-8b-instant"])
def test_other_models_use_o200k_and_are_estimated(
    counter: TokenCounter, o200k: tiktoken.Encoding, model: str
) -> None:
    text = "Bonjour, comment ça va ?"
    assert counter.count_text(model, text) == TokenCount(len(o200k.encode(text)), True)
    messages = EXACT_CASES["system_user"]
    assert counter.count_chat(model, {"messages": messages}) == TokenCount(
        cookbook(o200k, messages), True
    )


def n(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode(text))


def test_tool_calls_and_tool_results(counter: TokenCounter, o200k: tiktoken.Encoding) -> None:
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp_c": 18, "sky": "clear"}'},
    ]
    expected = (
        3 + n(o200k, "user") + n(o200k, "Weather in Paris?")
        # assistant: role, null content skipped, each call 3 + name + arguments
        + 3 + n(o200k, "assistant") + 3 + n(o200k, "get_weather") + n(o200k, arguments)
        # tool: every string value, the cookbook way
        + 3 + n(o200k, "tool") + n(o200k, "call_abc") + n(o200k, '{"temp_c": 18, "sky": "clear"}')
        + 3
    )  # fmt: skip
    assert counter.count_chat("gpt-4o", {"messages": messages}) == TokenCount(expected, True)


def cookbook_tools(enc: tiktoken.Encoding, functions: list[dict]) -> int:
    """OpenAI cookbook num_tokens_for_tools with the gpt-4o / gpt-4o-mini constants."""
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = 7, 3, 3, -3, 3, 12
    count = 0
    for f in functions:
        count += func_init
        function = f["function"]
        desc = function["description"]
        desc = desc[:-1] if desc.endswith(".") else desc
        count += len(enc.encode(function["name"] + ":" + desc))
        properties = function["parameters"]["properties"]
        if properties:
            count += prop_init
            for key, prop in properties.items():
                count += prop_key
                if "enum" in prop:
                    count += enum_init
                    for item in prop["enum"]:
                        count += enum_item + len(enc.encode(item))
                pdesc = prop["description"]
                pdesc = pdesc[:-1] if pdesc.endswith(".") else pdesc
                count += len(enc.encode(f"{key}:{prop['type']}:{pdesc}"))
    return count + func_end


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "description": "The unit of temperature.", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]  # fmt: skip


def test_tools_definitions(counter: TokenCounter, o200k: tiktoken.Encoding) -> None:
    messages = EXACT_CASES["system_user"]
    expected = cookbook(o200k, messages) + cookbook_tools(o200k, TOOLS)
    result = counter.count_chat("gpt-4o-mini", {"messages": messages, "tools": TOOLS})
    assert result == TokenCount(expected, True)
    legacy = [t["function"] for t in TOOLS]  # `functions` is the flat, older shape
    assert counter.count_chat("gpt-4o-mini", {"messages": messages, "functions": legacy}) == result


def test_tools_use_cl100k_constants_for_gpt4(
    counter: TokenCounter, cl100k: tiktoken.Encoding
) -> None:
    messages = EXACT_CASES["system_user"]
    with_tools = counter.count_chat("gpt-4", {"messages": messages, "tools": TOOLS})
    # func_init is 10 for gpt-4 / gpt-3.5 instead of 7: 3 more per function
    assert with_tools.tokens == cookbook(cl100k, messages) + cookbook_tools(
        cl100k, TOOLS
    ) + 3 * len(TOOLS)


def test_multi_part_content(counter: TokenCounter, o200k: tiktoken.Encoding) -> None:
    parts = [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
        {"type": "text", "text": "And this one?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
    ]
    # sizes unknown (a URL; a PNG signature with no header): gpt-4o's largest image per
    # detail, 85 at "low" and 85 + 170 x 8 tiles otherwise (tests/test_pricing_media.py)
    expected = (
        3 + n(o200k, "user") + n(o200k, "What is in this image?") + 85
        + n(o200k, "And this one?") + 1445 + 3
    )  # fmt: skip
    body = {"messages": [{"role": "user", "content": parts}]}
    assert counter.count_chat("gpt-4o", body) == TokenCount(expected, True)


def test_single_text_part_is_exact(counter: TokenCounter, o200k: tiktoken.Encoding) -> None:
    as_parts = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    }
    as_string = {"messages": [{"role": "user", "content": "Hello there"}]}
    assert counter.count_chat("gpt-4o", as_parts) == counter.count_chat("gpt-4o", as_string)
    assert counter.count_chat("gpt-4o", as_parts) == TokenCount(
        cookbook(o200k, as_string["messages"]), False
    )


def test_response_format_json_schema(counter: TokenCounter, o200k: tiktoken.Encoding) -> None:
    schema = {
        "name": "answer",
        "strict": True,
        "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
    }
    messages = EXACT_CASES["system_user"]
    body = {"messages": messages, "response_format": {"type": "json_schema", "json_schema": schema}}
    compact = json.dumps(schema, separators=(",", ":"))
    assert counter.count_chat("gpt-4o", body) == TokenCount(
        cookbook(o200k, messages) + n(o200k, compact), True
    )
    plain = {"messages": messages, "response_format": {"type": "json_object"}}
    assert counter.count_chat("gpt-4o", plain) == TokenCount(cookbook(o200k, messages), False)


def test_anthropic_shaped_body(counter: TokenCounter, o200k: tiktoken.Encoding) -> None:
    body = {
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi!"}]}],
    }
    expected = (
        3 + n(o200k, "system") + n(o200k, "Be brief.") + 3 + n(o200k, "user") + n(o200k, "Hi!") + 3
    )
    assert counter.count_chat("claude-haiku-4-5", body) == TokenCount(expected, True)


def test_count_prompt_shapes(counter: TokenCounter, cl100k: tiktoken.Encoding) -> None:
    model = "gpt-3.5-turbo-instruct"
    assert counter.count_prompt(model, "Once upon a time") == TokenCount(
        n(cl100k, "Once upon a time"), False
    )
    assert counter.count_prompt(model, ["a b", "c d e"]) == TokenCount(
        n(cl100k, "a b") + n(cl100k, "c d e"), False
    )
    assert counter.count_prompt(model, [1, 2, 3, 4]) == TokenCount(4, False)
    assert counter.count_prompt(model, [[1, 2], [3, 4, 5]]) == TokenCount(5, False)
    assert counter.count_prompt(model, []) == TokenCount(0, False)
    # token arrays are exact even for a model whose text counts are estimates
    assert counter.count_prompt("llama-3.1-8b-instant", [[1, 2], [3]]) == TokenCount(3, False)


def test_count_embeddings_shapes(counter: TokenCounter, cl100k: tiktoken.Encoding) -> None:
    model = "text-embedding-3-small"
    assert counter.count_embeddings(model, "hello world") == TokenCount(
        n(cl100k, "hello world"), False
    )
    assert counter.count_embeddings(model, ["hello", "world"]) == TokenCount(2, False)
    assert counter.count_embeddings(model, [15339, 1917]) == TokenCount(2, False)
    assert counter.count_embeddings(model, [[15339], [1917, 0]]) == TokenCount(3, False)
    assert counter.count_embeddings("mistral-embed", "hello world").estimated


async def test_count_request_dispatch(counter: TokenCounter) -> None:
    chat = {"messages": EXACT_CASES["multi_turn"]}
    assert await counter.count_request("chat", "gpt-4o", chat) == counter.count_chat("gpt-4o", chat)
    completion = {"prompt": ["Say this is a test", "and this"], "suffix": " the end"}
    expected = (
        counter.count_prompt("gpt-3.5-turbo-instruct", completion["prompt"]).tokens
        + counter.count_text("gpt-3.5-turbo-instruct", " the end").tokens
    )
    assert await counter.count_request(
        "text_completion", "gpt-3.5-turbo-instruct", completion
    ) == TokenCount(expected, False)
    embeddings = {"input": ["alpha", "beta gamma"]}
    assert await counter.count_request("embeddings", "text-embedding-3-large", embeddings) == (
        counter.count_embeddings("text-embedding-3-large", embeddings["input"])
    )
    with pytest.raises(ValueError, match="speech"):
        await counter.count_request("speech", "gpt-4o", {})


class ThreadSpy(TokenCounter):
    def __init__(self) -> None:
        super().__init__(cache_dir=os.environ.get("TIKTOKEN_CACHE_DIR"))
        self.on_main_thread: list[bool] = []

    def count_chat(self, model: str, body: Any) -> TokenCount:
        self.on_main_thread.append(threading.current_thread() is threading.main_thread())
        return super().count_chat(model, body)


async def test_large_requests_are_counted_off_the_event_loop() -> None:
    spy = ThreadSpy()
    spy.count_text("gpt-4o", "warm up")  # load the encoding first
    spy.on_main_thread.clear()
    small = {"messages": [{"role": "user", "content": "short"}]}
    large = {"messages": [{"role": "user", "content": "lorem ipsum dolor " * 2000}]}  # 36 KB
    small_count = await spy.count_request("chat", "gpt-4o", small)
    large_count = await spy.count_request("chat", "gpt-4o", large)
    assert spy.on_main_thread == [True, False]
    assert small_count == spy.count_chat("gpt-4o", small)
    assert large_count == spy.count_chat("gpt-4o", large)


async def test_first_count_loads_encodings_off_the_event_loop() -> None:
    spy = ThreadSpy()
    await spy.count_request("chat", "gpt-4o", {"messages": [{"role": "user", "content": "hi"}]})
    assert spy.on_main_thread == [False]


def test_load_that_hangs_times_out_then_lands(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = tokens_module.encodings.get_encoding
    release = threading.Event()

    def slow(name: str) -> tiktoken.Encoding:
        release.wait(10)
        return real(name)

    monkeypatch.setattr(tokens_module.encodings, "get_encoding", slow)
    counter = TokenCounter(load_timeout_s=0.05)
    with caplog.at_level(logging.WARNING, logger="tallygate.pricing"):
        first = counter.count_text("gpt-4o", "x" * 10)
        second = counter.count_text("gpt-4", "y" * 7)
    assert first == TokenCount(3, True)  # ceil(10 / 4)
    assert second == TokenCount(2, True)  # ceil(7 / 4)
    warnings = [r for r in caplog.records if r.name == "tallygate.pricing"]
    assert len(warnings) == 1
    assert "timed out" in warnings[0].getMessage()
    release.set()
    for thread in threading.enumerate():
        if thread.name.startswith("tiktoken-load-"):
            thread.join(10)
    assert counter.count_text("gpt-4o", "x" * 10) == TokenCount(
        len(real("o200k_base").encode("x" * 10)), False
    )


def test_chars_per_token_estimate_rounds_up() -> None:
    assert [tokens_module._estimate("a" * k) for k in (0, 1, 4, 5)] == [0, 1, 1, 2]
