"""Telemetry: traces, metrics and the access log of every request (setup and lifecycle)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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
    max_queue_size: int = Field(default=2048, ge=1)  # batch processors' bounded queues
    export_timeout_s: float = Field(default=5.0, gt=0)
