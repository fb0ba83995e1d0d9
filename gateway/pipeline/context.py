"""RequestContext: the one object every pipeline stage reads and fills for a request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pricing.usage import DEFAULT_TOKEN_BOUND, Usage

if TYPE_CHECKING:  # the records import this module
    from gateway.telemetry.record import AttemptRecord, RequestRecord


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
    # its telemetry (the CLIENT span), from RequestRecord.attempt until the request's record
    # finishes (then None: no reference cycle outlives the request)
    record: AttemptRecord | None = None


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
    response_service_tier: str | None = None  # OpenAI's, as the upstream answered
    response_system_fingerprint: str | None = None
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
    trace: RequestRecord | None = None  # its telemetry, from Telemetry.start_request

    @property
    def record(self) -> RequestRecord:
        """The request's telemetry record (pipeline.start has Telemetry.start_request make
        it before any stage runs)."""
        record = self.trace
        if record is None:
            raise RuntimeError("no telemetry record: Telemetry.start_request was not called")
        return record

    @property
    def attempt(self) -> Attempt | None:
        """The last (current) upstream attempt."""
        return self.attempts[-1] if self.attempts else None

    @property
    def overhead_s(self) -> float:
        """The gateway's own time so far (what the record fixes at finish)."""
        return self.overhead_until(time.perf_counter())

    def overhead_until(self, now: float) -> float:
        """Time spent in the gateway until `now` (perf_counter), less the upstream wait."""
        return max(0.0, now - self.started - self.upstream_wait_s)

    def time_to_first_chunk(self, since: float | None = None) -> float | None:
        """Seconds from `since` (perf_counter; default the request's arrival) to the first
        chunk the client got; None for a whole response, before the first chunk, or for
        a chunk sent before `since` (an attempt that started later)."""
        first = self.first_chunk_at
        if not self.stream or first is None:
            return None
        start = self.started if since is None else since
        return first - start if first >= start else None
