"""Usage: the tokens one request used, in the OpenTelemetry GenAI convention's buckets.

Reading usage is where a broken or lying upstream can poison the ledger, so every reader
here is total: any JSON in, a Usage out, never an exception. Each count is checked
(`_Reader.count`): negative, not an integer, not a number, or above the request's bound
(the model's context window x the number of choices) is clamped and named in
`anomalies`, which the gateway counts, logs once and marks on the span (docs/PRICING.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The bound when the model's context window is unknown: larger than any model's window,
# small enough that tokens x the dearest price stays far inside the ledger's integers.
DEFAULT_TOKEN_BOUND = 10_000_000


@dataclass(slots=True)
class Usage:
    """Token usage of one request.

    Follows the GenAI semantic convention: ``input_tokens`` *includes* cache reads and
    cache writes, ``output_tokens`` *includes* reasoning tokens. Providers whose usage
    is shaped otherwise (Anthropic excludes cache tokens from ``input_tokens``) are
    converted on the way in, so pricing sees one shape. Audio tokens are inside
    ``input_tokens`` / ``output_tokens`` too, and also counted apart.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    reasoning_output_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    estimated: bool = (
        False  # True when counted by us (tiktoken or a heuristic), not reported upstream
    )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(slots=True)
class UsageReading:
    """A usage object as read: the canonical Usage and what was wrong with the report."""

    usage: Usage
    anomalies: tuple[str, ...] = ()


class _Reader:
    """Reads token counts from one usage object, clamping each into [0, bound]."""

    __slots__ = ("anomalies", "bound")

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.anomalies: list[str] = []

    def count(self, value: Any, name: str) -> int:
        """A token count from JSON. Missing or null is 0. Anything else that is not a
        non-negative integer within the bound is clamped and noted: negative or unreadable
        → 0, fractional → rounded up, above the bound (or infinite) → the bound."""
        if type(value) is int and 0 <= value <= self.bound:  # the usual case, first
            return value
        if value is None:
            return 0
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, float) and value.is_integer():
            n = int(value)
        elif isinstance(value, float) and math.isinf(value) and value > 0:
            n = self.bound + 1
        elif isinstance(value, float) and math.isfinite(value):
            self.anomalies.append(f"{name}: not an integer")
            n = math.ceil(value)
        else:
            self.anomalies.append(f"{name}: not a number")
            return 0
        if n < 0:
            self.anomalies.append(f"{name}: negative")
            return 0
        if n > self.bound:
            self.anomalies.append(f"{name}: above the bound of {self.bound}")
            return self.bound
        return n

    def cap(self, n: int, name: str) -> int:
        if n > self.bound:
            self.anomalies.append(f"{name}: above the bound of {self.bound}")
            return self.bound
        return n


def read_openai_usage(u: Any, bound: int = DEFAULT_TOKEN_BOUND) -> UsageReading:
    """Usage from an OpenAI-shaped `usage` object (chat/completions, Responses, embeddings,
    and the variants compatible servers send).

    - Cache reads: `prompt_tokens_details.cached_tokens` (`input_tokens_details` in the
      Responses API), else DeepSeek's `prompt_cache_hit_tokens`, else a top-level
      `cache_read_input_tokens` (Anthropic-compatible servers).
    - Cache writes: a top-level `cache_creation_input_tokens`, or `cache_creation_tokens` /
      `cache_write_tokens` in the details.
    - Cache tokens are read as inside `prompt_tokens` (OpenAI's convention) unless they
      cannot be: when they exceed it, or when `total_tokens` counts them beside it.
    - Reasoning reported outside `completion_tokens` (a reasoning count above it, or a
      `total_tokens` above input + output) is added to the output: of two consistent
      readings, the larger is charged.
    - Audio tokens from the details, inside input / output.
    """
    if not isinstance(u, Mapping):
        return UsageReading(Usage(), ("usage: not an object",))
    r = _Reader(bound)
    chat = "prompt_tokens" in u or "completion_tokens" in u
    if chat:
        prompt = r.count(u.get("prompt_tokens"), "prompt_tokens")
        completion = r.count(u.get("completion_tokens"), "completion_tokens")
        in_details, out_details = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    else:
        prompt = r.count(u.get("input_tokens"), "input_tokens")
        completion = r.count(u.get("output_tokens"), "output_tokens")
        in_details, out_details = u.get("input_tokens_details"), u.get("output_tokens_details")
    cached = (
        r.count(_get(in_details, "cached_tokens"), "cached_tokens")
        or r.count(u.get("prompt_cache_hit_tokens"), "prompt_cache_hit_tokens")
        or r.count(u.get("cache_read_input_tokens"), "cache_read_input_tokens")
    )
    written = (
        r.count(u.get("cache_creation_input_tokens"), "cache_creation_input_tokens")
        or r.count(_get(in_details, "cache_creation_tokens"), "cache_creation_tokens")
        or r.count(_get(in_details, "cache_write_tokens"), "cache_write_tokens")
    )
    reasoning = r.count(_get(out_details, "reasoning_tokens"), "reasoning_tokens")
    audio_in = r.count(_get(in_details, "audio_tokens"), "prompt audio_tokens")
    audio_out = r.count(_get(out_details, "audio_tokens"), "completion audio_tokens")
    total = r.count(u.get("total_tokens"), "total_tokens")

    cache = cached + written
    beside = cache > prompt or (cache > 0 and total == prompt + completion + cache)
    input_tokens = prompt + cache if beside else prompt
    output_tokens = completion
    if reasoning > completion:  # reasoning counted beside the completion
        output_tokens = completion + reasoning
    hidden = total - input_tokens - output_tokens
    if hidden > 0:
        output_tokens += hidden  # e.g. reasoning only in total_tokens
        reasoning += hidden
    input_tokens = r.cap(input_tokens, "input tokens")
    output_tokens = r.cap(output_tokens, "output tokens")
    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_input_tokens=min(cached, input_tokens),
        cache_creation_input_tokens=min(written, input_tokens - min(cached, input_tokens)),
        reasoning_output_tokens=min(reasoning, output_tokens),
        audio_input_tokens=min(audio_in, input_tokens),
        audio_output_tokens=min(audio_out, output_tokens),
    )
    return UsageReading(usage, tuple(r.anomalies))


def read_anthropic_usage(u: Any, bound: int = DEFAULT_TOKEN_BOUND) -> UsageReading:
    """Usage from an Anthropic `usage` object, whose `input_tokens` excludes cache tokens.

    The result's `input_tokens` includes cache reads and writes (the GenAI convention).
    """
    if not isinstance(u, Mapping):
        return UsageReading(Usage(), ("usage: not an object",))
    r = _Reader(bound)
    cache_read = r.count(u.get("cache_read_input_tokens"), "cache_read_input_tokens")
    cache_write = r.count(u.get("cache_creation_input_tokens"), "cache_creation_input_tokens")
    uncached = r.count(u.get("input_tokens"), "input_tokens")
    input_tokens = r.cap(uncached + cache_read + cache_write, "input tokens")
    usage = Usage(
        input_tokens=input_tokens,
        output_tokens=r.count(u.get("output_tokens"), "output_tokens"),
        cache_read_input_tokens=min(cache_read, input_tokens),
        cache_creation_input_tokens=min(cache_write, input_tokens - min(cache_read, input_tokens)),
    )
    return UsageReading(usage, tuple(r.anomalies))


def usage_from_openai(u: Mapping[str, Any]) -> Usage:
    """`read_openai_usage` without the anomalies, at the default bound."""
    return read_openai_usage(u).usage


def usage_from_anthropic(u: Mapping[str, Any]) -> Usage:
    """`read_anthropic_usage` without the anomalies, at the default bound."""
    return read_anthropic_usage(u).usage


def at_least(usage: Usage, floor: Usage) -> Usage:
    """`usage` raised to `floor` in input and output: what a suspect report is charged
    (it may not be trusted to be low), marked estimated when the floor won."""
    input_tokens = max(usage.input_tokens, floor.input_tokens)
    output_tokens = max(usage.output_tokens, floor.output_tokens)
    if (input_tokens, output_tokens) == (usage.input_tokens, usage.output_tokens):
        return usage
    return Usage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        reasoning_output_tokens=usage.reasoning_output_tokens,
        audio_input_tokens=usage.audio_input_tokens,
        audio_output_tokens=usage.audio_output_tokens,
        estimated=True,
    )


def _get(details: Any, key: str) -> Any:
    return details.get(key) if isinstance(details, Mapping) else None
