"""The gateway's metrics: their names, units and buckets (METRICS), and the instruments a
request records into, each an OpenTelemetry instrument and its Prometheus twin.

Histograms go to gateway/telemetry/fast/histograms.py on the fast path (the SDK's own histograms with
`telemetry.fast_path: false`); counters are summed in-process and read by an
ObservableCounter at collection.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as ga
from opentelemetry.semconv._incubating.attributes.server_attributes import (
    SERVER_ADDRESS,
    SERVER_PORT,
)
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as gm
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE

from gateway.telemetry import semconv as gen
from gateway.telemetry.fast.histograms import Histograms
from gateway.telemetry.prometheus import MetricSpec, PrometheusMetrics

if TYPE_CHECKING:
    from gateway.pipeline.context import Attempt, RequestContext

DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)  # fmt: skip
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)  # fmt: skip
# the gateway's own time is sub-millisecond to milliseconds
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)  # fmt: skip

_GENAI = (
    ga.GEN_AI_OPERATION_NAME,
    ga.GEN_AI_PROVIDER_NAME,
    ga.GEN_AI_REQUEST_MODEL,
    ga.GEN_AI_RESPONSE_MODEL,
    SERVER_ADDRESS,
    SERVER_PORT,
)
REQUESTS = "tallygate.requests"
COST = "tallygate.cost"
OVERHEAD = "tallygate.overhead.duration"
REJECTIONS = "tallygate.rejections"
RETRIES = "tallygate.retries"
FALLBACKS = "tallygate.fallbacks"
STORE_ERRORS = "tallygate.store.errors"
EVENTS = "tallygate.events"
REDACTIONS = "tallygate.redactions"
DROPPED = "tallygate.telemetry.dropped"
ERRORS = "tallygate.telemetry.errors"

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        gm.GEN_AI_CLIENT_OPERATION_DURATION, "histogram", "s",
        "GenAI operation duration (request received to response finished)",
        (*_GENAI, ERROR_TYPE), DURATION_BUCKETS,
    ),
    MetricSpec(
        gm.GEN_AI_CLIENT_TOKEN_USAGE, "histogram", "{token}",
        "Billable tokens per request, by gen_ai.token.type (input includes cache tokens)",
        (*_GENAI, ga.GEN_AI_TOKEN_TYPE, gen.TALLYGATE_TEAM), TOKEN_BUCKETS,
    ),
    MetricSpec(
        gm.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK, "histogram", "s",
        "Time from request received to the first chunk sent (streams)",
        _GENAI, DURATION_BUCKETS,
    ),
    MetricSpec(
        gm.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK, "histogram", "s",
        "Time between consecutive chunks of a stream, after the first",
        _GENAI, DURATION_BUCKETS,
    ),
    MetricSpec(
        OVERHEAD, "histogram", "s",
        "Time spent in the gateway, excluding the wait on the upstream",
        (ga.GEN_AI_OPERATION_NAME,), OVERHEAD_BUCKETS,
    ),
    MetricSpec(
        REQUESTS, "counter", "{request}", "Requests handled, by status",
        (HTTP_RESPONSE_STATUS_CODE, gen.TALLYGATE_TEAM, ga.GEN_AI_OPERATION_NAME,
         gen.TALLYGATE_MODEL, ERROR_TYPE),
    ),
    MetricSpec(
        COST, "counter", "USD", "Cost of the requests, from the price table",
        (gen.TALLYGATE_TEAM, gen.TALLYGATE_MODEL, ga.GEN_AI_REQUEST_MODEL),
    ),
    MetricSpec(
        REJECTIONS, "counter", "{request}", "Requests refused by admission (budget, rate limit)",
        (gen.TALLYGATE_TEAM, gen.TALLYGATE_REJECTION_KIND),
    ),
    MetricSpec(
        RETRIES, "counter", "{attempt}", "Upstream attempts retried on the same deployment",
        (gen.TALLYGATE_TEAM, gen.TALLYGATE_DEPLOYMENT, ERROR_TYPE),
    ),
    MetricSpec(
        FALLBACKS, "counter", "{attempt}", "Upstream attempts moved to the next deployment",
        (gen.TALLYGATE_TEAM, gen.TALLYGATE_DEPLOYMENT, ERROR_TYPE),
    ),
    MetricSpec(
        STORE_ERRORS, "counter", "{error}", "Budget/rate-limit store calls that failed",
        (gen.TALLYGATE_TEAM,),
    ),
    MetricSpec(
        EVENTS, "counter", "{event}", "Other pipeline events counted by name",
        (gen.TALLYGATE_EVENT, gen.TALLYGATE_TEAM),
    ),
    MetricSpec(
        REDACTIONS, "counter", "{redaction}", "Values redacted, by detector",
        (gen.TALLYGATE_TEAM, gen.TALLYGATE_REDACTION_TYPE),
    ),
    MetricSpec(
        DROPPED, "counter", "{item}", "Spans, metric points and log records not exported",
        (gen.TALLYGATE_SIGNAL, gen.TALLYGATE_DROP_REASON),
    ),
    MetricSpec(
        ERRORS, "counter", "{error}", "Exceptions inside telemetry (never raised into a request)",
        (gen.TALLYGATE_STAGE,),
    ),
)  # fmt: skip

# pipeline events with a counter of their own (RequestRecord.count); others go to EVENTS
EVENT_COUNTERS = {
    "retry": RETRIES,
    "fallback": FALLBACKS,
    "rejection": REJECTIONS,
    "store_error": STORE_ERRORS,
}
# count()'s keyword → attribute; other keywords become tallygate.<key>
EVENT_KEYS = {"kind": gen.TALLYGATE_REJECTION_KIND, "deployment": gen.TALLYGATE_DEPLOYMENT,
              "error_type": ERROR_TYPE}  # fmt: skip

Record = Callable[[float, Mapping[str, Any]], None]
_EMBEDDINGS = ga.GenAiOperationNameValues.EMBEDDINGS.value
_INPUT = ga.GenAiTokenTypeValues.INPUT.value
_OUTPUT = ga.GenAiTokenTypeValues.OUTPUT.value


class _Histogram:
    """An OpenTelemetry histogram (None when no reader would see it) and its Prometheus
    twin, recorded together."""

    __slots__ = ("_otel", "_prom")

    def __init__(self, otel: Record | None, prom: Any) -> None:
        self._otel = otel
        self._prom = prom

    def __call__(self, value: float, attributes: Mapping[str, Any]) -> None:
        if self._otel is not None:
            self._otel(value, attributes)
        if self._prom is not None:
            self._prom.record(value, attributes)


class _Counter:
    """A counter summed in-process (a dict hit per add, far cheaper than the SDK's
    synchronous counter) and read by an OpenTelemetry ObservableCounter at collection;
    also recorded into its Prometheus twin. Safe from exporter threads."""

    __slots__ = ("_lock", "_prom", "_totals")

    def __init__(self, prom: Any) -> None:
        self._prom = prom
        self._totals: dict[frozenset[tuple[str, Any]], list[Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, value: float, attributes: Mapping[str, Any]) -> None:
        key = frozenset(attributes.items())
        with self._lock:
            entry = self._totals.get(key)
            if entry is None:
                self._totals[key] = [dict(attributes), value]
            else:
                entry[1] += value
        if self._prom is not None:
            self._prom.record(value, attributes)

    def observe(self, _options: CallbackOptions) -> list[Observation]:
        with self._lock:
            return [Observation(total, attrs) for attrs, total in self._totals.values()]


class Instruments:
    """Every instrument of METRICS by name (`by_name`), and those a request records as
    attributes; each is called as record(value, attributes)."""

    __slots__ = (
        "by_name",
        "chunk",
        "cost",
        "dropped",
        "duration",
        "errors",
        "overhead",
        "redactions",
        "requests",
        "tokens",
        "ttfc",
    )

    def __init__(
        self,
        meter: Meter,
        *,
        exported: bool,
        histograms: Histograms | None,
        prometheus: PrometheusMetrics | None,
    ) -> None:
        """`exported`: some reader collects the histograms (else only Prometheus sees
        them); `histograms`: the fast path's, else the SDK's own."""
        self.by_name: dict[str, Record] = {}
        for spec in METRICS:
            prom = prometheus.instruments[spec.name] if prometheus is not None else None
            if spec.kind == "counter":
                counter = _Counter(prom)
                meter.create_observable_counter(
                    spec.name, [counter.observe], spec.unit, spec.description
                )
                self.by_name[spec.name] = counter
                continue
            record: Record | None = None  # without a reader, nothing to aggregate for
            if exported and histograms is not None:
                record = histograms.recorder(spec.name)
            elif exported:
                record = meter.create_histogram(
                    spec.name,
                    spec.unit,
                    spec.description,
                    explicit_bucket_boundaries_advisory=spec.buckets,
                ).record
            self.by_name[spec.name] = _Histogram(record, prom)
        by_name = self.by_name
        self.duration = by_name[gm.GEN_AI_CLIENT_OPERATION_DURATION]
        self.tokens = by_name[gm.GEN_AI_CLIENT_TOKEN_USAGE]
        self.ttfc = by_name[gm.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK]
        self.chunk = by_name[gm.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK]
        self.overhead = by_name[OVERHEAD]
        self.requests = by_name[REQUESTS]
        self.cost = by_name[COST]
        self.redactions = by_name[REDACTIONS]
        self.dropped = by_name[DROPPED]
        self.errors = by_name[ERRORS]

    def count_event(self, ctx: RequestContext, event: str, attrs: Mapping[str, Any]) -> None:
        """One pipeline event: its own counter (EVENT_COUNTERS), else tallygate.events."""
        principal = ctx.principal
        attributes: dict[str, Any] = {
            gen.TALLYGATE_TEAM: principal.team if principal else gen.NO_TEAM
        }
        name = EVENT_COUNTERS.get(event)
        if name is None:
            name = EVENTS
            attributes[gen.TALLYGATE_EVENT] = event
        elif event in ("retry", "fallback") and (attempt := ctx.attempt) is not None:
            attributes[gen.TALLYGATE_DEPLOYMENT] = attempt.deployment
            if attempt.error_type:
                attributes[ERROR_TYPE] = attempt.error_type
        elif event == "rejection" and ctx.rejected:
            attributes[gen.TALLYGATE_REJECTION_KIND] = ctx.rejected
        for key, value in attrs.items():
            attributes[EVENT_KEYS.get(key, f"tallygate.{key}")] = str(value)
        self.by_name[name](1, attributes)

    def record_request(
        self,
        ctx: RequestContext,
        models: gen.ModelBuckets,
        *,
        elapsed_s: float,
        overhead_s: float,
        ttft_s: float | None,
        cost_usd: float | None,
    ) -> None:
        """A finished request's metrics, from the figures its record fixed."""
        principal = ctx.principal
        team = principal.team if principal else gen.NO_TEAM
        error = gen.error_attributes(ctx.error_type, ctx.status)
        model = models(ctx.requested_model)
        requests = {
            HTTP_RESPONSE_STATUS_CODE: ctx.status,
            gen.TALLYGATE_TEAM: team,
            ga.GEN_AI_OPERATION_NAME: ctx.operation,
            gen.TALLYGATE_MODEL: model,
        }
        requests.update(error)
        self.requests(1, requests)
        self.overhead(overhead_s, {ga.GEN_AI_OPERATION_NAME: ctx.operation})
        last = ctx.attempt
        if last is not None:  # the gateway acted as a GenAI client
            genai = genai_metric_attributes(models, ctx, last)
            self.duration(elapsed_s, {**genai, **error} if error else genai)
            if ttft_s is not None:
                self.ttfc(ttft_s, genai)
            usage = ctx.usage
            if usage is not None:
                genai[gen.TALLYGATE_TEAM] = team
                genai[ga.GEN_AI_TOKEN_TYPE] = _INPUT
                self.tokens(usage.input_tokens, genai)
                if ctx.operation != _EMBEDDINGS:
                    genai[ga.GEN_AI_TOKEN_TYPE] = _OUTPUT
                    self.tokens(usage.output_tokens, genai)
        if ctx.cost_nano and cost_usd is not None:
            self.cost(
                cost_usd,
                {
                    gen.TALLYGATE_TEAM: team,
                    gen.TALLYGATE_MODEL: model,
                    ga.GEN_AI_REQUEST_MODEL: models(last.upstream_model) if last else "",
                },
            )
        for kind, n in ctx.redactions.items():
            if n:
                self.redactions(n, {gen.TALLYGATE_TEAM: team, gen.TALLYGATE_REDACTION_TYPE: kind})


def genai_metric_attributes(
    models: gen.ModelBuckets, ctx: RequestContext, attempt: Attempt | None, *, response: bool = True
) -> dict[str, Any]:
    """The GenAI metrics' attributes: low cardinality (unconfigured models are _OTHER)."""
    attributes: dict[str, Any] = {ga.GEN_AI_OPERATION_NAME: ctx.operation}
    if attempt is not None:
        attributes[ga.GEN_AI_PROVIDER_NAME] = gen.provider_name(attempt.provider_kind)
        attributes[ga.GEN_AI_REQUEST_MODEL] = models(attempt.upstream_model)
        if attempt.server_address:
            attributes[SERVER_ADDRESS] = attempt.server_address
            if attempt.server_port:
                attributes[SERVER_PORT] = attempt.server_port
    if response and ctx.response_model:
        attributes[ga.GEN_AI_RESPONSE_MODEL] = models(ctx.response_model)
    return attributes
