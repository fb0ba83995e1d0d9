"""The store contract: one suite, run against LocalStore (SQLite), RedisStore (a real
redis-server) and RedisClusterStore (a real 3-master Redis Cluster), each bare and wrapped
in a LeasedStore (what a gateway gets when several processes share the budgets: the local
store with several workers, Redis always)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from policies.budget import budget_scopes, rate_scopes
from policies.config import BudgetConfig, RateLimitConfig, StoreConfig
from policies.stores import open_store
from policies.stores.base import (
    MAX_AMOUNT_NANO,
    BudgetRejection,
    BudgetScope,
    RateScope,
    Reservation,
    SpendRow,
    Store,
    StoreError,
    balances_by_group,
)
from policies.stores.leases import LeasedStore
from policies.stores.local import LocalStore
from policies.stores.redis import RedisStore, claim_key, ledger_key
from policies.stores.redis_cluster import RedisClusterStore
from tests.redis_server import RedisCluster, RedisServer, require_redis_cli, require_redis_server
from tests.redis_server import redis_cluster as redis_cluster  # the session fixtures
from tests.redis_server import redis_server as redis_server


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[arg-type, misc]


NOV_26 = ts(2026, 11, 26, 12)
USD = 10**9


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Kit:
    """A started store of one backend, a way to open more, and a way to let time pass."""

    backend: str
    clock: FakeClock
    opener: Callable[[float], Store]
    stores: list[Store] = field(default_factory=list)

    async def open(self, reservation_ttl_s: float = 900) -> Store:
        store = self.opener(reservation_ttl_s)
        await store.start()
        self.stores.append(store)
        return store

    @property
    def store(self) -> Store:
        return self.stores[0]

    async def pass_time(self, seconds: float) -> None:
        """Local stores follow the injected clock; Redis follows its own (real) one."""
        self.clock.now += seconds
        if not self.backend.endswith("local"):
            await asyncio.sleep(seconds)


BACKENDS = ["local", "redis", "redis_cluster"]


@pytest.fixture(params=BACKENDS + [f"leased-{b}" for b in BACKENDS])
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Kit]:
    clock = FakeClock(NOV_26)
    backend = request.param.removeprefix("leased-")
    opener = _opener(request, backend, clock, tmp_path)
    if request.param.startswith("leased-"):
        bare = opener

        def opener(ttl: float) -> Store:
            inner = bare(ttl)
            return LeasedStore(inner, StoreConfig(reservation_ttl_s=ttl), clock=clock)

    kit = Kit(request.param, clock, opener)
    await kit.open()
    try:
        yield kit
    finally:
        for store in kit.stores:
            await store.close()


def _opener(
    request: pytest.FixtureRequest, backend: str, clock: FakeClock, tmp_path: Path
) -> Callable[[float], Store]:
    """Opens a bare store of ``backend``: the local one as one of two workers when it is
    to be leased (as open_store builds it), as the only one otherwise."""
    if backend == "local":
        processes = 2 if request.param.startswith("leased-") else 1

        def opener(ttl: float) -> Store:
            config = StoreConfig(path=str(tmp_path / "ledger.db"), reservation_ttl_s=ttl)
            return LocalStore(config, processes=processes, clock=clock)
    elif backend == "redis":
        require_redis_server()
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flushall()

        def opener(ttl: float) -> Store:
            config = StoreConfig(backend="redis", redis_url=server.url, reservation_ttl_s=ttl)
            return RedisStore(config, clock=clock)
    else:
        require_redis_cli()
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        cluster.flushall()

        def opener(ttl: float) -> Store:
            config = StoreConfig(
                backend="redis_cluster", redis_url=cluster.url, reservation_ttl_s=ttl
            )
            return RedisClusterStore(config, clock=clock)

    return opener


def scope(
    scope_id: str, limit: int | None, period_key: str = "2026-11", group: str = "search"
) -> BudgetScope:
    end = None if period_key == "total" else datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    return BudgetScope(scope_id, group, period_key, end, limit)


def team_and_key(
    team_limit: int | None, key_limit: int | None, key: str = "prod"
) -> tuple[BudgetScope, ...]:
    return (scope("team:search", team_limit), scope(f"key:search/{key}", key_limit))


async def row(store: Store, scope_id: str) -> tuple[int, int]:
    rows = await store.spend((scope_id,))
    assert len(rows) == 1, rows
    return rows[0].spent_nano, rows[0].reserved_nano


# budgets


async def test_ping(kit: Kit) -> None:
    assert await kit.store.ping() is True


async def test_reserve_within_limit(kit: Kit) -> None:
    scopes = team_and_key(1000, None)
    res = await kit.store.reserve("r1", scopes, 400)
    assert res == Reservation("r1", scopes, 400)
    assert await row(kit.store, "team:search") == (0, 400)
    assert await row(kit.store, "key:search/prod") == (0, 400)
    assert isinstance(await kit.store.reserve("r2", scopes, 600), Reservation)  # exactly the limit


async def test_reject_over_limit_names_scope_spent_reserved(kit: Kit) -> None:
    scopes = team_and_key(1000, None)
    first = await kit.store.reserve("r1", scopes, 300)
    assert isinstance(first, Reservation)
    await kit.store.settle(first, 250)
    assert isinstance(await kit.store.reserve("r2", scopes, 500), Reservation)
    rejection = await kit.store.reserve("r3", scopes, 251)
    assert rejection == BudgetRejection(
        scopes[0], spent_nano=250, reserved_nano=500, requested_nano=251
    )
    # nothing changed on any scope
    assert await row(kit.store, "team:search") == (250, 500)
    assert await row(kit.store, "key:search/prod") == (250, 500)
    assert isinstance(await kit.store.reserve("r4", scopes, 250), Reservation)


async def test_key_budget_and_team_budget(kit: Kit) -> None:
    prod, ci = team_and_key(1000, 300, "prod"), team_and_key(1000, 300, "ci")
    assert isinstance(await kit.store.reserve("p1", prod, 300), Reservation)
    refused = await kit.store.reserve("p2", prod, 1)
    assert isinstance(refused, BudgetRejection)
    assert refused.scope.scope_id == "key:search/prod"
    assert (refused.spent_nano, refused.reserved_nano, refused.requested_nano) == (0, 300, 1)
    # another key of the team still has its own budget, and the team's
    assert isinstance(await kit.store.reserve("c1", ci, 300), Reservation)
    third = team_and_key(1000, 300, "batch")
    assert isinstance(await kit.store.reserve("b1", third, 300), Reservation)
    refused = await kit.store.reserve("b2", third, 200)
    assert isinstance(refused, BudgetRejection)
    assert refused.scope.scope_id == "team:search"
    assert (refused.spent_nano, refused.reserved_nano) == (0, 900)
    assert await row(kit.store, "key:search/batch") == (0, 300)  # the refusal changed nothing


async def test_settle_less_than_reserved(kit: Kit) -> None:
    scopes = team_and_key(1000, None)
    res = await kit.store.reserve("r1", scopes, 800)
    assert isinstance(res, Reservation)
    await kit.store.settle(res, 300)
    assert await row(kit.store, "team:search") == (300, 0)
    assert isinstance(await kit.store.reserve("r2", scopes, 700), Reservation)


async def test_settle_more_than_reserved(kit: Kit) -> None:
    scopes = team_and_key(1000, None)
    res = await kit.store.reserve("r1", scopes, 100)
    assert isinstance(res, Reservation)
    await kit.store.settle(res, 1200)  # the actual cost is charged even past the limit
    assert await row(kit.store, "team:search") == (1200, 0)
    assert await row(kit.store, "key:search/prod") == (1200, 0)
    refused = await kit.store.reserve("r2", scopes, 0)
    assert isinstance(refused, BudgetRejection)
    assert refused.spent_nano == 1200


async def test_settle_is_idempotent(kit: Kit) -> None:
    scopes = team_and_key(1000, 500)
    res = await kit.store.reserve("r1", scopes, 400)
    other = await kit.store.reserve("r2", scopes, 50)
    assert isinstance(res, Reservation) and isinstance(other, Reservation)
    await kit.store.settle(res, 100)
    await kit.store.settle(res, 100)
    await kit.store.settle(res, 999)
    assert await row(kit.store, "team:search") == (100, 50)
    assert await row(kit.store, "key:search/prod") == (100, 50)


async def test_request_id_cannot_be_reserved_twice(kit: Kit) -> None:
    scopes = team_and_key(1000, None)
    res = await kit.store.reserve("r1", scopes, 10)
    assert isinstance(res, Reservation)
    with pytest.raises(ValueError, match="already reserved"):
        await kit.store.reserve("r1", scopes, 10)
    await kit.store.settle(res, 10)
    with pytest.raises(ValueError, match="already reserved"):
        await kit.store.reserve("r1", scopes, 10)
    assert await row(kit.store, "team:search") == (10, 0)


async def test_release_settles_zero(kit: Kit) -> None:
    scopes = team_and_key(1000, 1000)
    res = await kit.store.reserve("r1", scopes, 1000)
    assert isinstance(res, Reservation)
    await kit.store.settle(res, 0)
    assert await row(kit.store, "team:search") == (0, 0)
    assert await row(kit.store, "key:search/prod") == (0, 0)
    assert isinstance(await kit.store.reserve("r2", scopes, 1000), Reservation)


async def test_expired_reservation_is_released(kit: Kit) -> None:
    store = await kit.open(reservation_ttl_s=1)
    scopes = team_and_key(100, None)
    crashed = await store.reserve("crashed", scopes, 80)
    assert isinstance(crashed, Reservation)
    assert isinstance(await store.reserve("r2", scopes, 80), BudgetRejection)
    await kit.pass_time(1.2)
    assert isinstance(await store.reserve("r3", scopes, 80), Reservation)
    assert await row(store, "team:search") == (0, 80)
    # a settle arriving after its reservation expired still records the spend, once
    await store.settle(crashed, 30)
    await store.settle(crashed, 30)
    assert await row(store, "team:search") == (30, 80)
    assert await row(store, "key:search/prod") == (30, 80)


async def test_spend_releases_expired_reservations(kit: Kit) -> None:
    store = await kit.open(reservation_ttl_s=1)
    assert isinstance(await store.reserve("r1", team_and_key(100, None), 80), Reservation)
    assert await row(store, "team:search") == (0, 80)
    await kit.pass_time(1.2)
    assert await row(store, "team:search") == (0, 0)


async def test_period_rollover(kit: Kit) -> None:
    kit.clock.now = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp()
    team = BudgetConfig(limit_usd=Decimal("1"), period="monthly")
    key = BudgetConfig(limit_usd=Decimal("0.5"), period="daily")

    def scopes() -> tuple[BudgetScope, ...]:
        return budget_scopes("search", "prod", team, key, kit.clock())

    res = await kit.store.reserve("nov", scopes(), USD // 2)
    assert isinstance(res, Reservation)
    await kit.store.settle(res, USD // 2)
    refused = await kit.store.reserve("nov-2", scopes(), 1)
    assert isinstance(refused, BudgetRejection)
    assert refused.scope.scope_id == "key:search/prod" and refused.scope.period_key == "2026-11-30"

    kit.clock.now += 1  # 2026-12-01T00:00:00Z: a new day and a new month, no job ran
    assert [s.period_key for s in scopes()] == ["2026-12", "2026-12-01"]
    res = await kit.store.reserve("dec", scopes(), USD // 2)
    assert isinstance(res, Reservation)
    await kit.store.settle(res, USD // 4)
    rows = await kit.store.spend()
    assert rows == [
        SpendRow("key:search/prod", "2026-11-30", USD // 2, 0),
        SpendRow("key:search/prod", "2026-12-01", USD // 4, 0),
        SpendRow("team:search", "2026-11", USD // 2, 0),
        SpendRow("team:search", "2026-12", USD // 4, 0),
    ]


async def test_unlimited_scopes_record_spend(kit: Kit) -> None:
    scopes = budget_scopes("search", "prod", None, None, kit.clock())
    assert [(s.period_key, s.limit_nano) for s in scopes] == [("total", None), ("total", None)]
    res = await kit.store.reserve("r1", scopes, 10**15)
    assert isinstance(res, Reservation)
    await kit.store.settle(res, 12_345)
    assert await kit.store.spend() == [
        SpendRow("key:search/prod", "total", 12_345, 0),
        SpendRow("team:search", "total", 12_345, 0),
    ]


async def test_spend_rows_filter_and_groups(kit: Kit) -> None:
    search = team_and_key(None, None)
    ads = (scope("team:ads", None, group="ads"), scope("key:ads/web", 500, group="ads"))
    for i, (scopes, cost) in enumerate([(search, 7), (ads, 11), (search, 5)]):
        res = await kit.store.reserve(f"r{i}", scopes, 20)
        assert isinstance(res, Reservation)
        await kit.store.settle(res, cost)
    pending = await kit.store.reserve("pending", ads, 20)
    assert isinstance(pending, Reservation)
    assert await kit.store.spend() == [
        SpendRow("key:ads/web", "2026-11", 11, 20),
        SpendRow("key:search/prod", "2026-11", 12, 0),
        SpendRow("team:ads", "2026-11", 11, 20),
        SpendRow("team:search", "2026-11", 12, 0),
    ]
    assert await kit.store.spend(("team:ads", "key:search/prod")) == [
        SpendRow("key:search/prod", "2026-11", 12, 0),
        SpendRow("team:ads", "2026-11", 11, 20),
    ]
    assert await kit.store.spend(("team:nobody",)) == []
    assert await kit.store.spend(()) == []


async def test_balances_of_exact_scopes(kit: Kit) -> None:
    scopes = team_and_key(1000, None)
    assert await kit.store.balances(scopes) == [
        SpendRow("team:search", "2026-11", 0, 0),
        SpendRow("key:search/prod", "2026-11", 0, 0),
    ]
    done = await kit.store.reserve("done", scopes, 300)
    assert isinstance(done, Reservation)
    await kit.store.settle(done, 120)
    assert isinstance(await kit.store.reserve("open", scopes, 200), Reservation)
    other_period = (scope("team:search", 1000, period_key="2026-12"),)
    assert await kit.store.balances(scopes[::-1] + other_period) == [
        SpendRow("key:search/prod", "2026-11", 120, 200),
        SpendRow("team:search", "2026-11", 120, 200),
        SpendRow("team:search", "2026-12", 0, 0),
    ]
    assert await kit.store.balances(()) == []


async def test_balances_by_group_reads_any_number_of_teams_in_order(kit: Kit) -> None:
    teams = [f"team-{i}" for i in range(7)]
    for i, name in enumerate(teams):
        scopes = (scope(f"team:{name}", None, group=name), scope(f"key:{name}/k", 10, group=name))
        res = await kit.store.reserve(f"r{i}", scopes, 10)
        assert isinstance(res, Reservation)
        await kit.store.settle(res, i)
    # interleaved: scopes of one team are not adjacent, and one team is asked twice
    wanted = tuple(scope(f"key:{n}/k", 10, group=n) for n in teams) + tuple(
        scope(f"team:{n}", None, group=n) for n in reversed(teams)
    )
    wanted += (scope("team:nobody", None, group="nobody"),)
    rows = await balances_by_group(kit.store, wanted, concurrency=3)
    assert [r.scope_id for r in rows] == [s.scope_id for s in wanted]
    assert [r.spent_nano for r in rows] == [*range(7), *reversed(range(7)), 0]
    assert await balances_by_group(kit.store, ()) == []


async def test_balances_leave_out_expired_reservations(kit: Kit) -> None:
    store = await kit.open(reservation_ttl_s=1)
    scopes = team_and_key(1000, None)
    assert isinstance(await store.reserve("r1", scopes, 300), Reservation)
    await kit.pass_time(1.2)
    assert isinstance(await store.reserve("r2", scopes[1:], 50), Reservation)  # key scope only
    assert await store.balances(scopes) == [
        SpendRow("team:search", "2026-11", 0, 0),
        SpendRow("key:search/prod", "2026-11", 0, 50),
    ]


async def test_scope_ids_and_teams_with_odd_characters(kit: Kit) -> None:
    scopes = (
        scope("team:a}b{c:d", 100, group="a}b{c:d"),
        scope("key:a}b{c:d/k:1", 50, group="a}b{c:d"),
    )
    res = await kit.store.reserve("odd", scopes, 50)
    assert isinstance(res, Reservation)
    await kit.store.settle(res, 20)
    assert await kit.store.spend() == [
        SpendRow("key:a}b{c:d/k:1", "2026-11", 20, 0),
        SpendRow("team:a}b{c:d", "2026-11", 20, 0),
    ]


async def test_duplicate_scopes_are_a_caller_error(kit: Kit) -> None:
    team = scope("team:search", 100)
    with pytest.raises(ValueError, match="distinct"):
        await kit.store.reserve("r1", (team, team), 1)
    assert await kit.store.spend() == []


async def test_invalid_amounts(kit: Kit) -> None:
    with pytest.raises(ValueError):
        await kit.store.reserve("r1", team_and_key(10, None), -1)
    with pytest.raises(ValueError):
        await kit.store.reserve("r1", team_and_key(None, None), MAX_AMOUNT_NANO + 1)
    res = await kit.store.reserve("r2", team_and_key(10, None), 1)
    assert isinstance(res, Reservation)
    await kit.store.settle(res, -1)  # the request was served: a negative cost counts as 0
    assert await row(kit.store, "team:search") == (0, 0)


# rate windows


def rscope(
    rpm: int | None = None, tpm: int | None = None, scope_id: str = "team:search"
) -> RateScope:
    return RateScope(scope_id, "search", rpm, tpm)


async def test_rpm_refuses_with_retry_after(kit: Kit) -> None:
    scopes = (rscope(rpm=2),)
    assert (await kit.store.rate_acquire(scopes, 0)).allowed
    assert (await kit.store.rate_acquire(scopes, 0)).allowed
    decision = await kit.store.rate_acquire(scopes, 0)
    assert not decision.allowed
    assert decision.limited_by == "requests"
    assert 29 < decision.retry_after_s <= 30.01  # one request frees up every 30 s
    (state,) = decision.states
    assert (state.limit_requests, state.remaining_requests) == (2, 0)


async def test_tpm_refuses(kit: Kit) -> None:
    scopes = (rscope(rpm=100, tpm=1000),)
    assert (await kit.store.rate_acquire(scopes, 600)).allowed
    decision = await kit.store.rate_acquire(scopes, 600)
    assert not decision.allowed
    assert decision.limited_by == "tokens"
    assert 11.5 < decision.retry_after_s <= 12.01  # 200 tokens more than fit; 1000 per 60 s
    # a request larger than the whole limit never fits
    huge = await kit.store.rate_acquire((rscope(tpm=1000, scope_id="key:search/x"),), 1001)
    assert not huge.allowed and huge.limited_by == "tokens" and huge.retry_after_s > 0


async def test_rate_states_remaining(kit: Kit) -> None:
    scopes = (rscope(rpm=10), rscope(tpm=1000, scope_id="key:search/prod"))
    decision = await kit.store.rate_acquire(scopes, 100)
    assert decision.allowed and decision.retry_after_s == 0 and decision.limited_by is None
    team, key = decision.states
    assert team.scope_id == "team:search" and key.scope_id == "key:search/prod"
    assert (team.limit_requests, team.remaining_requests) == (10, 9)
    assert 5.9 < team.reset_requests_s <= 6.0
    assert (team.limit_tokens, team.remaining_tokens) == (None, None)
    assert (key.limit_requests, key.remaining_requests) == (None, None)
    assert key.limit_tokens == 1000 and key.remaining_tokens in (900, 901)
    assert 5.9 < key.reset_tokens_s <= 6.0


async def test_rate_all_or_nothing(kit: Kit) -> None:
    scopes = (rscope(rpm=100), rscope(rpm=1, scope_id="key:search/prod"))
    assert (await kit.store.rate_acquire(scopes, 0)).allowed
    refused = await kit.store.rate_acquire(scopes, 0)
    assert not refused.allowed and refused.limited_by == "requests"
    team_state = refused.states[0]
    assert team_state.remaining_requests == 99  # the refused request was not counted anywhere
    only_team = await kit.store.rate_acquire(scopes[:1], 0)
    assert only_team.allowed and only_team.states[0].remaining_requests == 98


async def test_rate_add_tokens(kit: Kit) -> None:
    scopes = (rscope(rpm=100, tpm=1000), rscope(rpm=50, scope_id="key:search/prod"))
    assert (await kit.store.rate_acquire(scopes, 100)).allowed
    await kit.store.rate_add_tokens(scopes, 800)  # the output, learned after admission
    decision = await kit.store.rate_acquire(scopes, 200)
    assert not decision.allowed and decision.limited_by == "tokens"
    assert decision.states[0].remaining_tokens in (100, 101)
    assert decision.states[1].remaining_requests == 49
    assert (await kit.store.rate_acquire(scopes, 50)).allowed


async def test_rate_without_scopes_admits(kit: Kit) -> None:
    team_rl = RateLimitConfig(rpm=None, tpm=None)
    assert rate_scopes("search", "prod", team_rl, None) == ()
    decision = await kit.store.rate_acquire((), 10**9)
    assert decision.allowed and decision.states == ()
    await kit.store.rate_add_tokens((), 10)


# claim_once: who sends a budget alert


async def test_claim_once_has_one_winner(kit: Kit) -> None:
    key = "team:search:2026-11:0.8"
    assert await kit.store.claim_once(key, "search", 3600) is True
    assert await kit.store.claim_once(key, "search", 3600) is False
    other = await kit.open()  # another process or replica on the same store
    assert await other.claim_once(key, "search", 3600) is False
    assert await other.claim_once("team:search:2026-11:1.0", "search", 3600) is True
    assert await kit.store.claim_once(key, "other-team", 3600) is True  # groups are apart


async def test_concurrent_claims_have_one_winner(kit: Kit) -> None:
    other = await kit.open()
    stores = [kit.store, other] * 10
    results = await asyncio.gather(
        *(s.claim_once("key:search/prod:2026-11:0.5", "search", 60) for s in stores)
    )
    assert sorted(results) == [False] * 19 + [True]


async def test_claim_expires_after_its_ttl(kit: Kit) -> None:
    assert await kit.store.claim_once("team:search:2026-11-26:0.5", "search", 0.3) is True
    assert await kit.store.claim_once("team:search:2026-11-26:0.5", "search", 0.3) is False
    await kit.pass_time(0.5)
    assert await kit.store.claim_once("team:search:2026-11-26:0.5", "search", 0.3) is True


async def test_claim_without_ttl_lasts(kit: Kit) -> None:
    assert await kit.store.claim_once("team:a{b}:total:1.0", "a{b}%", None) is True
    await kit.pass_time(0.3)
    kit.clock.now += 10 * 365 * 86400  # local stores: ten years on
    assert await kit.store.claim_once("team:a{b}:total:1.0", "a{b}%", None) is False


# lifecycle


async def test_calls_before_start_raise_store_error(kit: Kit) -> None:
    store = kit.opener(900)
    with pytest.raises(StoreError, match="not started"):
        await store.reserve("r1", team_and_key(1, None), 1)
    assert await store.ping() is False
    with pytest.raises(StoreError, match="not started"):
        await store.claim_once("k", "search", 1)
    await store.close()


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    config = StoreConfig(path=str(tmp_path / "x.db"))
    # a gateway (processes given): leases whenever other processes share the budgets
    one = open_store(config, processes=1)
    assert type(one) is LocalStore  # one worker: the in-memory ledger, exact without leases
    two = open_store(config, processes=2)
    assert isinstance(two, LeasedStore) and type(two.inner) is LocalStore
    for shared, cls in (
        (StoreConfig(backend="redis"), RedisStore),
        (StoreConfig(backend="redis_cluster"), RedisClusterStore),
    ):
        leased = open_store(shared, processes=1)
        assert isinstance(leased, LeasedStore) and type(leased.inner) is cls
        # a tool reading the store (tallygate spend): the bare backend
        assert type(open_store(shared)) is cls
    assert type(open_store(config)) is LocalStore


async def test_redis_keys_carry_the_team_hash_tag_and_expire(redis_server: RedisServer) -> None:
    redis_server.flushall()
    store = RedisStore(StoreConfig(backend="redis", redis_url=redis_server.url))
    monthly = BudgetConfig(limit_usd=Decimal(1), period="monthly")
    team, key = budget_scopes("search", "prod", monthly, None, time.time())  # a current period
    await store.start()
    try:
        res = await store.reserve("r1", (team, key), 10)
        assert isinstance(res, Reservation)
        await store.settle(res, 5)
        # a period long gone: its keys are kept rather than expired on arrival
        old = BudgetScope("team:search", "search", "2020-01", ts(2020, 2, 1), 1000)
        res = await store.reserve("r2", (old,), 10)
        assert isinstance(res, Reservation)
    finally:
        await store.close()
    ledger = ledger_key("search", "team:search", team.period_key)
    assert ledger == f"tallygate:{{search}}:ledger:team:search:{team.period_key}"
    assert redis_server.command("EXISTS", ledger) == b":1"
    assert team.period_end is not None  # the ledger lives until 35 days after its period ends
    assert redis_server.command("EXPIRETIME", ledger) == b":%d" % (
        int(team.period_end) + 35 * 86400
    )
    total = ledger_key("search", "key:search/prod", "total")
    assert redis_server.command("TTL", total) == b":-1"  # exists, never expires
    assert redis_server.command("TTL", ledger_key("search", "team:search", "2020-01")) == b":-1"
    assert redis_server.command("EXISTS", "tallygate:{search}:req:r1") == b":1"  # tombstone
    assert ledger_key("a{b}", "team:a{b}", "total").startswith("tallygate:{a%7Bb%7D}:ledger:")


async def test_redis_claims_carry_the_team_hash_tag_and_expire(
    redis_server: RedisServer,
) -> None:
    redis_server.flushall()
    store = RedisStore(StoreConfig(backend="redis", redis_url=redis_server.url))
    await store.start()
    try:
        assert await store.claim_once("team:search:2026-11:0.5", "search", 3600)
        assert await store.claim_once("team:search:total:0.5", "search", None)
    finally:
        await store.close()
    dated = claim_key("search", "team:search:2026-11:0.5")
    assert dated == "tallygate:{search}:once:team:search:2026-11:0.5"
    assert 3500 <= int(redis_server.command("TTL", dated)[1:]) <= 3600
    assert redis_server.command("TTL", claim_key("search", "team:search:total:0.5")) == b":-1"
