"""Telemetry: traces, metrics and the access log of every request; this module sets them
up for the process (Telemetry) and hands out each request's record.

    rec = gw.telemetry.start_request(ctx, headers)   # gateway/telemetry/record.py

What lives where:
- gateway/telemetry/config.py: the `telemetry:` config and where it sends telemetry (no
  SDK import: gateway.config reads it);
- gateway/telemetry/record.py: one request's record (its spans, the figures computed once
  at finish, metrics and the access line), guarded so telemetry never fails a request;
- gateway/telemetry/instruments.py: the metrics (METRICS) and their instruments;
- gateway/telemetry/otlp.py: the OTLP exporters of each signal;
- gateway/telemetry/export.py: the export plumbing (one warning per outage, every drop
  counted); gateway/telemetry/semconv.py: what the attributes are (pure);
  gateway/telemetry/access_log.py: the access line; gateway/telemetry/prometheus.py: /metrics.

Strings a client controls (the model it asks for, its user agent and tracestate, some body
fields, error messages quoting them) pass the redactor before any span or line carries
them (gateway.pipeline.client_strings).

The gateway's own spans, its histograms and the OTLP/HTTP span encoding take a fast path
(gateway/telemetry/fast/lite_spans.py, histograms.py, otlp_spans.py, span_export.py) that relies on a
few private SDK names; `telemetry.fast_path: false`, or one of those names missing at
start, uses the plain SDK objects instead, with the same telemetry.

Exporting never slows a request: spans and logs go through batch processors with
bounded queues to a background thread; a dead or slow backend only costs dropped
telemetry, counted in `tallygate.telemetry.dropped`, and one warning per outage instead
of the exporters' per-batch error logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import uuid
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.semconv._incubating.attributes.service_attributes import (
    SERVICE_INSTANCE_ID,
)
from opentelemetry.semconv.attributes.service_attributes import SERVICE_NAME, SERVICE_VERSION

from gateway.pipeline.client_strings import Redact
from gateway.telemetry import otlp
from gateway.telemetry import semconv as gen
from gateway.telemetry.access_log import AccessLog
from gateway.telemetry.config import Targets, TelemetryConfig, describe_export, otlp_targets
from gateway.telemetry.export import (
    CountingBatchLogProcessor,
    CountingBatchSpanProcessor,
    ExportHealth,
    GuardedLogExporter,
    GuardedMetricExporter,
    GuardedSpanExporter,
    QuietExportLogs,
)
from gateway.telemetry.fast.histograms import Histograms
from gateway.telemetry.fast.lite_spans import LiteTracer, PlainTracer
from gateway.telemetry.instruments import (
    DROPPED,
    DURATION_BUCKETS,
    METRICS,
    OVERHEAD_BUCKETS,
    TOKEN_BUCKETS,
    Instruments,
)
from gateway.telemetry.otlp import fast_path_missing, resource_attributes
from gateway.telemetry.prometheus import PrometheusMetrics, prepare_multiprocess
from gateway.telemetry.record import Recorder, RequestRecord, count_event, start_request

if TYPE_CHECKING:
    import httpx

    from gateway.pipeline.context import RequestContext

__all__ = [
    "DURATION_BUCKETS",
    "METRICS",
    "OVERHEAD_BUCKETS",
    "TOKEN_BUCKETS",
    "RequestRecord",
    "Telemetry",
    "TelemetryConfig",
    "describe_export",
    "fast_path_missing",
    "otlp_targets",
    "prepare_multiprocess",
    "resource_attributes",
]

logger = logging.getLogger("gateway.telemetry.facade")


class Telemetry:
    """Traces, metrics and access log of one gateway process: its providers, exporters
    and instruments. Build with `create`; each request gets a record from start_request."""

    def __init__(
        self,
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
    ) -> None:
        """See `create`."""
        self.config = config
        self._closed = False
        self._dropped_total = 0
        self._lock = threading.Lock()
        self._quiet = QuietExportLogs()
        self._healths: list[ExportHealth] = []
        self._description = "none"
        self.fast_path = config.fast_path  # unless the SDK lacks what it needs (_choose_path)
        capture = config.capture_content
        if capture == "redacted" and redact is None:
            logger.warning(
                "telemetry: capture_content is 'redacted' but no redactor was given: "
                "prompts and completions are not captured"
            )
            capture = "none"
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
        self._meter_provider, self.prometheus, self._instruments = self._setup_metrics(
            metric_reader, targets, scope, workers, timeout_ms
        )
        self._tracer_provider, spans = self._setup_traces(
            span_exporter, otlp_spans, targets, scope, timeout_ms
        )
        self._logger_provider = self._setup_logs(targets, timeout_ms)
        self._recorder = Recorder(
            spans=spans,
            instruments=self._instruments,
            access=self._access,
            otel_logger=(
                self._logger_provider.get_logger("tallygate.access")
                if self._logger_provider is not None
                else None
            ),
            capture=capture,
            http_spans=config.http_spans,
            redact=redact,
            known_models=known_models,
        )
        if config.exporter == "otlp":
            self._description = describe_export(config, os.environ)
        self._quiet.install()

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
        """The process's telemetry. `redact`: the redactor for content and client strings
        (without one, client strings get the default detectors and content capture
        "redacted" is off); `span_exporter` / `metric_reader`: tests' in-memory ones, in
        addition to (metrics) or instead of (spans) the configured export; `access_log`:
        stdout unless given; `known_models`: the model names kept as they are in metric
        attributes (others become _OTHER)."""
        return cls(
            config,
            service_version=service_version,
            instance_id=instance_id,
            redact=redact,
            span_exporter=span_exporter,
            metric_reader=metric_reader,
            access_log=access_log,
            workers=workers,
            known_models=known_models,
        )

    # -- setup --

    def _choose_path(
        self, span_exporter: SpanExporter | None, targets: Targets
    ) -> SpanExporter | None:
        """Sets fast_path: the config's, unless a private SDK name the fast path needs is
        missing (then one warning, and the plain SDK objects). Returns the OTLP span
        exporter when traces go over OTLP (built first: its names are among those checked)."""
        config = self.config
        otlp_spans = None
        if span_exporter is None and config.exporter == "otlp" and "traces" in targets:
            otlp_spans = otlp.span_exporter(config, targets, fast=config.fast_path)
        if not self.fast_path:
            return otlp_spans
        missing = fast_path_missing(otlp_spans if config.protocol == "http/protobuf" else None)
        if not missing:
            return otlp_spans
        logger.warning(
            "telemetry: the fast path needs %s, which opentelemetry-sdk %s lacks; "
            "using the plain SDK objects (as with telemetry.fast_path: false)",
            ", ".join(missing),
            otlp.sdk_version(),
        )
        self.fast_path = False
        if otlp_spans is None:
            return None
        with contextlib.suppress(Exception):  # its internals may be what is missing
            otlp_spans.shutdown()
        return otlp.span_exporter(config, targets, fast=False)

    def _setup_metrics(
        self,
        metric_reader: MetricReader | None,
        targets: Targets,
        scope: InstrumentationScope,
        workers: int,
        timeout_ms: float,
    ) -> tuple[MeterProvider, PrometheusMetrics | None, Instruments]:
        config = self.config
        readers: list[MetricReader] = [metric_reader] if metric_reader is not None else []
        if config.exporter == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter(out=sys.stderr)))
        elif config.exporter == "otlp" and "metrics" in targets:
            health = self._health("metrics", targets["metrics"][1])
            readers.append(
                PeriodicExportingMetricReader(
                    GuardedMetricExporter(otlp.metric_exporter(config, targets), health),
                    export_timeout_millis=timeout_ms,
                )
            )
        # no exemplars: at finish no span is current, and the filter costs µs
        provider = MeterProvider(
            metric_readers=readers,
            resource=self._resource,
            exemplar_filter=AlwaysOffExemplarFilter(),
            shutdown_on_exit=False,
        )
        # fast path: histograms aggregated by gateway/telemetry/fast/histograms.py, added to each collection
        histograms = Histograms(METRICS, self._resource, scope) if self.fast_path else None
        if histograms is not None:
            for reader in readers:
                histograms.attach(reader)
        prometheus = PrometheusMetrics(METRICS, workers=workers) if config.prometheus else None
        instruments = Instruments(
            provider.get_meter(scope.name, scope.version),
            exported=bool(readers),
            histograms=histograms,
            prometheus=prometheus,
        )
        return provider, prometheus, instruments

    def _setup_traces(
        self,
        span_exporter: SpanExporter | None,
        otlp_spans: SpanExporter | None,
        targets: Targets,
        scope: InstrumentationScope,
        timeout_ms: float,
    ) -> tuple[TracerProvider, LiteTracer | PlainTracer]:
        processor = self._span_processor(span_exporter, otlp_spans, targets, timeout_ms)
        # nothing to export spans to: sample nothing, so spans cost almost nothing yet
        # still carry ids for the access log and the upstream traceparent
        sampler = ALWAYS_OFF if processor is None else None
        limits = SpanLimits()  # from the OTEL_*_LIMIT environment, for both kinds of span
        provider = TracerProvider(
            resource=self._resource, sampler=sampler, span_limits=limits, shutdown_on_exit=False
        )
        if processor is not None:
            provider.add_span_processor(processor)
        if not self.fast_path:
            return provider, PlainTracer(provider.get_tracer(scope.name, scope.version))
        # the gateway's own spans (gateway/telemetry/fast/lite_spans.py); the provider serves instrumentation
        # (nothing to record for: no sampler to ask per span either)
        spans = LiteTracer(
            self._resource,
            scope,
            processor,
            provider.sampler if processor is not None else None,
            limits,
        )
        return provider, spans

    def _span_processor(
        self,
        span_exporter: SpanExporter | None,
        otlp_spans: SpanExporter | None,
        targets: Targets,
        timeout_ms: float,
    ) -> SpanProcessor | None:
        config = self.config
        if span_exporter is not None:  # tests: synchronous, so spans are there at once
            health = self._health("traces", type(span_exporter).__name__)
            return SimpleSpanProcessor(GuardedSpanExporter(span_exporter, health))
        if config.exporter != "console" and otlp_spans is None:
            return None
        if otlp_spans is None:
            exporter: SpanExporter = ConsoleSpanExporter(out=sys.stderr)
            health = self._health("traces", "stderr")
            self._description = "console"
        else:
            exporter = otlp_spans
            health = self._health("traces", targets["traces"][1])
        on_drop = self._spans_dropped
        if self.fast_path and getattr(exporter, "fast", False):  # FastHTTPSpanExporter
            from gateway.telemetry.fast.span_export import EncodedSpanProcessor

            # spans encoded as they end, the thread only sends: no GIL bursts
            return EncodedSpanProcessor(
                exporter,  # type: ignore[arg-type]
                health,
                on_drop,
                max_queue_size=config.max_queue_size,
                max_export_batch_size=min(512, config.max_queue_size),
            )
        return CountingBatchSpanProcessor(
            GuardedSpanExporter(exporter, health),
            on_drop,
            max_queue_size=config.max_queue_size,
            max_export_batch_size=min(512, config.max_queue_size),
            export_timeout_millis=timeout_ms,
            meter_provider=self._meter_provider,
        )

    def _setup_logs(self, targets: Targets, timeout_ms: float) -> LoggerProvider | None:
        """The access lines as OTLP logs, when asked for and there is somewhere to send them."""
        config = self.config
        if not (config.export_logs and config.exporter == "otlp" and "logs" in targets):
            return None
        health = self._health("logs", targets["logs"][1])
        provider = LoggerProvider(resource=self._resource, shutdown_on_exit=False)
        provider.add_log_record_processor(
            CountingBatchLogProcessor(
                GuardedLogExporter(otlp.log_exporter(config, targets), health),
                self._logs_dropped,
                max_queue_size=config.max_queue_size,
                max_export_batch_size=min(512, config.max_queue_size),
                export_timeout_millis=timeout_ms,
                meter_provider=self._meter_provider,
            )
        )
        return provider

    def _health(self, signal: str, target: str) -> ExportHealth:
        health = ExportHealth(signal, target, self._dropped, self._quiet)
        self._healths.append(health)
        return health

    def describe(self) -> str:
        """Where telemetry goes, for the startup line: "otlp http/protobuf → URL", "console",
        "none"."""
        return self._description

    @property
    def capture_content(self) -> bool:
        """Whether a request's record captures content at finish: the pipeline collects
        ctx.output_text / ctx.output_tool_calls only when this is true."""
        return self._recorder.capture != "none"

    @property
    def dropped(self) -> int:
        """Telemetry items dropped so far (also the tallygate.telemetry.dropped counter)."""
        return self._dropped_total

    def instrument_client(self, client: httpx.AsyncClient) -> None:
        """With `http_spans`, trace this client's requests with our tracer provider: their
        HTTP spans nest under the attempt span and carry `traceparent` to the provider.
        Without, each attempt's record gives its own span's (AttemptRecord.trace_headers)."""
        if not self.config.http_spans:
            return
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(
            client, tracer_provider=self._tracer_provider, meter_provider=NoOpMeterProvider()
        )

    def reconfigure(self, *, redact: Redact, known_models: Collection[str]) -> None:
        """A config reload: the new redaction rules for what is exported, and the model
        names kept as they are (exporters and the other settings stay until a restart)."""
        self._recorder.reconfigure(redact, known_models)

    def _dropped(self, signal: str, reason: str, count: int) -> None:
        try:
            with self._lock:
                self._dropped_total += count
            self._instruments.dropped(
                count, {gen.TALLYGATE_SIGNAL: signal, gen.TALLYGATE_DROP_REASON: reason}
            )
        except Exception:
            pass

    def _spans_dropped(self, count: int) -> None:
        self._dropped("traces", "queue_full", count)

    def _logs_dropped(self, count: int) -> None:
        self._dropped("logs", "queue_full", count)

    # -- per request --

    def start_request(self, ctx: RequestContext, headers: Mapping[str, str]) -> RequestRecord:
        """The request's record (also ctx.trace), its SERVER span "{method} {path}" started,
        continuing an incoming traceparent. Never raises; see gateway/telemetry/record.py."""
        record = ctx.trace = start_request(self._recorder, ctx, headers)
        return record

    def count(self, event: str, ctx: RequestContext, **attrs: Any) -> None:
        """Counts a pipeline event for `ctx` (RequestRecord.count, for callers that hold
        the context rather than its record, as the budget alerts do)."""
        count_event(self._recorder, ctx, event, attrs)

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
        logs = self._logger_provider
        for name, step in (
            ("traces", self._tracer_provider.shutdown),
            ("logs", logs.shutdown if logs is not None else None),
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
