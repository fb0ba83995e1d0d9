"""Shared fixtures: the fake upstream provider and a gateway config in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_upstream import FakeUpstream


@pytest.fixture(scope="session")
def _fake_upstream_server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake_upstream(_fake_upstream_server: FakeUpstream) -> FakeUpstream:
    """A started FakeUpstream (one server per session), reset for this test."""
    _fake_upstream_server.reset()
    return _fake_upstream_server


@pytest.fixture
def gateway_config(fake_upstream: FakeUpstream, tmp_path: Path) -> dict:
    from tests.gateway_harness import base_config

    return base_config(fake_upstream.base_url, tmp_path / "tallygate.db")


@pytest.fixture
def gateway(gateway_config: dict):
    """A real gateway under uvicorn on loopback, in front of the fake upstream."""
    from tests.gateway_harness import running_gateway

    with running_gateway(gateway_config) as gw:
        yield gw


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict]:
    """The `store:` section of a gateway config, once per backend (Redis: a fresh server)."""
    if request.param == "local":
        yield {"backend": "local", "path": str(tmp_path / "store.db")}
        return
    from tests.redis_server import RedisServer, require_redis_server

    require_redis_server()
    with RedisServer() as server:
        yield {"backend": "redis", "redis_url": server.url}
