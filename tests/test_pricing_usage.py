"""usage_from_openai / usage_from_anthropic: provider usage objects into one Usage shape."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pricing.usage import (
    Usage,
    at_least,
    read_anthropic_usage,
    read_openai_usage,
    usage_from_anthropic,
    usage_from_openai,
)


def test_usage_fields_are_the_shared_contract() -> None:
    assert [f.name for f in dataclasses.fields(Usage)] == [
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "reasoning_output_tokens",
        "audio_input_tokens",
        "audio_output_tokens",
        "estimated",
    ]


def test_chat_completions_shape() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 1200,
            "completion_tokens": 300,
            "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0},
        }
    )
    assert usage == Usage(
        input_tokens=1200,
        output_tokens=300,
        cache_read_input_tokens=1024,
        reasoning_output_tokens=128,
    )
    assert usage.total_tokens == 1500


def test_responses_api_shape() -> None:
    usage = usage_from_openai(
        {
            "input_tokens": 900,
            "input_tokens_details": {"cached_tokens": 512},
            "output_tokens": 700,
            "output_tokens_details": {"reasoning_tokens": 600},
            "total_tokens": 1600,
        }
    )
    assert usage == Usage(
        input_tokens=900,
        output_tokens=700,
        cache_read_input_tokens=512,
        reasoning_output_tokens=600,
    )


def test_embeddings_shape() -> None:
    assert usage_from_openai({"prompt_tokens": 8, "total_tokens": 8}) == Usage(input_tokens=8)


def test_nulls_and_missing_details_count_as_zero() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 10,
            "completion_tokens": None,
            "prompt_tokens_details": None,
            "completion_tokens_details": {"reasoning_tokens": None},
        }
    )
    assert usage == Usage(input_tokens=10)
    assert usage_from_openai({}) == Usage()
    assert usage_from_anthropic({"input_tokens": None, "output_tokens": 5}) == Usage(
        output_tokens=5
    )


def test_junk_values_do_not_raise() -> None:
    usage = usage_from_openai({"prompt_tokens": "12", "completion_tokens": -3, "x": {}})
    assert usage == Usage()
    assert usage_from_openai({"prompt_tokens": 12.0}).input_tokens == 12


def test_deepseek_cache_hit_tokens() -> None:
    usage = usage_from_openai(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 10,
            "prompt_cache_hit_tokens": 800,
            "prompt_cache_miss_tokens": 200,
        }
    )
    assert usage.cache_read_input_tokens == 800
    assert usage.input_tokens == 1000


def test_anthropic_input_includes_cache_buckets() -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 50,
            "cache_creation_input_tokens": 2048,
            "cache_read_input_tokens": 4096,
            "output_tokens": 300,
            "cache_creation": {"ephemeral_5m_input_tokens": 2048, "ephemeral_1h_input_tokens": 0},
            "service_tier": "standard",
        }
    )
    assert usage == Usage(
        input_tokens=50 + 2048 + 4096,
        output_tokens=300,
        cache_read_input_tokens=4096,
        cache_creation_input_tokens=2048,
    )
    assert not usage.estimated


# ---- the canonical reading: hard to fool (issue: money holds for every request shape) ----


def test_openai_shaped_cache_writes_are_read_and_inside_prompt_tokens() -> None:
    # LiteLLM-style: prompt_tokens includes the cache buckets, writes named Anthropic's way
    reading = read_openai_usage(
        {
            "prompt_tokens": 3000,
            "completion_tokens": 10,
            "total_tokens": 3010,
            "cache_creation_input_tokens": 2000,
            "prompt_tokens_details": {"cached_tokens": 500},
        }
    )
    assert reading.anomalies == ()
    assert reading.usage == Usage(
        input_tokens=3000,
        output_tokens=10,
        cache_read_input_tokens=500,
        cache_creation_input_tokens=2000,
    )


@pytest.mark.parametrize("details", [{"cache_creation_tokens": 2000}, {"cache_write_tokens": 2000}])
def test_cache_writes_in_the_details(details: dict[str, int]) -> None:
    usage = usage_from_openai({"prompt_tokens": 2500, "completion_tokens": 1,
                               "prompt_tokens_details": details})  # fmt: skip
    assert usage.cache_creation_input_tokens == 2000
    assert usage.input_tokens == 2500


def test_cache_tokens_beside_prompt_tokens_are_added() -> None:
    # Anthropic's convention in an OpenAI shape: prompt_tokens is the uncached part only
    usage = usage_from_openai(
        {"prompt_tokens": 40, "completion_tokens": 10,
         "cache_read_input_tokens": 4000, "cache_creation_input_tokens": 1000}
    )  # fmt: skip
    assert usage.input_tokens == 5040
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (4000, 1000)
    # total_tokens that counts them beside the prompt says the same, even when they fit in it
    usage = usage_from_openai(
        {"prompt_tokens": 5000, "completion_tokens": 10, "total_tokens": 5610,
         "prompt_tokens_details": {"cached_tokens": 600}}
    )  # fmt: skip
    assert usage.input_tokens == 5600


def test_reasoning_outside_completion_tokens_is_charged() -> None:
    # the example: total_tokens carries reasoning that completion_tokens does not
    reading = read_openai_usage(
        {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 750}
    )
    assert reading.usage.output_tokens == 650
    assert reading.usage.reasoning_output_tokens == 600
    # a reasoning count larger than the completion is beside it
    usage = usage_from_openai(
        {"prompt_tokens": 100, "completion_tokens": 50,
         "completion_tokens_details": {"reasoning_tokens": 400}}
    )  # fmt: skip
    assert usage.output_tokens == 450 and usage.reasoning_output_tokens == 400
    # and one inside it changes nothing
    usage = usage_from_openai(
        {"prompt_tokens": 100, "completion_tokens": 500, "total_tokens": 600,
         "completion_tokens_details": {"reasoning_tokens": 400}}
    )  # fmt: skip
    assert usage.output_tokens == 500


def test_audio_tokens_are_read() -> None:
    usage = usage_from_openai(
        {"prompt_tokens": 300, "completion_tokens": 200,
         "prompt_tokens_details": {"audio_tokens": 250},
         "completion_tokens_details": {"audio_tokens": 150}}
    )  # fmt: skip
    assert (usage.audio_input_tokens, usage.audio_output_tokens) == (250, 150)
    assert (usage.input_tokens, usage.output_tokens) == (300, 200)


@pytest.mark.parametrize(
    ("value", "expected", "anomaly"),
    [
        (10**18, 128_000, "above the bound"),
        (-5, 0, "negative"),
        (12.5, 13, "not an integer"),
        (math.inf, 128_000, "above the bound"),
        (math.nan, 0, "not a number"),
        ("12", 0, "not a number"),
        (True, 0, "not a number"),
        ([1], 0, "not a number"),
    ],
)
def test_bad_counts_are_clamped_and_named(value: object, expected: int, anomaly: str) -> None:
    reading = read_openai_usage({"prompt_tokens": 10, "completion_tokens": value}, bound=128_000)
    assert reading.usage.output_tokens == expected
    assert any("completion_tokens" in a and anomaly in a for a in reading.anomalies)


def test_anthropic_counts_are_clamped_too() -> None:
    reading = read_anthropic_usage(
        {"input_tokens": 10**18, "output_tokens": -1, "cache_read_input_tokens": "x"}, bound=1000
    )
    assert reading.usage.input_tokens == 1000 and reading.usage.output_tokens == 0
    assert len(reading.anomalies) >= 3


def test_not_an_object() -> None:
    for junk in (None, [], "usage", 3):
        reading = read_openai_usage(junk)
        assert reading.usage == Usage() and reading.anomalies


def test_at_least_raises_a_suspect_report_to_our_count() -> None:
    reported = Usage(input_tokens=0, output_tokens=5)
    floored = at_least(reported, Usage(input_tokens=120, output_tokens=3, estimated=True))
    assert (floored.input_tokens, floored.output_tokens, floored.estimated) == (120, 5, True)
    assert at_least(reported, Usage()) is reported


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
_usage_keys = st.sampled_from([
    "prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
    "prompt_tokens_details", "completion_tokens_details", "input_tokens_details",
    "output_tokens_details", "cache_creation_input_tokens", "cache_read_input_tokens",
    "prompt_cache_hit_tokens",
])  # fmt: skip
_details = st.dictionaries(
    st.sampled_from(["cached_tokens", "reasoning_tokens", "audio_tokens", "cache_write_tokens"]),
    _json, max_size=4,
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_usage_keys, _json | _details, max_size=8), st.integers(1, 10**7))
def test_any_usage_object_reads_within_its_bound(raw: dict, bound: int) -> None:
    """No exception escapes, every bucket is a non-negative int, nothing passes the bound,
    and the buckets nest (cache inside input, reasoning inside output)."""
    for reading in (read_openai_usage(raw, bound), read_anthropic_usage(raw, bound)):
        u = reading.usage
        for value in (u.input_tokens, u.output_tokens, u.cache_read_input_tokens,
                      u.cache_creation_input_tokens, u.reasoning_output_tokens):  # fmt: skip
            assert isinstance(value, int) and 0 <= value <= bound
        assert u.cache_read_input_tokens + u.cache_creation_input_tokens <= u.input_tokens
        assert u.reasoning_output_tokens <= u.output_tokens
        assert u.audio_input_tokens <= u.input_tokens
