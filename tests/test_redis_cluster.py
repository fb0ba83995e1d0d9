"""store.backend: redis_cluster on a real 3-master Redis Cluster: one slot per team, teams
spread over the masters, a restarted master costs no call, and two gateway processes
share budgets exactly. (The contract suite runs on the cluster too.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from redis.crc import key_slot

from policies.config import StoreConfig
from policies.stores import open_store
from policies.stores.base import BudgetScope, Reservation, SpendRow, StoreError
from policies.stores.redis import ledger_key, rate_key, request_key, reservations_key
from policies.stores.redis_cluster import RedisClusterStore
from tests.gateway_harness import KEYS, serve_command
from tests.redis_server import RedisCluster
from tests.redis_server import redis_cluster as redis_cluster  # the session fixture
from tests.servers import free_port, run_process_server
from tests.test_gateway_budgets import check_budget_outcome, fire, per_request_cost_key, team_spent

TEAMS = ["search", "ads", "billing", "a}b{c:d", "%7B", "x", "y", "z"]


def scopes_of(team: str, limit: int | None = None) -> tuple[BudgetScope, ...]:
    return (
        BudgetScope(f"team:{team}", team, "total", None, limit),
        BudgetScope(f"key:{team}/app", team, "2026-11", 1796083200.0, None),
    )


def test_every_key_of_a_team_hashes_to_one_slot() -> None:
    slots = {}
    for team in TEAMS:
        keys = [request_key(team, "req-1"), rate_key(team, f"key:{team}/app")]
        for s in scopes_of(team):
            keys += [ledger_key(team, s.scope_id, s.period_key)]
            keys += [reservations_key(team, s.scope_id, s.period_key)]
        team_slots = {key_slot(k.encode()) for k in keys}
        assert len(team_slots) == 1, (team, keys)
        slots[team] = team_slots.pop()
    assert slots["a}b{c:d"] != slots["%7B"]  # odd names are encoded, not cut at a brace
    assert len(set(slots.values())) == len(TEAMS)


def test_a_cluster_url_must_name_database_0() -> None:
    for url in ("redis://h:7000", "redis://h:7000/", "redis://h:7000/0"):
        assert StoreConfig(backend="redis_cluster", redis_url=url).redis_url == url
    with pytest.raises(ValidationError, match="only database 0"):
        StoreConfig(backend="redis_cluster", redis_url="redis://h:7000/2")
    assert StoreConfig(backend="redis", redis_url="redis://h:7000/2")  # plain Redis: any db


@pytest.fixture
async def cluster_store(redis_cluster: RedisCluster) -> AsyncIterator[RedisClusterStore]:
    redis_cluster.flushall()
    store = open_store(StoreConfig(backend="redis_cluster", redis_url=redis_cluster.url))
    assert isinstance(store, RedisClusterStore)
    await store.start()
    yield store
    await store.close()


async def test_teams_spread_over_the_masters(
    cluster_store: RedisClusterStore, redis_cluster: RedisCluster
) -> None:
    for i, team in enumerate(TEAMS):
        res = await cluster_store.reserve(f"r{i}", scopes_of(team, 100), 10)
        assert isinstance(res, Reservation)
        await cluster_store.settle(res, i)
    holding = [n for n in redis_cluster.nodes if n.command("DBSIZE") != b":0"]
    assert len(holding) >= 2  # a real cluster: not everything on one node
    rows = await cluster_store.spend()  # scans every master
    assert {r.scope_id for r in rows} == {s.scope_id for t in TEAMS for s in scopes_of(t)}
    assert sum(r.spent_nano for r in rows) == 2 * sum(range(len(TEAMS)))


@pytest.mark.parametrize("keep_data", [False, True], ids=["flushed", "data-kept"])
async def test_a_restarted_master_costs_no_call(
    cluster_store: RedisClusterStore, redis_cluster: RedisCluster, keep_data: bool
) -> None:
    scopes = scopes_of("search")

    async def burst(tag: str) -> list[str]:
        async def one(i: int) -> str:
            try:
                res = await cluster_store.reserve(f"{tag}-{i}", scopes, 5)
                assert isinstance(res, Reservation)
                await cluster_store.settle(res, 1)
            except StoreError as exc:
                return str(exc)
            return ""

        return [e for e in await asyncio.gather(*(one(i) for i in range(200))) if e]

    assert await burst("warm") == []  # many pooled connections to the team's master
    ledger = ledger_key("search", "team:search", "total")
    (owner,) = [
        i for i, n in enumerate(redis_cluster.nodes) if n.command("EXISTS", ledger) == b":1"
    ]
    redis_cluster.restart_node(owner, keep_data=keep_data)
    assert await burst("after") == []
    spent = 400 if keep_data else 200
    assert (await cluster_store.balances(scopes))[0] == SpendRow("team:search", "total", spent, 0)


def test_two_gateway_processes_share_one_cluster_budget(
    tmp_path: Path, redis_cluster: RedisCluster
) -> None:
    redis_cluster.flushall()
    port_a, port_b = free_port(), free_port()
    base = {
        "providers": {"demo": {"kind": "mock", "latency_ms": 30}},
        "models": {"demo": [{"provider": "demo", "model": "gpt-4o-mini"}]},
        "teams": {
            "alpha": {"keys": [{"name": "alpha-app", "key": KEYS["alpha"]}]},
            "ops": {"keys": [{"name": "ops", "key": KEYS["admin"]}], "admin": True},
        },
        # any node will do: name the last one. A long timeout: this test is about exact
        # budgets, and a loaded CI machine should not turn it into one about latency.
        "store": {
            "backend": "redis_cluster",
            "redis_url": redis_cluster.nodes[-1].url,
            "timeout_s": 10,
        },
        "telemetry": {"exporter": "none", "prometheus": False},
    }
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(base))
    with run_process_server(
        serve_command(tmp_path / "probe.yaml", port_a), port_a, cwd=tmp_path
    ) as probe:
        unit = per_request_cost_key(probe.url)
    redis_cluster.flushall()
    limit = unit * 30 + unit / 2
    base["teams"]["alpha"]["budget"] = {"limit_usd": str(limit), "period": "total"}
    shared = tmp_path / "shared.yaml"
    shared.write_text(yaml.safe_dump(base))
    with (
        run_process_server(serve_command(shared, port_a), port_a, cwd=tmp_path) as a,
        run_process_server(serve_command(shared, port_b), port_b, cwd=tmp_path) as b,
    ):
        responses = asyncio.run(fire([a.url, b.url], 200))
        spent = team_spent(a.url)
        assert team_spent(b.url) == spent  # both replicas read one ledger
    admitted = check_budget_outcome(responses, limit, spent)  # spent <= limit, == charged
    assert 1 <= admitted <= 30
    assert {r.url.port for r in responses} == {port_a, port_b}
