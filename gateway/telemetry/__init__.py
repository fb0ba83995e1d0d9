"""Telemetry: `facade.Telemetry` (process-wide: instruments, exporters, /metrics), `record`
(one request's spans, metrics and access line), `config` (the config model, no SDK import),
`semconv` (GenAI attribute names), `access_log`, `prometheus`, `export`, `otlp`; `fast/`:
the lite spans, OTLP encoder, span processor and histograms of `telemetry.fast_path`.

Empty on purpose: `gateway.config` imports `gateway.telemetry.config`, which must not load
the OpenTelemetry SDK."""
