"""telemetry.export_metrics and telemetry.resource_attributes, over the wire to a real OTLP
receiver (protobuf decoded)."""

from __future__ import annotations

import httpx
import pytest

from gateway.app import create_app
from gateway.config import parse_config
from tests.gateway_harness import KEYS, merge
from tests.otlp_receiver import OTLPReceiver
from tests.servers import ServerThread

ALPHA = {"authorization": f"Bearer {KEYS['alpha']}"}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}


def serve_once(cfg: dict) -> None:
    with ServerThread(create_app(parse_config(cfg, env={}))) as server:
        assert (
            httpx.post(server.url + "/v1/chat/completions", headers=ALPHA, json=BODY).status_code
            == 200
        )


def test_traces_without_metrics(gateway_config: dict) -> None:
    with OTLPReceiver() as rx:
        telemetry = {"exporter": "otlp", "endpoint": rx.endpoint, "export_metrics": False}
        serve_once(merge(gateway_config, {"telemetry": telemetry}))
        rx.wait_for_spans(2)  # flushed at shutdown at the latest
        paths = {path for path, _ in rx.requests}
    assert "/v1/traces" in paths
    assert "/v1/metrics" not in paths  # Phoenix answers 405 to these: none are sent


def test_metrics_are_exported_by_default(gateway_config: dict) -> None:
    with OTLPReceiver() as rx:
        serve_once(
            merge(gateway_config, {"telemetry": {"exporter": "otlp", "endpoint": rx.endpoint}})
        )
        rx.wait_for_spans(2)
        paths = {path for path, _ in rx.requests}
    assert {"/v1/traces", "/v1/metrics"} <= paths


def test_resource_attributes_merge_with_the_environment(
    gateway_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,team.owner=sre")
    attrs = {"openinference.project.name": "tallygate", "deployment.environment": "staging"}
    with OTLPReceiver() as rx:
        telemetry = {"exporter": "otlp", "endpoint": rx.endpoint, "resource_attributes": attrs}
        serve_once(merge(gateway_config, {"telemetry": telemetry}))
        spans = rx.wait_for_spans(2)
    resource = spans[0].resource
    assert resource["openinference.project.name"] == "tallygate"  # Phoenix's project
    assert resource["deployment.environment"] == "prod"  # the environment wins
    assert resource["team.owner"] == "sre"
    assert resource["service.name"] == "tallygate"
