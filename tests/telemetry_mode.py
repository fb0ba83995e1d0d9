"""A pytest plugin: run the telemetry tests with `telemetry.fast_path: false`.

    python -m pytest -p tests.telemetry_mode --telemetry-fast-path=false tests/test_telemetry*.py

Every Telemetry the tests build (through tests/gateway_harness.py and create_app, or with
Telemetry.create directly) gets `fast_path: false` unless its config sets fast_path itself
(tests that compare the two modes). The gateway reads no such switch: only this plugin,
loaded by name (.ci/run's second pytest run), changes the default.
"""

from __future__ import annotations

from typing import Any

import pytest

OPTION = "--telemetry-fast-path"
_PATCH = pytest.StashKey[pytest.MonkeyPatch]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        OPTION,
        choices=("true", "false"),
        default="true",
        help="telemetry.fast_path for every Telemetry a test builds without setting it",
    )


def fast_path_default(config: pytest.Config) -> bool:
    """The mode this run asks for (true when the plugin is not loaded)."""
    try:
        return config.getoption(OPTION) != "false"
    except ValueError:  # the option is unknown: the plugin is not loaded
        return True


def pytest_report_header(config: pytest.Config) -> str:
    return f"telemetry.fast_path (unless a test sets it): {fast_path_default(config)}"


def pytest_configure(config: pytest.Config) -> None:
    if fast_path_default(config):
        return
    from gateway.telemetry.facade import Telemetry

    create = Telemetry.create.__func__  # type: ignore[attr-defined]

    def create_plain(cls: type[Telemetry], telemetry: Any, **kwargs: Any) -> Telemetry:
        if "fast_path" not in telemetry.model_fields_set:
            telemetry = telemetry.model_copy(update={"fast_path": False})
        return create(cls, telemetry, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(Telemetry, "create", classmethod(create_plain))
    config.stash[_PATCH] = patch


def pytest_unconfigure(config: pytest.Config) -> None:
    patch = config.stash.get(_PATCH, None)
    if patch is not None:
        patch.undo()
