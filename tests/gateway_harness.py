"""A real gateway on loopback for tests: uvicorn in a thread, in-memory telemetry, a config dict."""

from __future__ import annotations

import copy
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import create_app
from gateway.config import parse_config
from gateway.server.limits import LimitedHttpToolsProtocol, http_limits
from gateway.state import TelemetryHooks
from tests.servers import ServerThread

UPSTREAM_KEY = "sk-upstream-secret-0000"
KEYS = {
    "alpha": "sk-alpha-key-1111",
    "alpha2": "sk-alpha-key-2222",
    "beta": "sk-beta-key-3333",
    "admin": "sk-admin-key-4444",
}


def serve_command(config: Path | str, port: int, *extra: str) -> list[str]:
    """`python -m gateway serve` on loopback, as a user runs it."""
    return [sys.executable, "-m", "gateway", "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), *extra]  # fmt: skip


def base_config(upstream_url: str, db_path: Path) -> dict[str, Any]:
    """A config with two OpenAI-compatible deployments on the fake upstream, and the mock."""
    return {
        "providers": {
            "up": {
                "kind": "openai",
                "base_url": upstream_url,
                "api_key": UPSTREAM_KEY,
                "timeout_s": 5,
            },
            "up2": {
                "kind": "openai",
                "base_url": upstream_url,
                "api_key": UPSTREAM_KEY,
                "timeout_s": 5,
            },
            "demo": {"kind": "mock"},
        },
        "models": {
            "gpt-4o-mini": [{"provider": "up", "model": "gpt-4o-mini"}],
            "fallback": [
                {"provider": "up", "model": "gpt-4o-mini", "name": "primary"},
                {"provider": "up2", "model": "gpt-4o", "name": "secondary"},
            ],
            "embed": [{"provider": "up", "model": "text-embedding-3-small"}],
            "instruct": [{"provider": "up", "model": "gpt-3.5-turbo"}],
            "demo": [{"provider": "demo", "model": "gpt-4o-mini"}],
        },
        "teams": {
            "alpha": {
                "keys": [
                    {"name": "alpha-app", "key": KEYS["alpha"]},
                    {"name": "alpha-ci", "key": KEYS["alpha2"]},
                ]
            },
            "beta": {"keys": [{"name": "beta-app", "key": KEYS["beta"]}], "models": ["demo"]},
            "ops": {"keys": [{"name": "ops", "key": KEYS["admin"]}], "admin": True},
        },
        "store": {"backend": "local", "path": str(db_path)},
        "routing": {
            "retries": 1,
            "backoff_s": 0.01,
            "cooldown_s": 30,
            "cooldown_after_failures": 3,
        },
        "pricing": {"on_unknown_price": "reject"},
        "telemetry": {"exporter": "none", "capture_content": "redacted", "prometheus": True},
    }


@dataclass
class RunningGateway:
    server: ServerThread
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    log: io.StringIO

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def access_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines() if line.strip()]

    @property
    def gateway(self) -> Any:
        return self.server.app_state.gateway  # type: ignore[attr-defined]


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


@contextmanager
def running_gateway(
    config: dict[str, Any],
    spans: InMemorySpanExporter | None = None,
    *,
    uvicorn_protocol: bool = False,
) -> Iterator[RunningGateway]:
    """`spans`: an InMemorySpanExporter (or subclass) of the test's own. `uvicorn_protocol`:
    serve with uvicorn's own HTTP protocol, as another ASGI server would (not the one
    `tallygate serve` uses)."""
    spans = spans if spans is not None else InMemorySpanExporter()
    metrics = InMemoryMetricReader()
    log = io.StringIO()
    parsed = parse_config(config, env={})
    app = create_app(parsed, TelemetryHooks(spans, metrics, log))
    # the HTTP protocol `tallygate serve` uses, with the config's limits
    protocol = LimitedHttpToolsProtocol.factory(http_limits(parsed)[0])
    with ServerThread(app, http="httptools" if uvicorn_protocol else protocol) as server:
        server.app_state = app.state  # type: ignore[attr-defined]
        yield RunningGateway(server, spans, metrics, log)
