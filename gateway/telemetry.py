"""Telemetry: traces, metrics and the access log of every request (setup and lifecycle).

The pipeline calls a small lifecycle API at fixed points (start_request, start_attempt,
use_attempt, end_attempt, count, record_chunk_gap, finish_request); every call is
guarded so that a failure inside telemetry is counted and logged once, never raised
into a request. Strings a client controls (the model it asks for, its user agent and
tracestate, some body fields, error messages quoting them) pass the redactor before any
span or line carries them (gateway.client_strings). What the attributes are is decided
in gateway.genai_attributes (pure); the access line in gateway.access_log; the Prometheus
exposition in gateway.prometheus.

The gateway's own spans, its histograms and the OTLP/HTTP span encoding take a fast path
(gateway/lite_spans.py, histograms.py, otlp_spans.py, span_export.py) that relies on a
few private SDK names; `telemetry.fast_path: false`, or one of those names missing at
start, uses the plain SDK objects instead, with the same telemetry.

Exporting never slows a request: spans and logs go through batch processors with
bounded queues to a background thread; a dead or slow backend only costs dropped
telemetry, counted in `tallygate.telemetry.dropped`, and one warning per outage instead
of the exporters' per-batch error logs. This module is longer than most because the
export plumbing (guarded exporters, counting processors, the log filter) belongs with
the setup it is part of.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal, TextIO

import httpx
import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.metrics import CallbackOptions, NoOpMeterProvider, Observation
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import (
    LogRecordExporter,
)
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as ga
from opentelemetry.semconv._incubating.attributes.server_attributes import (
    SERVER_ADDRESS,
    SERVER_PORT,
)
from opentelemetry.semconv._incubating.attributes.service_attributes import (
    SERVICE_INSTANCE_ID,
)
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as gm
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME, SERVICE_VERSION
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field

from gateway import genai_attributes as gen
from gateway.access_log import AccessLog, ClientStrings, access_record
from gateway.client_strings import WITHHELD, Redact, Scrubber
from gateway.context import Attempt, RequestContext
from gateway.histograms import Histograms
from gateway.histograms import private_sdk_names as histogram_sdk_names
from gateway.lite_spans import LiteSpan, LiteTracer, PlainSpan, PlainTracer
from gateway.prometheus import MetricSpec, PrometheusMetrics, prepare_multiprocess
from gateway.telemetry_export import (
    CountingBatchLogProcessor,
    CountingBatchSpanProcessor,
    ExportHealth,
    GuardedLogExporter,
    GuardedMetricExporter,
    GuardedSpanExporter,
    QuietExportLogs,
    missing_names,
)
from policies.redaction import RedactionConfig, Redactor

__all__ = [
    "METRICS",
    "Telemetry",
    "TelemetryConfig",
    "fast_path_missing",
    "prepare_multiprocess",
]

logger = logging.getLogger("gateway.telemetry")


class TelemetryConfig(BaseModel):
    """The `telemetry:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    service_name: str = "tallygate"
    exporter: Literal["otlp", "console", "none"] = "otlp"
    # None and no OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT: nothing exported
    endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    headers: dict[str, str] = Field(default_factory=dict)
    capture_content: Literal["none", "redacted", "full"] = "redacted"
    prometheus: bool = True
    log_format: Literal["json", "text"] = "json"
    export_logs: bool = False  # also export the access lines as OTLP logs
    # off: traces (and logs) only, for backends that take no OTLP metrics (Phoenix answers 405)
    export_metrics: bool = True
    # added to the OTLP resource of every signal (e.g. Phoenix's openinference.project.name,
    # deployment.environment); OTEL_RESOURCE_ATTRIBUTES wins for a key both set
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    # the httpx instrumentation's HTTP span under each attempt span (15% of a request's CPU;
    # off, the attempt span itself is the HTTP call and its traceparent goes upstream)
    http_spans: bool = False
    # false: the plain SDK objects (its Tracer and spans, BatchSpanProcessor and
    # OTLPSpanExporter, its histograms), none of the private SDK names the fast path needs
    fast_path: bool = True
    max_queue_size: int = Field(default=2048, ge=1)  # batch processors' bounded queues
    export_timeout_s: float = Field(default=5.0, gt=0)


# --- instruments -----------------------------------------------------------------------

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

_EVENT_COUNTERS = {
    "retry": RETRIES,
    "fallback": FALLBACKS,
    "rejection": REJECTIONS,
    "store_error": STORE_ERRORS,
}
_EVENT_KEYS = {"kind": gen.TALLYGATE_REJECTION_KIND, "deployment": gen.TALLYGATE_DEPLOYMENT,
               "error_type": ERROR_TYPE}  # fmt: skip


class _Histogram:
    """An OpenTelemetry histogram (None when no reader would see it) and its Prometheus
    twin, recorded together."""

    __slots__ = ("_otel", "_prom")

    def __init__(self, otel: Callable[..., None] | None, prom: Any) -> None:
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


# --- export plumbing: one warning per outage, every drop counted --------------------------


# The loggers the SDK and the OTLP exporters (1.45) use for export errors, retries and
# queue-full warnings: per batch, on a dead endpoint, that is a log line every few seconds.
class _HeaderGetter(Getter[Mapping[str, str]]):
    """Reads W3C trace headers from any mapping: Starlette's Headers (case-insensitive)
    or a plain dict whose keys may be capitalized."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None and isinstance(carrier, dict):
            for name, candidate in carrier.items():
                if name.lower() == key:
                    value = candidate
                    break
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


class _RequestTrace:
    """What telemetry keeps per request, in RequestContext.trace."""

    __slots__ = ("chunk_attrs", "finished", "request_attrs", "span")

    def __init__(self, span: LiteSpan | PlainSpan | None) -> None:
        self.span = span
        self.request_attrs: dict[str, Any] | None = None  # gen_ai.request.* of the body
        self.chunk_attrs: dict[str, Any] | None = None  # metric attributes for chunk gaps
        self.finished = False


class _AttemptTrace:
    """What telemetry keeps per attempt, in Attempt.span. A successful attempt's span
    stays open (with its end time fixed) until finish_request adds the response,
    usage and content that are only complete then."""

    __slots__ = ("closed", "end_ns", "failed", "span")

    def __init__(self, span: LiteSpan | PlainSpan) -> None:
        self.span = span
        self.end_ns: int | None = None
        self.failed = False
        self.closed = False


class _CurrentSpan:
    """use_attempt's context manager: attaches the attempt span's context on entry and
    detaches it on exit; its own failures are counted, the body's exceptions propagate."""

    __slots__ = ("_state", "_telemetry", "_token")

    def __init__(self, telemetry: Telemetry, state: Any) -> None:
        self._telemetry = telemetry
        self._state = state
        self._token: Any = None

    def __enter__(self) -> None:
        state = self._state
        if isinstance(state, _AttemptTrace):
            try:
                self._token = otel_context.attach(_as_context(state.span))
            except Exception:
                self._telemetry._failed("use_attempt")

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            try:
                otel_context.detach(self._token)
            except Exception:
                self._telemetry._failed("use_attempt")
            self._token = None


_NOTHING = contextlib.nullcontext()


def _as_context(span: LiteSpan | PlainSpan | None) -> otel_context.Context | None:
    """An OpenTelemetry Context whose current span is `span` (for instrumentation and logs)."""
    if span is None:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(span.get_span_context()))


def _wall_ns(ctx: RequestContext, perf: float) -> int:
    """A perf_counter reading of this request → epoch nanoseconds."""
    return int((ctx.started_unix + (perf - ctx.started)) * 1e9)


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


# --- the API ----------------------------------------------------------------------------


def resource_attributes(configured: Mapping[str, str]) -> dict[str, str]:
    """The config's resource attributes less those OTEL_RESOURCE_ATTRIBUTES sets, which
    Resource.create merges in underneath: the environment wins, as operators expect."""
    from opentelemetry.sdk.resources import OTELResourceDetector

    from_env = OTELResourceDetector().detect().attributes
    return {k: v for k, v in configured.items() if k not in from_env}


def fast_path_missing(span_exporter: SpanExporter | None = None) -> list[str]:
    """The private SDK names the fast path needs that this SDK lacks, as "Owner.name":
    the histograms' and, given the fast OTLP/HTTP span exporter, the ones it reads."""
    pairs = histogram_sdk_names()
    if span_exporter is not None:
        from gateway.otlp_spans import private_sdk_names

        pairs += private_sdk_names(span_exporter)  # type: ignore[arg-type]
    return missing_names(pairs)


def _sdk_version() -> str:
    try:
        return importlib.metadata.version("opentelemetry-sdk")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def otlp_targets(cfg: TelemetryConfig, env: Mapping[str, str]) -> dict[str, tuple[str | None, str]]:
    """Per signal: (endpoint to pass the exporter, or None to let it read the OTEL_*
    environment; what to call it in logs). Absent: not exported. The config's endpoint
    wins over the per-signal variable, which wins over the generic one."""
    http = cfg.protocol == "http/protobuf"
    signals = ("traces",) + ("metrics",) * cfg.export_metrics + ("logs",) * cfg.export_logs
    out: dict[str, tuple[str | None, str]] = {}
    for signal in signals:
        if cfg.endpoint:
            base = cfg.endpoint.rstrip("/")
            for suffix in ("/v1/traces", "/v1/metrics", "/v1/logs"):
                base = base.removesuffix(suffix)
            url = f"{base}/v1/{signal}" if http else base
            out[signal] = (url, url)
        elif value := env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"):
            out[signal] = (None, value)
        elif value := env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            out[signal] = (None, value)
    return out


def describe_export(cfg: TelemetryConfig, env: Mapping[str, str]) -> str:
    """Where telemetry goes, for the startup line: "otlp http/protobuf → URL", "console",
    "none", or "none (otlp: no endpoint configured)"."""
    if cfg.exporter != "otlp":
        return cfg.exporter
    targets = otlp_targets(cfg, env)
    if not targets:
        return "none (otlp: no endpoint configured)"
    where = cfg.endpoint or targets.get("traces", next(iter(targets.values())))[1]
    return f"otlp {cfg.protocol} → {where}"


class Telemetry:
    """Traces, metrics and access log of one gateway process. Build with `create`."""

    def __init__(self) -> None:  # use Telemetry.create
        self.config = TelemetryConfig()
        self._closed = False
        self._failed_stages: set[str] = set()
        self._dropped_total = 0
        self._lock = threading.Lock()
        self._quiet = QuietExportLogs()
        self._healths: list[ExportHealth] = []
        self._description = "none"
        self.fast_path = True  # telemetry.fast_path, unless the SDK lacks what it needs

    # -- setup --

    @classmethod
    def create(
        cls,
        config: TelemetryConfig,
        *,
        service_version: str,
        instance_id: str | None = None,
        redact: Redact | None = None,
        span_exporter: SpanExporter | None = None,
        metric_reader: MetricReader | None = None,
        access_log: TextIO | None = None,
        workers: int = 1,
        known_models: Collection[str] = (),
    ) -> Telemetry:
        self = cls()
        self.config = config
        self._redact = redact
        self._capture = config.capture_content
        if self._capture == "redacted" and redact is None:
            logger.warning(
                "telemetry: capture_content is 'redacted' but no redactor was given: "
                "prompts and completions are not captured"
            )
            self._capture = "none"
        self._models = gen.ModelBuckets(known_models)
        # client strings are redacted even when no redactor is given (default detectors)
        self._scrub = Scrubber(
            redact or Redactor(RedactionConfig()).redact_value,
            known_models,
            lambda: self._failed("client_strings"),
        )
        self._propagator = TraceContextTextMapPropagator()
        self._getter = _HeaderGetter()
        self._access = AccessLog(access_log or sys.stdout, config.log_format)
        self._resource = Resource.create(
            {
                **resource_attributes(config.resource_attributes),
                SERVICE_NAME: config.service_name,
                SERVICE_VERSION: service_version,
                SERVICE_INSTANCE_ID: instance_id or str(uuid.uuid4()),
            }
        )
        timeout_ms = config.export_timeout_s * 1000.0
        targets = otlp_targets(config, os.environ)
        scope = InstrumentationScope("tallygate", service_version)
        otlp_spans = self._choose_path(span_exporter, targets)
        # metrics first: the export plumbing counts its drops in a meter
        self._setup_metrics(metric_reader, targets, scope, workers, timeout_ms)
        self._setup_traces(span_exporter, otlp_spans, targets, scope, timeout_ms)
        # logs: the access lines, when asked for and there is somewhere to send them
        self._logger_provider: LoggerProvider | None = None
        self._otel_logger: Any = None
        if config.export_logs and config.exporter == "otlp" and "logs" in targets:
            health = self._health("logs", targets["logs"][1])
            self._logger_provider = LoggerProvider(resource=self._resource, shutdown_on_exit=False)
            self._logger_provider.add_log_record_processor(
                CountingBatchLogProcessor(
                    GuardedLogExporter(self._otlp_log_exporter(targets), health),
                    lambda n: self._dropped("logs", "queue_full", n),
                    max_queue_size=config.max_queue_size,
                    max_export_batch_size=min(512, config.max_queue_size),
                    export_timeout_millis=timeout_ms,
                    meter_provider=self._meter_provider,
                )
            )
            self._otel_logger = self._logger_provider.get_logger("tallygate.access")

        if config.exporter == "otlp":
            self._description = describe_export(config, os.environ)
        self._quiet.install()
        return self

    def _choose_path(
        self, span_exporter: SpanExporter | None, targets: Mapping[str, tuple[str | None, str]]
    ) -> SpanExporter | None:
        """Sets fast_path: the config's, unless a private SDK name the fast path needs is
        missing (then one warning, and the plain SDK objects). Returns the OTLP span
        exporter when traces go over OTLP (built first: its names are among those checked)."""
        config = self.config
        otlp_spans = None
        if span_exporter is None and config.exporter == "otlp" and "traces" in targets:
            otlp_spans = self._otlp_span_exporter(targets, fast=config.fast_path)
        self.fast_path = config.fast_path
        if not self.fast_path:
            return otlp_spans
        missing = fast_path_missing(otlp_spans if config.protocol == "http/protobuf" else None)
        if not missing:
            return otlp_spans
        logger.warning(
            "telemetry: the fast path needs %s, which opentelemetry-sdk %s lacks; "
            "using the plain SDK objects (as with telemetry.fast_path: false)",
            ", ".join(missing),
            _sdk_version(),
        )
        self.fast_path = False
        if otlp_spans is None:
            return None
        with contextlib.suppress(Exception):  # its internals may be what is missing
            otlp_spans.shutdown()
        return self._otlp_span_exporter(targets, fast=False)

    def _setup_metrics(
        self,
        metric_reader: MetricReader | None,
        targets: Mapping[str, tuple[str | None, str]],
        scope: InstrumentationScope,
        workers: int,
        timeout_ms: float,
    ) -> None:
        config = self.config
        readers: list[MetricReader] = [metric_reader] if metric_reader is not None else []
        if config.exporter == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))
        elif config.exporter == "otlp" and "metrics" in targets:
            health = self._health("metrics", targets["metrics"][1])
            readers.append(
                PeriodicExportingMetricReader(
                    GuardedMetricExporter(self._otlp_metric_exporter(targets), health),
                    export_timeout_millis=timeout_ms,
                )
            )
        # no exemplars: at finish_request no span is current, and the filter costs µs
        self._meter_provider = MeterProvider(
            metric_readers=readers,
            resource=self._resource,
            exemplar_filter=AlwaysOffExemplarFilter(),
            shutdown_on_exit=False,
        )
        meter = self._meter_provider.get_meter(scope.name, scope.version)
        # fast path: histograms aggregated by gateway/histograms.py, added to each collection
        histograms = Histograms(METRICS, self._resource, scope) if self.fast_path else None
        if histograms is not None:
            for reader in readers:
                histograms.attach(reader)
        self.prometheus = PrometheusMetrics(METRICS, workers=workers) if config.prometheus else None
        self._instruments: dict[str, Any] = {}
        for spec in METRICS:
            prom = self.prometheus.instruments[spec.name] if self.prometheus else None
            if spec.kind == "counter":
                counter = _Counter(prom)
                meter.create_observable_counter(
                    spec.name, [counter.observe], spec.unit, spec.description
                )
                self._instruments[spec.name] = counter
                continue
            record: Callable[..., None] | None = None  # without a reader, nothing to aggregate for
            if readers and histograms is not None:
                record = histograms.recorder(spec.name)
            elif readers:
                record = meter.create_histogram(
                    spec.name,
                    spec.unit,
                    spec.description,
                    explicit_bucket_boundaries_advisory=spec.buckets,
                ).record
            self._instruments[spec.name] = _Histogram(record, prom)
        i = self._instruments
        self._m_duration = i[gm.GEN_AI_CLIENT_OPERATION_DURATION]
        self._m_tokens = i[gm.GEN_AI_CLIENT_TOKEN_USAGE]
        self._m_ttfc = i[gm.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK]
        self._m_chunk = i[gm.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK]
        self._m_overhead = i[OVERHEAD]
        self._m_requests = i[REQUESTS]
        self._m_cost = i[COST]
        self._m_redactions = i[REDACTIONS]
        self._m_dropped = i[DROPPED]
        self._m_errors = i[ERRORS]

    def _setup_traces(
        self,
        span_exporter: SpanExporter | None,
        otlp_spans: SpanExporter | None,
        targets: Mapping[str, tuple[str | None, str]],
        scope: InstrumentationScope,
        timeout_ms: float,
    ) -> None:
        config = self.config
        processor: Any = None
        if span_exporter is not None:  # tests: synchronous, so spans are there at once
            health = self._health("traces", type(span_exporter).__name__)
            processor = SimpleSpanProcessor(GuardedSpanExporter(span_exporter, health))
        elif config.exporter == "console" or otlp_spans is not None:
            if otlp_spans is None:
                exporter: SpanExporter = ConsoleSpanExporter(out=sys.stderr)
                health = self._health("traces", "stderr")
                self._description = "console"
            else:
                exporter = otlp_spans
                health = self._health("traces", targets["traces"][1])
            on_drop = lambda n: self._dropped("traces", "queue_full", n)  # noqa: E731
            if self.fast_path and getattr(exporter, "fast", False):  # FastHTTPSpanExporter
                from gateway.span_export import EncodedSpanProcessor

                # spans encoded as they end, the thread only sends: no GIL bursts
                processor = EncodedSpanProcessor(
                    exporter,  # type: ignore[arg-type]
                    health,
                    on_drop,
                    max_queue_size=config.max_queue_size,
                    max_export_batch_size=min(512, config.max_queue_size),
                )
            else:
                processor = CountingBatchSpanProcessor(
                    GuardedSpanExporter(exporter, health),
                    on_drop,
                    max_queue_size=config.max_queue_size,
                    max_export_batch_size=min(512, config.max_queue_size),
                    export_timeout_millis=timeout_ms,
                    meter_provider=self._meter_provider,
                )
        # nothing to export spans to: sample nothing, so spans cost almost nothing yet
        # still carry ids for the access log and the upstream traceparent
        sampler = ALWAYS_OFF if processor is None else None
        limits = SpanLimits()  # from the OTEL_*_LIMIT environment, for both kinds of span
        self._tracer_provider = TracerProvider(
            resource=self._resource, sampler=sampler, span_limits=limits, shutdown_on_exit=False
        )
        if processor is not None:
            self._tracer_provider.add_span_processor(processor)
        self._spans: LiteTracer | PlainTracer
        if not self.fast_path:
            self._spans = PlainTracer(self._tracer_provider.get_tracer(scope.name, scope.version))
            return
        # the gateway's own spans (gateway/lite_spans.py); the provider serves instrumentation
        # (nothing to record for: no sampler to ask per span either)
        self._spans = LiteTracer(
            self._resource,
            scope,
            processor,
            self._tracer_provider.sampler if processor is not None else None,
            limits,
        )

    def _health(self, signal: str, target: str) -> ExportHealth:
        health = ExportHealth(signal, target, self._dropped, self._quiet)
        self._healths.append(health)
        return health

    def _exporter_kwargs(self, endpoint: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"timeout": self.config.export_timeout_s}
        if endpoint is not None:
            kwargs["endpoint"] = endpoint
            if self.config.protocol == "grpc":
                kwargs["insecure"] = endpoint.startswith("http://")
        if self.config.headers:
            kwargs["headers"] = dict(self.config.headers)
        return kwargs

    def _otlp_span_exporter(
        self, targets: Mapping[str, tuple[str | None, str]], *, fast: bool
    ) -> SpanExporter:
        kwargs = self._exporter_kwargs(targets["traces"][0])
        if self.config.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(**kwargs)
        if not fast:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HTTPSpanExporter,
            )

            return HTTPSpanExporter(**kwargs)
        from gateway.otlp_spans import FastHTTPSpanExporter

        return FastHTTPSpanExporter(**kwargs)

    def _otlp_metric_exporter(
        self, targets: Mapping[str, tuple[str | None, str]]
    ) -> MetricExporter:
        kwargs = self._exporter_kwargs(targets["metrics"][0])
        if self.config.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )

            return OTLPMetricExporter(**kwargs)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
            OTLPMetricExporter as HTTPMetricExporter,
        )

        return HTTPMetricExporter(**kwargs)

    def _otlp_log_exporter(
        self, targets: Mapping[str, tuple[str | None, str]]
    ) -> LogRecordExporter:
        kwargs = self._exporter_kwargs(targets["logs"][0])
        if self.config.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

            return OTLPLogExporter(**kwargs)
        from opentelemetry.exporter.otlp.proto.http._log_exporter import (
            OTLPLogExporter as HTTPLogExporter,
        )

        return HTTPLogExporter(**kwargs)

    def describe(self) -> str:
        """Where telemetry goes, for the startup line: "otlp http/protobuf → URL", "console",
        "none"."""
        return self._description

    @property
    def capture_content(self) -> bool:
        """Whether finish_request captures content: the pipeline collects
        ctx.output_text / ctx.output_tool_calls only when this is true."""
        return self._capture != "none"

    @property
    def dropped(self) -> int:
        """Telemetry items dropped so far (also the tallygate.telemetry.dropped counter)."""
        return self._dropped_total

    def instrument_client(self, client: httpx.AsyncClient) -> None:
        """With `http_spans`, trace this client's requests with our tracer provider: their
        HTTP spans nest under the attempt span and carry `traceparent` to the provider.
        Without, trace_headers() carries the attempt span's own."""
        if not self.config.http_spans:
            return
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(
            client, tracer_provider=self._tracer_provider, meter_provider=NoOpMeterProvider()
        )

    # -- guards --

    def _failed(self, stage: str) -> None:
        """An exception inside telemetry: counted, logged once per stage, never raised."""
        try:
            self._m_errors(1, {gen.TALLYGATE_STAGE: stage})
            if stage not in self._failed_stages:
                self._failed_stages.add(stage)
                logger.exception("telemetry: %s failed (logged once; requests unaffected)", stage)
        except Exception:
            pass

    def _dropped(self, signal: str, reason: str, count: int) -> None:
        try:
            with self._lock:
                self._dropped_total += count
            self._m_dropped(
                count, {gen.TALLYGATE_SIGNAL: signal, gen.TALLYGATE_DROP_REASON: reason}
            )
        except Exception:
            pass

    # -- per request --

    def start_request(self, ctx: RequestContext, headers: Mapping[str, str]) -> None:
        """The SERVER span "{method} {path}", continuing an incoming traceparent (its
        tracestate without entries the redactor flags); the user agent redacted."""
        try:
            incoming = self._propagator.extract(headers, getter=self._getter)
            parent = trace.get_current_span(incoming).get_span_context()
            span = self._spans.start_span(
                f"{ctx.method} {ctx.path}",
                parent=self._scrub.parent(ctx, parent),
                kind=SpanKind.SERVER,
                attributes=gen.server_request_attributes(
                    method=ctx.method,
                    path=ctx.path,
                    request_id=ctx.request_id,  # checked on arrival (gateway/request_ids.py)
                    user_agent=self._scrub.optional(ctx, headers.get("user-agent")),
                ),
                start_time=int(ctx.started_unix * 1e9),
            )
            ctx.trace = _RequestTrace(span)
        except Exception:
            self._failed("start_request")

    def start_attempt(self, ctx: RequestContext, attempt: Attempt) -> None:
        """The CLIENT span "{operation} {upstream model}" under the request's span."""
        try:
            state = ctx.trace
            if not isinstance(state, _RequestTrace):
                state = ctx.trace = _RequestTrace(None)
            for earlier in ctx.attempts:  # a retry/fallback closes what came before
                if earlier is not attempt and isinstance(earlier.span, _AttemptTrace):
                    self._close_attempt(ctx, earlier, final=False)
            attributes: dict[str, Any] | None = None
            if state.span is None or state.span.is_recording():
                # (in a sampled-out trace the child is not recorded either: skip the work)
                attributes = self._attempt_attributes(ctx, attempt, state)
            span = self._spans.start_span(
                f"{ctx.operation} {attempt.upstream_model}",
                parent=state.span.get_span_context() if state.span is not None else None,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                start_time=_wall_ns(ctx, attempt.started),
            )
            attempt.span = _AttemptTrace(span)
        except Exception:
            self._failed("start_attempt")

    def _attempt_attributes(
        self, ctx: RequestContext, attempt: Attempt, state: _RequestTrace
    ) -> dict[str, Any]:
        if state.request_attrs is None:  # the body's part, computed once per request
            state.request_attrs = self._scrub.attributes(
                ctx, gen.request_attributes(ctx.body, ctx.operation)
            )
        attributes = dict(state.request_attrs)
        attributes.update(
            gen.attempt_attributes(
                operation=ctx.operation,
                upstream_model=attempt.upstream_model,
                provider_kind=attempt.provider_kind,
                server_address=attempt.server_address,
                server_port=attempt.server_port,
                number=attempt.number,
                deployment=attempt.deployment,
                stream=ctx.stream,
            )
        )
        return attributes

    def use_attempt(self, attempt: Attempt) -> contextlib.AbstractContextManager[None]:
        """The attempt span as the current span (not ended on exit), so the httpx
        instrumentation's span nests under it. Exceptions of the body pass through."""
        if not self.config.http_spans:
            return _NOTHING  # no instrumentation to see the current span
        return _CurrentSpan(self, attempt.span)

    def trace_headers(self, attempt: Attempt) -> dict[str, str]:
        """W3C trace context for the upstream request: the attempt span as the parent.
        Empty with `http_spans` (the instrumentation injects its own span's) or no span."""
        state = attempt.span
        if self.config.http_spans or not isinstance(state, _AttemptTrace):
            return {}
        try:
            sc = state.span.get_span_context()
            if not sc.is_valid:
                return {}
            headers = {
                "traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
            }
            if sc.trace_state:
                headers["tracestate"] = sc.trace_state.to_header()
            return headers
        except Exception:
            self._failed("trace_headers")
            return {}

    def end_attempt(self, ctx: RequestContext, attempt: Attempt) -> None:
        """Ends the attempt: a failure sets error.type and ERROR status and ends the
        span now; a success fixes the end time and leaves response, usage and content
        to finish_request. Idempotent."""
        try:
            self._end_attempt(ctx, attempt, time.perf_counter())
        except Exception:
            self._failed("end_attempt")

    def _end_attempt(self, ctx: RequestContext, attempt: Attempt, now: float) -> None:
        state = attempt.span
        if not isinstance(state, _AttemptTrace) or state.end_ns is not None:
            return
        state.end_ns = _wall_ns(ctx, attempt.ended if attempt.ended is not None else now)
        if attempt.status and state.span.is_recording():  # the HTTP call's outcome
            state.span.set_attribute(HTTP_RESPONSE_STATUS_CODE, attempt.status)
        error = gen.error_attributes(attempt.error_type, attempt.status)
        if error:
            state.failed = True
            span = state.span
            span.set_attributes(error)
            span.set_status(Status(StatusCode.ERROR, error[ERROR_TYPE]))
            self._close_attempt(ctx, attempt, final=False)

    def _close_attempt(
        self,
        ctx: RequestContext,
        attempt: Attempt,
        *,
        final: bool,
        content: Mapping[str, str] | None = None,
    ) -> None:
        state = attempt.span
        if not isinstance(state, _AttemptTrace) or state.closed:
            return
        if state.end_ns is None:
            self._end_attempt(ctx, attempt, time.perf_counter())
            if state.closed:
                return
        state.closed = True
        span = state.span
        if final and not state.failed and ctx.error_type and 0 < ctx.status < 400:
            # the response had started (a stream) and then broke: the attempt failed
            span.set_attribute(ERROR_TYPE, ctx.error_type)
            span.set_status(Status(StatusCode.ERROR, ctx.error_type))
        if not state.failed and span.is_recording():
            ttfc = None
            if (
                ctx.stream
                and ctx.first_chunk_at is not None
                and ctx.first_chunk_at >= attempt.started
            ):
                ttfc = ctx.first_chunk_at - attempt.started
            span.set_attributes(
                gen.response_attributes(
                    response_id=ctx.response_id,
                    response_model=ctx.response_model,
                    finish_reasons=ctx.finish_reasons,
                    usage=ctx.usage,
                    time_to_first_chunk_s=ttfc,
                )
            )
        if content and final:
            span.set_attributes(content)
        span.end(end_time=state.end_ns)

    def reconfigure(self, *, redact: Redact, known_models: Collection[str]) -> None:
        """A config reload: the new redaction rules for what is exported, and the model
        names kept as they are (exporters and the other settings stay until a restart)."""
        self._redact = redact
        self._models = gen.ModelBuckets(known_models)
        self._scrub = Scrubber(redact, known_models, lambda: self._failed("client_strings"))

    def count(self, event: str, ctx: RequestContext, **attrs: Any) -> None:
        """Counts a pipeline event: "retry", "fallback" (attrs deployment=, error_type=,
        defaulting to the current attempt's), "rejection" (kind="budget"|"rate_limit"),
        "store_error"; any other name goes to tallygate.events. Keep attrs
        low-cardinality: other keys become tallygate.<key> attributes."""
        try:
            principal = ctx.principal
            attributes: dict[str, Any] = {
                gen.TALLYGATE_TEAM: principal.team if principal else gen.NO_TEAM
            }
            name = _EVENT_COUNTERS.get(event)
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
                attributes[_EVENT_KEYS.get(key, f"tallygate.{key}")] = str(value)
            self._instruments[name](1, attributes)
        except Exception:
            self._failed("count")

    def record_chunk_gap(self, ctx: RequestContext, seconds: float) -> None:
        """gen_ai.client.operation.time_per_output_chunk: each chunk after the first."""
        try:
            state = ctx.trace
            attributes = state.chunk_attrs if isinstance(state, _RequestTrace) else None
            if attributes is None:
                attributes = self._genai_metric_attrs(ctx, ctx.attempt, response=False)
                if isinstance(state, _RequestTrace):
                    state.chunk_attrs = attributes
            self._m_chunk(seconds, attributes)
        except Exception:
            self._failed("record_chunk_gap")

    def finish_request(self, ctx: RequestContext) -> None:
        """Ends the request: open attempt spans, content capture, the SERVER span,
        metrics, one access line (and its OTLP log record)."""
        state = ctx.trace if isinstance(ctx.trace, _RequestTrace) else None
        if state is not None:
            if state.finished:
                return
            state.finished = True
        now = time.perf_counter()
        elapsed = max(0.0, now - ctx.started)
        overhead = max(0.0, elapsed - ctx.upstream_wait_s)
        end_unix = ctx.started_unix + elapsed
        # redacted once, before the spans and the line that carry them
        client = ClientStrings(WITHHELD, WITHHELD)
        try:
            client = ClientStrings(
                self._scrub.model(ctx, ctx.requested_model),
                self._scrub.optional(ctx, ctx.error_message),
            )
        except Exception:
            self._failed("finish_request.client_strings")
        try:
            self._finish_spans(ctx, state, now, overhead, client)
        except Exception:
            self._failed("finish_request.spans")
            self._end_leftovers(ctx, state, now)
        try:
            self._record_metrics(ctx, elapsed, overhead)
        except Exception:
            self._failed("finish_request.metrics")
        try:
            self._write_access(ctx, state, end_unix, elapsed, overhead, client)
        except Exception:
            self._failed("finish_request.access_log")

    def _finish_spans(
        self,
        ctx: RequestContext,
        state: _RequestTrace | None,
        now: float,
        overhead: float,
        client: ClientStrings,
    ) -> None:
        last = ctx.attempts[-1] if ctx.attempts else None
        last_state = last.span if last is not None else None
        if isinstance(last_state, _AttemptTrace) and last_state.end_ns is None:
            self._end_attempt(ctx, last, now)  # may close it, if it failed
        on_attempt = isinstance(last_state, _AttemptTrace) and not last_state.closed
        server = state.span if state is not None else None
        target = last_state.span if on_attempt else server  # where content goes
        content = None
        if self._capture != "none" and target is not None and target.is_recording():
            try:
                content = self._content(ctx)
            except Exception:  # e.g. the redactor failed: capture nothing, end the spans
                self._failed("content")
        for attempt in ctx.attempts:
            if attempt is last:
                self._close_attempt(ctx, attempt, final=True, content=content)
            else:
                self._close_attempt(ctx, attempt, final=False)
        span = server
        if span is None:
            return
        if content and not on_attempt:
            span.set_attributes(content)
        if not span.is_recording():
            span.end(end_time=_wall_ns(ctx, now))
            return
        attributes = gen.status_attributes(ctx.status)
        error = gen.error_attributes(ctx.error_type, ctx.status if ctx.status >= 500 else None)
        attributes.update(error)
        principal = ctx.principal
        if principal is not None:
            attributes[gen.TALLYGATE_TEAM] = principal.team
            attributes[gen.TALLYGATE_KEY] = principal.key_name
        if client.model:
            attributes[gen.TALLYGATE_MODEL] = client.model
        if last is not None:
            attributes[gen.TALLYGATE_DEPLOYMENT] = last.deployment
        attributes[gen.TALLYGATE_ATTEMPTS] = len(ctx.attempts)
        if ctx.cost_nano is not None:
            attributes[gen.TALLYGATE_COST_USD] = ctx.cost_nano / 1e9
        if ctx.pricing_version:
            attributes[gen.TALLYGATE_PRICING_VERSION] = ctx.pricing_version
        if ctx.budget_remaining_nano is not None:
            attributes[gen.TALLYGATE_BUDGET_REMAINING_USD] = ctx.budget_remaining_nano / 1e9
        if ctx.usage is not None:
            attributes[gen.TALLYGATE_TOKENS_ESTIMATED] = ctx.usage.estimated
        for kind, n in ctx.redactions.items():
            attributes[gen.TALLYGATE_REDACTIONS_PREFIX + kind] = n
        attributes[gen.TALLYGATE_OVERHEAD_MS] = round(overhead * 1000.0, 3)
        if ctx.stream:
            attributes[gen.TALLYGATE_STREAM] = True
        if ctx.cancelled:
            attributes[gen.TALLYGATE_CANCELLED] = True
        if ctx.usage_anomalies:
            attributes[gen.TALLYGATE_USAGE_ANOMALIES] = list(ctx.usage_anomalies)
        if ctx.rejected:
            attributes[gen.TALLYGATE_REJECTED] = ctx.rejected
        span.set_attributes(attributes)
        if ctx.status >= 500 or (ctx.error_type and 0 < ctx.status < 400):
            span.set_status(Status(StatusCode.ERROR, client.error_message or error.get(ERROR_TYPE)))
        span.end(end_time=_wall_ns(ctx, now))

    def _end_leftovers(self, ctx: RequestContext, state: _RequestTrace | None, now: float) -> None:
        """After a failure in _finish_spans: end whatever is still open, plainly."""
        end = _wall_ns(ctx, now)
        spans = [a.span.span for a in ctx.attempts if isinstance(a.span, _AttemptTrace)]
        if state is not None and state.span is not None:
            spans.append(state.span)
        for span in spans:
            with contextlib.suppress(Exception):
                if span.is_recording():
                    span.end(end_time=end)

    def _content(self, ctx: RequestContext) -> dict[str, str] | None:
        """The content attributes, redacted (mode "redacted") and serialized as JSON."""
        raw = gen.content_attributes(
            ctx.body,
            ctx.operation,
            ctx.output_text,
            ctx.output_tool_calls,
            ctx.finish_reasons,
            has_output=bool(ctx.output_text or ctx.output_tool_calls),
        )
        if not raw:
            return None
        if self._capture == "redacted":
            redact = self._redact
            if redact is None:  # create() turns capture off without one
                return None
            raw, counts = redact(raw)
            for kind, n in counts.items():
                if n:
                    ctx.redactions[kind] = ctx.redactions.get(kind, 0) + n
        return {key: _dumps(value) for key, value in raw.items()}

    def _genai_metric_attrs(
        self, ctx: RequestContext, attempt: Attempt | None, *, response: bool = True
    ) -> dict[str, Any]:
        attributes: dict[str, Any] = {ga.GEN_AI_OPERATION_NAME: ctx.operation}
        if attempt is not None:
            attributes[ga.GEN_AI_PROVIDER_NAME] = gen.provider_name(attempt.provider_kind)
            attributes[ga.GEN_AI_REQUEST_MODEL] = self._models(attempt.upstream_model)
            if attempt.server_address:
                attributes[SERVER_ADDRESS] = attempt.server_address
                if attempt.server_port:
                    attributes[SERVER_PORT] = attempt.server_port
        if response and ctx.response_model:
            attributes[ga.GEN_AI_RESPONSE_MODEL] = self._models(ctx.response_model)
        return attributes

    def _record_metrics(self, ctx: RequestContext, elapsed: float, overhead: float) -> None:
        principal = ctx.principal
        team = principal.team if principal else gen.NO_TEAM
        error = gen.error_attributes(ctx.error_type, ctx.status)
        model = self._models(ctx.requested_model)
        requests = {
            HTTP_RESPONSE_STATUS_CODE: ctx.status,
            gen.TALLYGATE_TEAM: team,
            ga.GEN_AI_OPERATION_NAME: ctx.operation,
            gen.TALLYGATE_MODEL: model,
        }
        requests.update(error)
        self._m_requests(1, requests)
        self._m_overhead(overhead, {ga.GEN_AI_OPERATION_NAME: ctx.operation})
        last = ctx.attempts[-1] if ctx.attempts else None
        if last is not None:  # the gateway acted as a GenAI client
            genai = self._genai_metric_attrs(ctx, last)
            self._m_duration(elapsed, {**genai, **error} if error else genai)
            if ctx.stream and ctx.first_chunk_at is not None:
                self._m_ttfc(max(0.0, ctx.first_chunk_at - ctx.started), genai)
            usage = ctx.usage
            if usage is not None:
                genai[gen.TALLYGATE_TEAM] = team
                genai[ga.GEN_AI_TOKEN_TYPE] = ga.GenAiTokenTypeValues.INPUT.value
                self._m_tokens(usage.input_tokens, genai)
                if ctx.operation != ga.GenAiOperationNameValues.EMBEDDINGS.value:
                    genai[ga.GEN_AI_TOKEN_TYPE] = ga.GenAiTokenTypeValues.OUTPUT.value
                    self._m_tokens(usage.output_tokens, genai)
        if ctx.cost_nano:
            self._m_cost(
                ctx.cost_nano / 1e9,
                {
                    gen.TALLYGATE_TEAM: team,
                    gen.TALLYGATE_MODEL: model,
                    ga.GEN_AI_REQUEST_MODEL: self._models(last.upstream_model) if last else "",
                },
            )
        for kind, n in ctx.redactions.items():
            if n:
                self._m_redactions(
                    n, {gen.TALLYGATE_TEAM: team, gen.TALLYGATE_REDACTION_TYPE: kind}
                )

    def _write_access(
        self,
        ctx: RequestContext,
        state: _RequestTrace | None,
        end_unix: float,
        elapsed: float,
        overhead: float,
        client: ClientStrings,
    ) -> None:
        trace_id = span_id = None
        span = state.span if state is not None else None
        if span is not None:
            sc = span.get_span_context()
            if sc.is_valid:
                trace_id = format(sc.trace_id, "032x")
                span_id = format(sc.span_id, "016x")
        record = access_record(
            ctx,
            trace_id=trace_id,
            span_id=span_id,
            end_unix=end_unix,
            latency_s=elapsed,
            overhead_s=overhead,
            client=client,
        )
        self._access.write(record)
        if self._otel_logger is not None:
            self._otel_logger.emit(
                timestamp=int(end_unix * 1e9),
                context=_as_context(state.span) if state is not None else None,
                severity_number=SeverityNumber.INFO,
                severity_text="INFO",
                body={k: v for k, v in record.items() if v is not None},
                event_name="tallygate.access",
            )

    def metrics_text(self) -> tuple[bytes, str] | None:
        """The Prometheus exposition (body, content type), or None when it is off."""
        return self.prometheus.render() if self.prometheus is not None else None

    # -- shutdown --

    async def shutdown(self) -> None:
        """Flushes and shuts down the providers in a thread, so the event loop never
        blocks; returns within a bound even when the backend is dead (what could not be
        exported by then is dropped and counted)."""
        if self._closed:
            return
        self._closed = True
        self._access.flush()
        for health in self._healths:
            health.shutting_down = True
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def work() -> None:
            try:
                self._shutdown_blocking()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone already
                    loop.call_soon_threadsafe(settle)

        threading.Thread(target=work, name="tallygate-telemetry-shutdown", daemon=True).start()
        bound = 3 * self.config.export_timeout_s + 2.0
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout=bound)
        except TimeoutError:
            logger.warning(
                "telemetry: shutdown still flushing after %.1fs; not waiting for it", bound
            )

    def _shutdown_blocking(self) -> None:
        timeout_ms = int(self.config.export_timeout_s * 1000)
        for name, step in (
            ("traces", self._tracer_provider.shutdown),
            ("logs", self._logger_provider.shutdown if self._logger_provider else None),
            ("metrics", lambda: self._meter_provider.shutdown(timeout_millis=timeout_ms)),
        ):
            if step is None:
                continue
            try:
                step()
            except Exception:
                logger.warning("telemetry: shutting down %s failed", name, exc_info=True)
        self._quiet.remove()
        if self._dropped_total:
            logger.warning(
                "telemetry: %d telemetry items were dropped (%s)", self._dropped_total, DROPPED
            )
