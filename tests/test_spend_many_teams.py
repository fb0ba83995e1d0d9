"""The spend report for any number of teams, on every store: GET /admin/spend and
`tallygate spend` without --team (one balances call per team: one hash tag each)."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml

from tests.gateway_harness import KEYS, merge, running_gateway
from tests.redis_server import RedisCluster, RedisServer, require_redis_cli, require_redis_server
from tests.redis_server import redis_cluster as redis_cluster  # the session fixtures
from tests.redis_server import redis_server as redis_server

ADMIN = {"authorization": f"Bearer {KEYS['admin']}"}
EXTRA_TEAMS = {
    name: {
        "keys": [{"name": f"{name}-app", "key": f"sk-{name}-key-{i}{i}{i}{i}"}],
        "budget": {"limit_usd": "5", "period": "monthly"},
        "key_budget": {"limit_usd": "1", "period": "daily"},
    }
    for i, name in enumerate(["gamma", "delta", "a}b{c"], start=5)
}
CALLERS = {"alpha": KEYS["alpha"], "beta": KEYS["beta"], "a}b{c": "sk-a}b{c-key-7777"}


@pytest.fixture(params=["local", "redis", "redis_cluster"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> dict:
    """The config's store section, on an empty store."""
    if request.param == "local":
        return {"backend": "local", "path": str(tmp_path / "spend.db")}
    if request.param == "redis":
        require_redis_server()
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flushall()
        return {"backend": "redis", "redis_url": server.url}
    require_redis_cli()
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    cluster.flushall()
    return {"backend": "redis_cluster", "redis_url": cluster.url}


def spend_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "spend", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_spend_report_of_every_team(gateway_config: dict, store: dict, tmp_path: Path) -> None:
    cfg = merge(gateway_config, {"teams": EXTRA_TEAMS, "store": store})
    cfg["teams"]["alpha"]["budget"] = {"limit_usd": "10", "period": "total"}
    charged: dict[str, Decimal] = {}
    with running_gateway(cfg) as gw:
        for team, key in CALLERS.items():
            for _ in range(2):
                r = httpx.post(
                    gw.url + "/v1/chat/completions",
                    json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"authorization": f"Bearer {key}"},
                )
                assert r.status_code == 200, r.text
                charged[team] = charged.get(team, 0) + Decimal(r.headers["x-tallygate-cost-usd"])
        r = httpx.get(gw.url + "/admin/spend", headers=ADMIN)
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    teams = set(cfg["teams"])
    assert len(teams) == 6 and {row["team"] for row in rows} == teams
    for team in teams:
        team_row = next(row for row in rows if row["team"] == team and row["key"] is None)
        assert Decimal(team_row["spent_usd"]) == charged.get(team, 0), team
        assert team_row["reserved_usd"] == "0"
    alpha = next(row for row in rows if row["team"] == "alpha" and row["key"] is None)
    assert Decimal(alpha["remaining_usd"]) == 10 - charged["alpha"]

    # the CLI, without --team, reads the same store (after the gateway stopped)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # the report follows config order
    done = spend_cli(path, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == rows
    table = spend_cli(path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:2] == ["team", "key"] and len(lines) == 1 + len(rows)
    assert {line.split()[0] for line in lines[1:]} == teams
