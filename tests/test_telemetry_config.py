"""gateway.telemetry.config: the `telemetry:` config is read without the telemetry stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("opentelemetry.sdk", "prometheus_client", "httpx")


def test_reading_the_config_loads_no_sdk_prometheus_or_httpx() -> None:
    # a fresh interpreter: this one has imported everything already
    code = (
        "import gateway.config, json, sys; "
        f"print(json.dumps([m for m in sys.modules if m.startswith({HEAVY!r})]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def test_the_telemetry_module_still_offers_the_config() -> None:
    from gateway import config
    from gateway.telemetry import config as telemetry_config
    from gateway.telemetry import facade as telemetry

    assert telemetry.TelemetryConfig is telemetry_config.TelemetryConfig
    assert config.Config().telemetry == telemetry_config.TelemetryConfig()
