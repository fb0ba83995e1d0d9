"""The CLI's own checks, run as a user runs them: --version, check-config on prices and on
unset ${VAR}s."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def tallygate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip


def config(tmp_path: Path, models: dict, pricing: dict | None = None, **extra: object) -> str:
    data = {
        "providers": {"up": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}},
        "models": models,
        "teams": {"t": {"keys": [{"name": "k", "key": "sk-test-0000"}]}},
        "telemetry": {"exporter": "none"},
        **({"pricing": pricing} if pricing else {}),
        **extra,
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_version_is_the_installed_package_version() -> None:
    done = tallygate("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"tallygate {version('tallygate')}"


def test_check_config_refuses_a_routed_model_without_a_price(tmp_path: Path) -> None:
    path = config(tmp_path, {"m": [{"provider": "up", "model": "no-such-model-x"}]})
    done = tallygate("check-config", "--config", path)
    assert done.returncode == 1
    assert "error: models.m: no price for 'no-such-model-x'" in done.stderr
    assert ": OK" not in done.stdout


def test_check_config_warns_under_allow_and_passes_when_priced(tmp_path: Path) -> None:
    unpriced = {"m": [{"provider": "up", "model": "no-such-model-x"}]}
    done = tallygate(
        "check-config", "--config", config(tmp_path, unpriced, {"on_unknown_price": "allow"})
    )
    assert done.returncode == 0 and "warning: models.m: no price" in done.stderr
    priced = {"m": [{"provider": "up", "model": "gpt-4o-mini"}]}
    done = tallygate("check-config", "--config", config(tmp_path, priced))
    assert done.returncode == 0 and ": OK" in done.stdout and not done.stderr


def test_an_unset_variable_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("teams:\n  t:\n    keys:\n      - {name: prod, key: '${TEAM_T_KEY_UNSET}'}\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = tallygate("check-config", "--config", str(path), env=env)
    assert done.returncode == 2
    assert "teams.t.keys[0]" in done.stderr
    assert "${TEAM_T_KEY_UNSET} is not set" in done.stderr
