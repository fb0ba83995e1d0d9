"""Usage: the tokens one request used, in the OpenTelemetry GenAI convention's buckets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Usage:
    """Token usage of one request.

    Follows the GenAI semantic convention: ``input_tokens`` *includes* cache reads and
    cache writes, ``output_tokens`` *includes* reasoning tokens. Providers whose usage
    is shaped otherwise (Anthropic excludes cache tokens from ``input_tokens``) are
    converted on the way in, so pricing sees one shape.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    reasoning_output_tokens: int = 0
    estimated: bool = (
        False  # True when counted by us (tiktoken or a heuristic), not reported upstream
    )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def usage_from_openai(u: Mapping[str, Any]) -> Usage:
    """Usage from an OpenAI `usage` object: chat/completions, Responses API or embeddings.

    Also reads DeepSeek's `prompt_cache_hit_tokens` when no `cached_tokens` detail is given.
    Missing or null fields count as 0; upstream data never raises here.
    """
    chat = "prompt_tokens" in u or "completion_tokens" in u
    if chat:
        input_tokens = _int(u.get("prompt_tokens"))
        output_tokens = _int(u.get("completion_tokens"))
        in_details, out_details = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    else:
        input_tokens = _int(u.get("input_tokens"))
        output_tokens = _int(u.get("output_tokens"))
        in_details, out_details = u.get("input_tokens_details"), u.get("output_tokens_details")
    cached = _int(_get(in_details, "cached_tokens"))
    if not cached:
        cached = _int(u.get("prompt_cache_hit_tokens"))
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_input_tokens=min(cached, input_tokens),
        reasoning_output_tokens=min(_int(_get(out_details, "reasoning_tokens")), output_tokens),
    )


def usage_from_anthropic(u: Mapping[str, Any]) -> Usage:
    """Usage from an Anthropic `usage` object, whose `input_tokens` excludes cache tokens.

    The result's `input_tokens` includes cache reads and writes (the GenAI convention).
    """
    cache_read = _int(u.get("cache_read_input_tokens"))
    cache_write = _int(u.get("cache_creation_input_tokens"))
    return Usage(
        input_tokens=_int(u.get("input_tokens")) + cache_read + cache_write,
        output_tokens=_int(u.get("output_tokens")),
        cache_read_input_tokens=cache_read,
        cache_creation_input_tokens=cache_write,
    )


def _get(details: Any, key: str) -> Any:
    return details.get(key) if isinstance(details, Mapping) else None


def _int(value: Any) -> int:
    """A token count from JSON: ints (and integral floats) kept, negatives, null, junk → 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not value.is_integer():
        return 0
    return max(int(value), 0)
