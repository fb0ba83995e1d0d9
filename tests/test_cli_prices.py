"""`python -m gateway prices [MODEL]` as users run it: what the gateway will charge, and why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CONFIG = """
providers:
  demo: {kind: mock}
  groq: {kind: openai, base_url: "https://api.groq.com/openai/v1", api_key: x}
  together: {kind: openai, base_url: "https://api.together.xyz/v1", api_key: x}
  openai: {kind: openai, api_key: x}
models:
  oss:
    - {provider: groq, model: openai/gpt-oss-20b}
    - {provider: together, model: openai/gpt-oss-20b}
  legacy: [{provider: openai, model: gpt-3.5-turbo-0613}]
  sonnet: [{provider: demo, model: claude-sonnet-4-5-20250929}]
  mystery: [{provider: demo, model: mistral-large-2409}]
  local: [{provider: demo, model: local-model}]
pricing:
  on_unknown_price: %s
  overrides:
    local-model: {input_per_mtok: 0.25, output_per_mtok: 1, context_window: 4096}
"""

VERSION = re.compile(r"price table \d{4}-\d{2}-\d{2}\+[0-9a-f]{8}$", re.MULTILINE)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prices") / "config.yaml"
    path.write_text(CONFIG % "reject")
    return path


def prices(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "prices", *args, "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def fields(block: str) -> dict[str, str]:
    """`  label   value` lines of one resolution, as a dict."""
    found = {}
    for line in block.splitlines():
        match = re.fullmatch(r"  (\S+(?: \S+)?)\s{2,}(.+)", line)
        if match:
            found[match[1]] = match[2]
    return found


def test_every_route_on_one_line_each(config: Path) -> None:
    done = prices(config)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "alias", "deployment", "host", "priced_as", "row", "via", "input", "output",
        "cached", "cache_write", "max_output", "context", "checked",
    ]  # fmt: skip
    rows = {(cells[0], cells[1]): cells for cells in (line.split() for line in lines[1:7])}
    # the same model id, priced by the host its provider's base_url names
    assert rows["oss", "groq/openai/gpt-oss-20b"][2:8] == [
        "groq", "openai/gpt-oss-20b", "groq", "exact", "0.075", "0.30",
    ]  # fmt: skip
    assert rows["oss", "together/openai/gpt-oss-20b"][2:8] == [
        "together", "openai/gpt-oss-20b", "together", "exact", "0.05", "0.20",
    ]  # fmt: skip
    assert rows["legacy", "openai/gpt-3.5-turbo-0613"][3:8] == [
        "gpt-3.5-turbo-0613", "openai", "exact", "1.50", "2.00",
    ]  # fmt: skip
    assert rows["sonnet", "demo/claude-sonnet-4-5-20250929"][3:6] == [
        "claude-sonnet-4-5", "anthropic", "family",
    ]  # fmt: skip
    assert rows["mystery", "demo/mistral-large-2409"][3:6] == ["NO", "PRICE", "-"]
    assert rows["local", "demo/local-model"][3:8] == [
        "local-model", "override", "override", "0.25", "1",
    ]  # fmt: skip
    assert "1 deployment(s) have no price: requests to them are refused" in done.stdout
    assert VERSION.search(done.stdout)


def test_a_dated_name_priced_from_its_own_row(config: Path) -> None:
    done = prices(config, "gpt-3.5-turbo-0613")
    assert done.returncode == 0, done.stderr
    got = fields(done.stdout)
    assert got["priced as"] == "gpt-3.5-turbo-0613 [openai] via exact name"
    assert (got["input"], got["output"]) == ("$1.50 / Mtok", "$2.00 / Mtok")
    assert (got["max output"], got["context"]) == ("4096 tokens", "4096 tokens")
    assert got["source"].startswith("https://") and re.fullmatch(
        r"\d{4}-\d{2}-\d{2}", got["checked"]
    )
    assert VERSION.search(done.stdout)


def test_a_snapshot_priced_by_its_shared_family(config: Path) -> None:
    done = prices(config, "claude-sonnet-4-5-20250929")
    assert done.returncode == 0, done.stderr
    got = fields(done.stdout)
    assert got["priced as"] == "claude-sonnet-4-5 [anthropic] via family (snapshots shared)"
    assert (got["cached input"], got["cache write"]) == ("$0.30 / Mtok", "$3.75 / Mtok")


def test_an_alias_resolves_each_deployment_with_its_host(config: Path) -> None:
    done = prices(config, "oss")
    assert done.returncode == 0, done.stderr
    blocks = done.stdout.split("oss → ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [
        "groq/openai/gpt-oss-20b (host: groq)",
        "together/openai/gpt-oss-20b (host: together)",
    ]
    assert [fields(b)["input"] for b in blocks] == ["$0.075 / Mtok", "$0.05 / Mtok"]


def test_an_override_names_the_config(config: Path) -> None:
    done = prices(config, "local-model")
    assert done.returncode == 0, done.stderr
    got = fields(done.stdout)
    assert got["priced as"] == "local-model via override (pricing.overrides)"
    assert (got["context"], got["source"], got["checked"]) == (
        "4096 tokens",
        "config: pricing.overrides",
        "-",
    )


@pytest.mark.parametrize(
    ("model", "why"),
    [
        ("mistral-large-2409", "no price (unknown)"),  # mistral-large snapshots are not shared
        ("openai/gpt-oss-20b", "no price (ambiguous): rows for groq, together claim it"),
        ("mystery", "no price (unknown)"),  # an alias whose only deployment has no price
    ],
)
def test_unknown_model_exits_1(config: Path, model: str, why: str) -> None:
    done = prices(config, model)
    assert done.returncode == 1
    assert why in done.stdout
    assert "requests to it are refused (pricing.on_unknown_price: reject)" in done.stdout


def test_unknown_under_allow_is_not_charged(tmp_path: Path) -> None:
    path = tmp_path / "allow.yaml"
    path.write_text(CONFIG % "allow")
    done = prices(path, "nope-model")
    assert done.returncode == 1
    assert "requests to it are not charged (pricing.on_unknown_price: allow)" in done.stdout


def test_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("pricing: {default_max_output_tokens: 0}\n")
    done = prices(path, "gpt-4o")
    assert done.returncode == 2
    assert "pricing.default_max_output_tokens" in done.stderr
