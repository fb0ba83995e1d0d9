"""RequestContext: the one object every pipeline stage reads and fills for a request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pricing.usage import DEFAULT_TOKEN_BOUND, Usage


@dataclass(slots=True)
class Principal:
    team: str
    key_name: str
    admin: bool = False


@dataclass(slots=True)
class Attempt:
    """One upstream attempt (a retry or a fallback is a new Attempt)."""

    number: int  # 1-based across the whole request
    deployment: str  # "<model alias>#<index>:<provider>" e.g. "smart#0:anthropic"
    provider: str  # provider name in config, e.g. "openai"
    provider_kind: str  # openai | azure | anthropic | mock
    upstream_model: str
    server_address: str | None
    server_port: int | None
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    status: int | None = None
    error_type: str | None = None  # low-cardinality, e.g. "timeout", "429", "connect_error"
    span: Any = None  # the attempt's CLIENT span, owned by gateway.telemetry


@dataclass(slots=True)
class RequestContext:
    request_id: str
    method: str
    path: str  # as received, e.g. /v1/chat/completions
    operation: str  # gen_ai.operation.name: chat | text_completion | embeddings
    started: float = field(default_factory=time.perf_counter)
    started_unix: float = field(default_factory=time.time)

    body: dict[str, Any] | None = None  # parsed once; the client's request
    stream: bool = False
    upstream_caps: dict[str, tuple[str, int]] = field(
        default_factory=dict
    )  # deployment label → (field, value): the team's output cap, written into its body
    hide_usage: bool = False  # we asked upstream for the stream's usage chunk; the client did not
    requested_model: str | None = None
    principal: Principal | None = None

    attempts: list[Attempt] = field(default_factory=list)
    upstream_wait_s: float = 0.0  # time spent waiting on upstream I/O (for overhead)
    first_chunk_at: float | None = None  # perf_counter of the first chunk sent to the client

    response_headers: dict[str, str] = field(
        default_factory=dict
    )  # sent on every response (x-ratelimit-*)

    # results
    status: int = 0
    error_type: str | None = None
    error_message: str | None = None  # never unredacted upstream text (access log, span status)
    response_id: str | None = None
    response_model: str | None = None
    finish_reasons: list[str] = field(default_factory=list)
    output_text: list[str] = field(default_factory=list)  # collected only when content is captured
    output_tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage | None = None
    usage_bound: int = DEFAULT_TOKEN_BOUND  # most tokens a usage count may claim (admission)
    usage_anomalies: tuple[str, ...] = ()  # what was wrong with the upstream's usage report
    cost_nano: int | None = None
    pricing_version: str | None = None
    budget_remaining_nano: int | None = None
    cancelled: bool = False  # client went away mid-stream
    redactions: dict[str, int] = field(
        default_factory=dict
    )  # per detector, summed over the request
    rejected: str | None = None  # "budget" | "rate_limit" when admission refused
    trace: Any = None  # telemetry's per-request state (the SERVER span), owned by gateway.telemetry

    @property
    def attempt(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def overhead_s(self) -> float:
        return max(0.0, self.elapsed_s - self.upstream_wait_s)
