"""The `telemetry:` section of config.yaml, and where it sends telemetry.

Kept apart from gateway.telemetry.facade so that reading a config (gateway.config) loads neither
the OpenTelemetry SDK nor prometheus_client nor httpx: pydantic and the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TelemetryConfig", "describe_export", "otlp_targets"]


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


# signal → (endpoint to pass its exporter, or None to let it read the OTEL_* environment;
# what to call it in logs)
Targets = dict[str, tuple[str | None, str]]


def otlp_targets(cfg: TelemetryConfig, env: Mapping[str, str]) -> Targets:
    """Per signal: (endpoint to pass the exporter, or None to let it read the OTEL_*
    environment; what to call it in logs). Absent: not exported. The config's endpoint
    wins over the per-signal variable, which wins over the generic one."""
    http = cfg.protocol == "http/protobuf"
    signals = ("traces",) + ("metrics",) * cfg.export_metrics + ("logs",) * cfg.export_logs
    out: Targets = {}
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
