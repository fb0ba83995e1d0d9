"""Usage: the tokens one request used, in the OpenTelemetry GenAI convention's buckets."""

from __future__ import annotations

from dataclasses import dataclass


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
    estimated: bool = False  # True when counted by us (tiktoken or a heuristic), not reported upstream

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens
