"""The OTLP exporters of each signal, built from the `telemetry:` config and its targets
(gateway.telemetry.config.otlp_targets), and the checks of what the fast path needs.

Each exporter module is imported when its protocol is used, so a gateway that exports
nothing over gRPC never loads grpc.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk._logs.export import LogRecordExporter
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.trace.export import SpanExporter

from gateway.telemetry.config import Targets, TelemetryConfig
from gateway.telemetry.export import missing_names
from gateway.telemetry.fast.histograms import private_sdk_names as histogram_sdk_names


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
        from gateway.telemetry.fast.otlp_spans import private_sdk_names

        pairs += private_sdk_names(span_exporter)  # type: ignore[arg-type]
    return missing_names(pairs)


def sdk_version() -> str:
    try:
        return importlib.metadata.version("opentelemetry-sdk")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _kwargs(config: TelemetryConfig, endpoint: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"timeout": config.export_timeout_s}
    if endpoint is not None:
        kwargs["endpoint"] = endpoint
        if config.protocol == "grpc":
            kwargs["insecure"] = endpoint.startswith("http://")
    if config.headers:
        kwargs["headers"] = dict(config.headers)
    return kwargs


def span_exporter(config: TelemetryConfig, targets: Targets, *, fast: bool) -> SpanExporter:
    """`fast`: over OTLP/HTTP, gateway.telemetry.fast.otlp_spans' exporter (its spans encoded as they end)."""
    kwargs = _kwargs(config, targets["traces"][0])
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(**kwargs)
    if not fast:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPSpanExporter,
        )

        return HTTPSpanExporter(**kwargs)
    from gateway.telemetry.fast.otlp_spans import FastHTTPSpanExporter

    return FastHTTPSpanExporter(**kwargs)


def metric_exporter(config: TelemetryConfig, targets: Targets) -> MetricExporter:
    kwargs = _kwargs(config, targets["metrics"][0])
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HTTPMetricExporter,
    )

    return HTTPMetricExporter(**kwargs)


def log_exporter(
    config: TelemetryConfig, targets: Mapping[str, tuple[str | None, str]]
) -> LogRecordExporter:
    kwargs = _kwargs(config, targets["logs"][0])
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        return OTLPLogExporter(**kwargs)
    from opentelemetry.exporter.otlp.proto.http._log_exporter import (
        OTLPLogExporter as HTTPLogExporter,
    )

    return HTTPLogExporter(**kwargs)
