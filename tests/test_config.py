"""config.yaml: interpolation, strictness, and errors that name the bad key's path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, hash_key, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent

MINIMAL = {
    "providers": {"p": {"kind": "mock"}},
    "models": {"m": [{"provider": "p", "model": "gpt-4o-mini"}]},
    "teams": {"t": {"keys": [{"name": "k", "key": "sk-1"}]}},
}


def with_(patch: dict) -> dict:
    from tests.gateway_harness import merge

    return merge(MINIMAL, patch)


def error_for(data: dict, env: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="cfg.yaml", env=env or {})
    return str(info.value)


def test_env_interpolation_with_defaults() -> None:
    cfg = parse_config(
        with_(
            {
                "teams": {"t": {"keys": [{"name": "k", "key": "${TEAM_KEY}"}]}},
                "providers": {
                    "o": {
                        "kind": "openai",
                        "api_key": "${OPENAI_KEY:-fallback-key}",
                        "base_url": "http://${HOST:-localhost}:8000/v1",
                    }
                },
            }
        ),
        env={"TEAM_KEY": "sk-from-env"},
    )
    assert cfg.teams["t"].keys[0].key == "sk-from-env"
    assert cfg.providers["o"].api_key == "fallback-key"
    assert cfg.providers["o"].base_url == "http://localhost:8000/v1"


def test_unset_key_variable_is_an_error_naming_the_key() -> None:
    msg = error_for(with_({"teams": {"t": {"keys": [{"name": "k", "key": "${MISSING_KEY}"}]}}}))
    assert "teams.t.keys[0]" in msg and "empty" in msg


def test_unknown_key_names_its_path() -> None:
    msg = error_for(with_({"teams": {"t": {"budget": {"limit_usd": 5, "perod": "daily"}}}}))
    assert "teams.t.budget.perod" in msg and "cfg.yaml" in msg


def test_unknown_top_level_section() -> None:
    assert "routes" in error_for(with_({"routes": {}}))


def test_wrong_type_names_its_path() -> None:
    msg = error_for(with_({"server": {"port": "many"}}))
    assert "server.port" in msg


def test_bad_enum_value() -> None:
    msg = error_for(with_({"store": {"backend": "postgres"}}))
    assert "store.backend" in msg


def test_unknown_provider_referenced_by_a_model() -> None:
    msg = error_for(with_({"models": {"m": [{"provider": "nope", "model": "x"}]}}))
    assert "models.m[0].provider" in msg and "nope" in msg


def test_duplicate_team_key_across_teams() -> None:
    msg = error_for(with_({"teams": {"u": {"keys": [{"name": "other", "key": "sk-1"}]}}}))
    assert "teams.u.keys[0]" in msg and "duplicate" in msg


def test_duplicate_key_given_as_plain_and_as_hash() -> None:
    msg = error_for(with_({"teams": {"u": {"keys": [{"name": "h", "sha256": hash_key("sk-1")}]}}}))
    assert "duplicate" in msg


def test_key_needs_exactly_one_secret() -> None:
    msg = error_for(
        with_({"teams": {"t": {"keys": [{"name": "k", "key": "a", "sha256": "b" * 64}]}}})
    )
    assert "teams.t.keys[0]" in msg


def test_team_model_list_must_name_known_models() -> None:
    assert "teams.t.models" in error_for(with_({"teams": {"t": {"models": ["m", "ghost"]}}}))


def test_every_error_is_reported_at_once() -> None:
    msg = error_for(with_({"server": {"port": "x", "workers": 0}}))
    assert "server.port" in msg and "server.workers" in msg


def test_http_limits_default_to_internet_safe_values() -> None:
    server = parse_config(MINIMAL, env={}).server
    assert server.max_header_kb == 64 and server.header_timeout_s == 10
    assert server.max_connections == 10000 and server.max_json_depth == 64


def test_http_limits_are_checked_and_named_by_key_path() -> None:
    bad = {"max_header_kb": 0, "header_timeout_s": 0, "max_connections": 0, "max_json_depth": 129}
    msg = error_for(with_({"server": bad}))
    for key in bad:
        assert f"server.{key}" in msg


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "config.yaml", env={})
    assert "demo" in cfg.models and cfg.store.backend == "local"
    assert cfg.providers["demo"].kind == "mock"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_prints_routes_teams_budgets() -> None:
    done = run_cli("check-config", "--config", str(REPO / "config.yaml"))
    assert done.returncode == 0, done.stderr
    assert "demo: demo/gpt-4o-mini" in done.stdout
    assert "$20 monthly" in done.stdout


def test_check_config_fails_with_the_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: {p: {kind: mock}}\nmodels: {m: [{provider: q, model: x}]}\n")
    done = run_cli("check-config", "--config", str(bad))
    assert done.returncode == 2
    assert "models.m[0].provider" in done.stderr


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "providers: {p: {kind: mock}}\nmodels: {only-here: [{provider: p, model: gpt-4o-mini}]}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**__import__("os").environ, "TALLYGATE_CONFIG": str(path)},
    )
    assert done.returncode == 0 and "only-here" in done.stdout
