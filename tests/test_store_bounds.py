"""The ledger cannot be poisoned: absurd amounts are refused or clamped, ledgers saturate instead
of overflowing, one bad row never blocks a flush, and every other team's spend survives a restart.

Run on the local store with the in-memory ledger (one process), the local store in SQLite
transactions (several processes), and Redis (a real redis-server).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pydantic
import pytest

from policies.budget import limit_nano
from policies.config import BudgetConfig, StoreConfig
from policies.stores.base import (
    MAX_AMOUNT_NANO,
    MAX_LEDGER_NANO,
    BudgetRejection,
    BudgetScope,
    Reservation,
    SpendRow,
    Store,
)
from policies.stores.ledger_memory import ROW_ATTEMPTS
from policies.stores.local import LocalStore
from policies.stores.redis import RedisStore, ledger_key, request_key, reservations_key
from tests.redis_server import RedisServer, require_redis_server
from tests.redis_server import redis_server as redis_server  # the session fixture

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp()
END = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
USD = 10**9
PERIOD = "2026-11"
# $10 per million output tokens: what 10^18 reported tokens or a 10^17 max_tokens cost
NANO_PER_TOKEN = 10_000
POISONED_USAGE = 10**18 * NANO_PER_TOKEN
POISONED_RESERVATION = 10**17 * NANO_PER_TOKEN
A = MAX_AMOUNT_NANO


def scopes_of(team: str, limit: int | None = 100 * USD) -> tuple[BudgetScope, ...]:
    return (
        BudgetScope(f"team:{team}", team, PERIOD, END, limit),
        BudgetScope(f"key:{team}/prod", team, PERIOD, END, None),
    )


@dataclass
class Kit:
    """One backend, not started: open() starts a store, restart() closes every store and
    opens a new one on the same file or the same Redis, seed() writes a ledger row directly."""

    mode: str  # "memory" (local, processes=1) | "shared" (local, processes=2) | "redis"
    path: Path
    server: RedisServer | None = None
    stores: list[Store] = field(default_factory=list)

    def make(self) -> Store:
        if self.server is not None:
            return RedisStore(StoreConfig(backend="redis", redis_url=self.server.url))
        processes = 1 if self.mode == "memory" else 2
        return LocalStore(StoreConfig(path=str(self.path)), processes=processes, clock=lambda: NOW)

    async def open(self) -> Store:
        store = self.make()
        await store.start()
        self.stores.append(store)
        return store

    async def close_all(self) -> None:
        while self.stores:
            await self.stores.pop().close()

    async def restart(self) -> Store:
        await self.close_all()
        return await self.open()

    async def seed(self, scope: BudgetScope, spent: int, reserved: int = 0) -> None:
        """Write a ledger row as the store keeps it (no store may be open in memory mode)."""
        if self.server is not None:
            key = ledger_key(scope.group, scope.scope_id, scope.period_key)
            assert self.server.command("HSET", key, "spent", str(spent)).startswith(b":")
            assert self.server.command("HSET", key, "reserved", str(reserved)).startswith(b":")
            return
        assert not (self.mode == "memory" and self.stores), "memory mode: seed before open()"
        schema = LocalStore(StoreConfig(path=str(self.path)), processes=2)
        await schema.start()  # creates the tables
        await schema.close()
        conn = sqlite3.connect(self.path)
        try:
            conn.execute(
                "INSERT OR REPLACE INTO ledger VALUES (?, ?, ?, ?)",
                (scope.scope_id, scope.period_key, spent, reserved),
            )
            conn.commit()
        finally:
            conn.close()


@pytest.fixture(params=["memory", "shared", "redis"])
async def kit(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Kit]:
    server = None
    if request.param == "redis":
        require_redis_server()
        server = request.getfixturevalue("redis_server")
        server.flushall()
    kit = Kit(request.param, tmp_path / "ledger.db", server)
    try:
        yield kit
    finally:
        await kit.close_all()


async def charge(store: Store, request_id: str, team: str, amount: int, actual: int) -> None:
    res = await store.reserve(request_id, scopes_of(team), amount)
    assert isinstance(res, Reservation), res
    await store.settle(res, actual)


async def spent_of(store: Store, team: str) -> tuple[int, int]:
    rows = await store.spend((f"team:{team}",))
    assert len(rows) == 1, rows
    return rows[0].spent_nano, rows[0].reserved_nano


# refusing and clamping


async def test_a_reservation_above_the_bound_is_refused_and_changes_nothing(kit: Kit) -> None:
    store = await kit.open()
    await charge(store, "before", "search", 5 * USD, 3 * USD)
    held = await store.reserve("held", scopes_of("search"), 2 * USD)
    assert isinstance(held, Reservation)
    before = await store.spend()
    for amount in (POISONED_RESERVATION, A + 1, -1):
        with pytest.raises(ValueError, match="amount_nano"):
            await store.reserve("poison", scopes_of("search"), amount)
        with pytest.raises(ValueError, match="amount_nano"):  # refused on unlimited scopes too
            await store.reserve("poison", scopes_of("search", limit=None), amount)
    assert await store.spend() == before
    # the request id was not taken, and the bound itself is a valid reservation
    at_bound = await store.reserve("poison", scopes_of("ads", limit=None), A)
    assert isinstance(at_bound, Reservation)
    assert await spent_of(store, "ads") == (0, A)
    assert await spent_of(store, "search") == (3 * USD, 2 * USD)


async def test_settle_clamps_into_the_amount_bound(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    store = await kit.open()
    reservations = []
    for request_id in ("huge", "negative", "bound", "normal"):
        res = await store.reserve(request_id, scopes_of("search", limit=None), USD)
        assert isinstance(res, Reservation)
        reservations.append(res)
    huge, negative, bound, normal = reservations
    with caplog.at_level(logging.WARNING, logger="tallygate.store"):
        await store.settle(huge, 10**27)
        assert await spent_of(store, "search") == (A, 3 * USD)
        await store.settle(negative, -5)
        assert await spent_of(store, "search") == (A, 2 * USD)
        await store.settle(bound, A)
        await store.settle(normal, 123_456_789)
    assert await spent_of(store, "search") == (2 * A + 123_456_789, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # the bound itself and a normal cost are not clamped
    assert "settle huge" in warnings[0] and str(10**27) in warnings[0]
    assert f"recorded as {A}" in warnings[0]
    assert "settle negative" in warnings[1] and "-5" in warnings[1]
    assert "recorded as 0" in warnings[1]
    await kit.restart()
    assert await spent_of(kit.stores[0], "search") == (2 * A + 123_456_789, 0)


# saturation


async def test_spent_saturates_at_the_ledger_bound(kit: Kit) -> None:
    near, beyond = scopes_of("near", limit=None), scopes_of("beyond", limit=None)
    start = MAX_LEDGER_NANO - 5 * A - A // 2
    await kit.seed(near[0], start)
    # an int64 value only an older version could have written: settling must not overflow
    await kit.seed(beyond[0], 2**63 - 1)
    store = await kit.open()
    for i in range(8):
        res = await store.reserve(f"near-{i}", near, A)
        assert isinstance(res, Reservation)
        await store.settle(res, A)
        assert await spent_of(store, "near") == (min(start + (i + 1) * A, MAX_LEDGER_NANO), 0)
    beyond_res = await store.reserve("beyond", beyond, A)
    assert isinstance(beyond_res, Reservation)
    await store.settle(beyond_res, A)
    assert await spent_of(store, "beyond") == (MAX_LEDGER_NANO, 0)
    # a limited scope at the bound refuses everything, even a reservation of 0
    full = (BudgetScope("team:near", "near", PERIOD, END, 10**9 * USD),)
    refused = await store.reserve("refused", full, 0)
    assert isinstance(refused, BudgetRejection) and refused.spent_nano == MAX_LEDGER_NANO
    store = await kit.restart()
    assert await spent_of(store, "near") == (MAX_LEDGER_NANO, 0)
    assert await spent_of(store, "beyond") == (MAX_LEDGER_NANO, 0)
    assert (await store.spend(("key:near/prod",)))[0].spent_nano == 8 * A  # exact below the bound
    if kit.server is None:  # the file itself holds the bound, as an INTEGER
        await kit.close_all()
        written = file_spent(kit.path)
        assert [written["team:near"], written["team:beyond"]] == [MAX_LEDGER_NANO] * 2
        assert type(written["team:near"]) is int and type(written["team:beyond"]) is int


async def test_reserved_saturates_and_never_goes_negative(kit: Kit) -> None:
    if kit.mode == "memory":
        pytest.skip("memory mode derives reserved from the reservations, not the ledger column")
    scopes = scopes_of("search", limit=None)
    await kit.seed(scopes[0], 0, MAX_LEDGER_NANO - A // 2)  # e.g. held by a crashed worker
    store = await kit.open()
    res = await store.reserve("r1", scopes, A)
    assert isinstance(res, Reservation)
    assert await spent_of(store, "search") == (0, MAX_LEDGER_NANO)
    await store.settle(res, 7)
    assert await spent_of(store, "search") == (7, MAX_LEDGER_NANO - A)
    key_row = (await store.spend(("key:search/prod",)))[0]
    assert (key_row.spent_nano, key_row.reserved_nano) == (7, 0)


# poisoned usage, then a restart


async def test_poisoned_usage_leaves_every_other_team_exact_after_a_restart(
    kit: Kit,
) -> None:
    store = await kit.open()
    expected: dict[str, int] = {"ads": 0, "docs": 0}

    async def honest(round_: int) -> None:
        for i, team in enumerate(("ads", "docs")):
            for j in range(5):
                cost = 123_456_789 * (round_ + 1) + 1_000 * i + j  # every nano-dollar counts
                await charge(store, f"{team}-{round_}-{j}", team, 2 * USD, cost)
                expected[team] += cost

    await honest(0)
    # upstream reports 10^18 tokens: the request was served, its cost is clamped
    await charge(store, "poisoned-usage", "search", 2 * USD, POISONED_USAGE)
    with pytest.raises(ValueError):  # max_tokens: 1e17
        await store.reserve("poisoned-reservation", scopes_of("search"), POISONED_RESERVATION)
    await honest(1)
    await asyncio.sleep(0.1)  # memory mode: let the flusher write (and fail, if it could)
    await honest(2)

    store = await kit.restart()
    expected["search"] = A  # the poisoned request, recorded at the bound
    assert await store.spend() == sorted(
        (
            SpendRow(f"{kind}:{team}{suffix}", PERIOD, spent, 0)
            for team, spent in expected.items()
            for kind, suffix in (("team", ""), ("key", "/prod"))
        ),
        key=lambda row: row.scope_id,
    )
    # and the ledger keeps working after the restart
    await charge(store, "after", "ads", USD, 1)
    assert await spent_of(store, "ads") == (expected["ads"] + 1, 0)


# one bad row in a flush (memory mode: the flusher)


async def wait_until(check: object, what: str, within_s: float = 5.0) -> None:
    """Poll ``check()`` until true; fail after ``within_s`` (a deadline, not a timing assert)."""
    deadline = time.monotonic() + within_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def file_spent(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT scope_id, spent_nano FROM ledger WHERE period_key = ?", (PERIOD,)
        )
        return dict(rows.fetchall())
    finally:
        conn.close()


def drops(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "dropping spend" in r.getMessage()]


POISON = ("team:poison", PERIOD)
UNSTORABLE = 2**64  # "Python int too large to convert to SQLite INTEGER"


async def test_a_row_sqlite_rejects_does_not_block_the_flush(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kit = Kit("memory", tmp_path / "ledger.db")
    store = await kit.open()
    assert isinstance(store, LocalStore) and store._mem is not None
    try:
        with caplog.at_level(logging.WARNING, logger="tallygate.store"):
            await charge(store, "a-0", "ads", USD, 11)
            await wait_until(lambda: file_spent(kit.path).get("team:ads") == 11, "first flush")
            # a value SQLite cannot hold, where the flusher reads the spend to write
            store._mem.deltas[POISON] = UNSTORABLE
            await charge(store, "a-1", "ads", USD, 22)
            await charge(store, "d-0", "docs", USD, 33)
            await wait_until(lambda: len(drops(caplog)) == 1, "the bad row to be dropped")
            written = file_spent(kit.path)
            assert (written["team:ads"], written["key:ads/prod"]) == (33, 33)
            assert (written["team:docs"], written["key:docs/prod"]) == (33, 33)
            assert "team:poison" not in written
            (drop,) = drops(caplog)
            assert f"rejected {ROW_ATTEMPTS} times" in drop
            assert "scope team:poison period 2026-11" in drop and str(UNSTORABLE) in drop
            assert POISON not in store._mem.deltas  # out of the retry loop
            # the flusher lives on: the next spend reaches the file too
            await charge(store, "d-1", "docs", USD, 44)
            await wait_until(lambda: file_spent(kit.path).get("team:docs") == 77, "next flush")
            assert store._flusher is not None and not store._flusher.done()
        assert len(drops(caplog)) == 1  # logged once
    finally:
        await kit.close_all()
    store = await kit.open()
    assert await spent_of(store, "ads") == (33, 0)
    assert await spent_of(store, "docs") == (77, 0)
    assert await store.spend(("team:poison",)) == []


async def test_a_row_sqlite_rejects_at_close_does_not_lose_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kit = Kit("memory", tmp_path / "ledger.db")
    store = await kit.open()
    assert isinstance(store, LocalStore) and store._mem is not None
    held = await store.reserve("in-flight", scopes_of("docs"), 5 * USD)
    assert isinstance(held, Reservation)
    await charge(store, "a-0", "ads", USD, 12_345)
    store._mem.deltas[POISON] = UNSTORABLE  # no await until close: the flusher has not run
    with caplog.at_level(logging.WARNING, logger="tallygate.store"):
        await kit.close_all()
    assert len(drops(caplog)) == 1
    assert not any("spend lost" in r.getMessage() for r in caplog.records)
    store = await kit.open()
    assert await spent_of(store, "ads") == (12_345, 0)
    assert await spent_of(store, "docs") == (0, 5 * USD)  # the reservation was handed over
    await store.settle(held, 4 * USD)
    assert await spent_of(store, "docs") == (4 * USD, 0)


# Redis scripts guard themselves (the Python side refuses and clamps first)


async def test_redis_scripts_refuse_and_clamp_on_their_own(redis_server: RedisServer) -> None:
    redis_server.flushall()
    store = RedisStore(StoreConfig(backend="redis", redis_url=redis_server.url))
    await store.start()
    try:
        (team,) = scopes_of("search")[:1]
        ledger = ledger_key("search", team.scope_id, PERIOD)
        keys = [
            request_key("search", "raw"),
            ledger,
            reservations_key("search", team.scope_id, PERIOD),
        ]
        refused = await store._script(
            "reserve", keys, [f"{POISONED_RESERVATION}:raw", POISONED_RESERVATION, 60_000, "", 0]
        )
        assert refused == [-2]
        assert redis_server.command("EXISTS", ledger) == b":0"  # nothing changed
        redis_server.command("HSET", ledger, "spent", str(2**63 - 10))  # HINCRBY would overflow
        settled = await store._script("settle", keys, ["1:raw", 1, str(10**27), 60_000, 0])
        assert settled == [str(MAX_LEDGER_NANO).encode(), b"0"]  # the balances after it
        assert redis_server.command("HGET", ledger, "spent") == b"$19"  # a bulk string ...
        assert (await store.balances((team,)))[0].spent_nano == MAX_LEDGER_NANO  # ... the bound
        redis_server.command("HSET", ledger, "spent", "5")
        again = [request_key("search", "raw2"), *keys[1:]]
        await store._script("settle", again, ["1:raw2", 1, str(10**27), 60_000, 0])
        assert (await store.balances((team,)))[0].spent_nano == 5 + A  # clamped in Lua
    finally:
        await store.close()


# budget limits stay below the ledger bound


def test_budget_limits_are_at_most_a_billion_dollars() -> None:
    top = BudgetConfig(limit_usd=Decimal(10**9))
    assert limit_nano(top) < MAX_LEDGER_NANO
    with pytest.raises(pydantic.ValidationError):
        BudgetConfig(limit_usd=Decimal(10**9) + Decimal("0.01"))
