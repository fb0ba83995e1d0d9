"""usage_from_openai / usage_from_anthropic: provider usage objects into one Usage shape."""

from __future__ import annotations

import dataclasses

from pricing.usage import Usage, usage_from_anthropic, usage_from_openai


def test_usage_fields_are_the_shared_contract() -> None:
    assert [f.name for f in dataclasses.fields(Usage)] == [
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "reasoning_output_tokens",
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
