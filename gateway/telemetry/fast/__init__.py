"""`telemetry.fast_path`: spans and histograms recorded without the SDK's objects, spans
encoded to OTLP/HTTP protobuf directly; the private SDK names they rely on are checked at
start (gateway.telemetry.facade.fast_path_missing)."""
