"""Shared fixtures: the environment for offline runs, and the fake upstream provider."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fake_upstream import FakeUpstream

# tiktoken cannot download its encodings here: use the checked-in copy beside the repo.
_TIKTOKEN_CACHE = Path(__file__).resolve().parent.parent.parent / "shared" / "tiktoken-cache"
if _TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_TIKTOKEN_CACHE))


@pytest.fixture(scope="session")
def _fake_upstream_server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake_upstream(_fake_upstream_server: FakeUpstream) -> FakeUpstream:
    """A started FakeUpstream (one server per session), reset for this test."""
    _fake_upstream_server.reset()
    return _fake_upstream_server
