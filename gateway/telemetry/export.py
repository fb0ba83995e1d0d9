"""Telemetry export plumbing: exporters and batch processors that count what they drop and
keep a dead backend quiet (one warning when it fails, one line when it recovers)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

from opentelemetry.sdk._logs.export import (
    BatchLogRecordProcessor,
    LogRecordExporter,
    LogRecordExportResult,
)
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

logger = logging.getLogger("gateway.telemetry.facade")


def reaches(owner: object, path: str) -> bool:
    """Whether `owner.path` (dotted) exists."""
    for name in path.split("."):
        if not hasattr(owner, name):
            return False
        owner = getattr(owner, name)
    return True


def missing_names(pairs: Iterable[tuple[object, str]]) -> list[str]:
    """The (object, attribute path) pairs that do not exist, as "Owner.path"."""
    out = []
    for owner, path in pairs:
        if not reaches(owner, path):
            kind = owner if isinstance(owner, type | ModuleType) else type(owner)
            out.append(f"{getattr(kind, '__qualname__', kind.__name__)}.{path}")
    return out


def private_sdk_names() -> list[tuple[object, str]]:
    """What the export plumbing below reads that the SDK (1.45) keeps private, in both
    telemetry modes; each is read with a fallback (so a rename degrades, never stops the
    gateway), and tests/test_telemetry_fast_path.py fails when one is gone."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = OTLPMetricExporter(endpoint="http://127.0.0.1:9/v1/metrics")
    processor = BatchSpanProcessor(InMemorySpanExporter())
    try:
        return [
            # the temporality/aggregation a periodic reader takes from its exporter
            (exporter, "_preferred_temporality"),
            (exporter, "_preferred_aggregation"),
            # the batch queue and its bound, to count queue-full drops
            (processor, "_batch_processor._queue"),
            (processor, "_batch_processor._max_queue_size"),
        ]
    finally:
        processor.shutdown()  # type: ignore[no-untyped-call]
        exporter.shutdown()


NOISY_LOGGERS = (
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.metric_exporter",
    "opentelemetry.exporter.otlp.proto.grpc._log_exporter",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.metrics._internal.export",
    "opentelemetry.sdk._logs._internal.export",
    "opentelemetry.sdk.trace.export",
)


class QuietExportLogs(logging.Filter):
    """Swallows the exporters' warnings and errors, keeping the last one's text for the
    single warning ExportHealth logs when exporting starts to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.last_message = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            with contextlib.suppress(Exception):
                self.last_message = record.getMessage()[:300]
            return False
        return True

    def install(self) -> None:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).removeFilter(self)


class ExportHealth:
    """Per signal: counts what is dropped, logs once when exporting fails and once when
    it recovers; during shutdown, once the backend is known dead, drops at once."""

    def __init__(
        self,
        signal: str,
        target: str,
        on_drop: Callable[[str, str, int], None],
        quiet: QuietExportLogs,
    ) -> None:
        self.signal = signal
        self.target = target
        self._on_drop = on_drop
        self._quiet = quiet
        self.failing = False
        self.shutting_down = False

    def skip(self) -> bool:
        return self.shutting_down and self.failing

    def succeeded(self) -> None:
        if self.failing:
            self.failing = False
            logger.info("telemetry: exporting %s to %s recovered", self.signal, self.target)

    def failed(self, count: int, reason: str = "export_failed") -> None:
        self._on_drop(self.signal, reason, count)
        quiet = self._quiet
        detail, quiet.last_message = quiet.last_message, ""  # the exporter's own last word
        if not self.failing:
            self.failing = True
            logger.warning(
                "telemetry: exporting %s to %s failed (%s); dropping telemetry and counting it "
                "in %s, further export errors are not logged until it recovers",
                self.signal,
                self.target,
                detail or reason,
                "tallygate.telemetry.dropped",
            )


class GuardedSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, health: ExportHealth) -> None:
        self._inner = inner
        self._health = health

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._health.skip():
            self._health.failed(len(spans), "shutdown")
            return SpanExportResult.FAILURE
        try:
            result = self._inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._health.succeeded()
        else:
            self._health.failed(len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class GuardedLogExporter(LogRecordExporter):
    def __init__(self, inner: LogRecordExporter, health: ExportHealth) -> None:
        self._inner = inner
        self._health = health

    def export(self, batch: Sequence[Any]) -> LogRecordExportResult:
        if self._health.skip():
            self._health.failed(len(batch), "shutdown")
            return LogRecordExportResult.FAILURE
        try:
            result = self._inner.export(batch)
        except Exception:
            result = LogRecordExportResult.FAILURE
        if result is LogRecordExportResult.SUCCESS:
            self._health.succeeded()
        else:
            self._health.failed(len(batch))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def count_points(data: MetricsData) -> int:
    return sum(
        len(metric.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    )


class GuardedMetricExporter(MetricExporter):
    def __init__(self, inner: MetricExporter, health: ExportHealth) -> None:
        # the periodic reader reads these (private) preferences off its exporter; without
        # them, the SDK's defaults (cumulative)
        super().__init__(
            preferred_temporality=getattr(inner, "_preferred_temporality", None),
            preferred_aggregation=getattr(inner, "_preferred_aggregation", None),
        )
        self._inner = inner
        self._health = health

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if self._health.skip():
            self._health.failed(count_points(metrics_data), "shutdown")
            return MetricExportResult.FAILURE
        try:
            result = self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
        except Exception:
            result = MetricExportResult.FAILURE
        if result is MetricExportResult.SUCCESS:
            self._health.succeeded()
        else:
            self._health.failed(count_points(metrics_data))
        return result

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis=timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def queue_of(processor: Any) -> tuple[Any, int]:
    # BatchProcessor's deque and bound (private in the SDK; without them, only failed
    # exports are counted, not queue-full drops)
    inner = getattr(processor, "_batch_processor", None)
    return getattr(inner, "_queue", None), getattr(inner, "_max_queue_size", 0)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """Counts the spans a full queue drops (the SDK only logs them)."""

    def __init__(self, exporter: SpanExporter, on_drop: Callable[[int], None], **kwargs: Any):
        super().__init__(exporter, **kwargs)
        self._on_drop = on_drop
        self._queue, self._max = queue_of(self)

    def on_end(self, span: ReadableSpan) -> None:
        queue = self._queue
        if queue is not None and len(queue) >= self._max and span.context.trace_flags.sampled:
            self._on_drop(1)
        super().on_end(span)


class CountingBatchLogProcessor(BatchLogRecordProcessor):
    def __init__(self, exporter: LogRecordExporter, on_drop: Callable[[int], None], **kwargs: Any):
        super().__init__(exporter, **kwargs)
        self._on_drop = on_drop
        self._queue, self._max = queue_of(self)

    def on_emit(self, log_record: Any) -> None:
        queue = self._queue
        if queue is not None and len(queue) >= self._max:
            self._on_drop(1)
        super().on_emit(log_record)


# --- per-request state -------------------------------------------------------------------
