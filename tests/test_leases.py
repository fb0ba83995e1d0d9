"""The lease lifecycle (policies/stores/leases.py): several LeasedStores on one real store (an SQLite
file shared as by two workers; Redis where its own clock matters), with an injected clock.

Young leases admit in memory; old ones, and those past their period's end, admit no more;
a lease goes back to the store as soon as none of its requests is in flight; a refused
slice falls back to an exact reservation; close() charges what is still in flight; a dead
process's lease is released after reservation_ttl_s; a cost past the lease is written at
once; rate capacity is leased and given back; balances come from memory.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from policies.config import StoreConfig
from policies.stores.base import (
    BudgetRejection,
    BudgetScope,
    RateScope,
    Reservation,
    SpendRow,
    Store,
)
from policies.stores.leases import LeasedStore, LeaseTuning
from policies.stores.local import LocalStore
from policies.stores.redis import RedisStore
from tests.redis_server import RedisServer, require_redis_server
from tests.redis_server import redis_server as redis_server  # the session fixture

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp()
END = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
TTL = 60.0
EAGER = LeaseTuning(min_slice_requests=10)  # every lease holds ten requests' worth


def scopes(limit: int | None, key: str = "prod", end: float = END) -> tuple[BudgetScope, ...]:
    return (
        BudgetScope("team:search", "search", "2026-11", end, limit),
        BudgetScope(f"key:search/{key}", "search", "2026-11", end, None),
    )


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Counted:
    """A real store with its calls counted by method name (what a lease saves)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return await attr(*args, **kwargs)

        return call


class Shared:
    """LeasedStores on one SQLite file (each its own LocalStore, as a worker process has),
    one clock; ``ledger()`` reads the file through a store of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = Clock()
        self.opened: list[LeasedStore] = []

    def config(self) -> StoreConfig:
        return StoreConfig(path=str(self.path), reservation_ttl_s=TTL)

    def bare(self) -> Counted:
        return Counted(LocalStore(self.config(), processes=2, clock=self.clock))

    async def open(self, tuning: LeaseTuning = EAGER, *, reaper: bool = True) -> LeasedStore:
        store = LeasedStore(self.bare(), self.config(), tuning=tuning, clock=self.clock)
        if reaper:
            await store.start()
            self.opened.append(store)
        else:  # a process that will die: no reaper task to leave behind
            await store.inner.start()
        return store

    async def ledger(self, scope_id: str = "team:search") -> tuple[int, int]:
        reader = LocalStore(self.config(), processes=2, clock=self.clock)
        await reader.start()
        try:
            rows = await reader.spend((scope_id,))
        finally:
            await reader.close()
        return (rows[0].spent_nano, rows[0].reserved_nano) if rows else (0, 0)


def calls(store: LeasedStore) -> Counter[str]:
    inner = store.inner
    assert isinstance(inner, Counted)
    return inner.calls


@pytest.fixture
async def shared(tmp_path: Path) -> AsyncIterator[Shared]:
    kit = Shared(tmp_path / "ledger.db")
    try:
        yield kit
    finally:
        for store in kit.opened:
            await store.close()


async def reserve_all(
    store: LeasedStore, prefix: str, n: int, amount: int, s: tuple[BudgetScope, ...]
) -> list[Reservation]:
    out = []
    for i in range(n):
        res = await store.reserve(f"{prefix}-{i}", s, amount)
        assert isinstance(res, Reservation)
        out.append(res)
    return out


# budget leases


async def test_a_young_lease_admits_in_memory_and_goes_back_once_idle(shared: Shared) -> None:
    a = await shared.open()
    held = await reserve_all(a, "a", 5, 100, scopes(10_000))
    # one lease call: ten requests' worth reserved in the store, five admitted from it
    assert calls(a)["admit"] == 1
    assert await shared.ledger() == (0, 1000)
    assert await a.spend(("team:search",)) == [SpendRow("team:search", "2026-11", 0, 500)]
    for res in held[:4]:
        await a.settle(res, 60)
    assert calls(a)["settle"] == 0  # settled in memory while a request is still in flight
    assert await shared.ledger() == (0, 1000)
    assert await a.balances(scopes(10_000)[:1]) == [SpendRow("team:search", "2026-11", 240, 100)]
    rows = await a.settle(held[4], 60)  # the last one: the lease goes back at once
    assert calls(a)["settle"] == 1
    assert await shared.ledger() == (300, 0)
    assert rows == [
        SpendRow("team:search", "2026-11", 300, 0),
        SpendRow("key:search/prod", "2026-11", 300, 0),
    ]
    await a.settle(held[0], 999)  # settling twice changes nothing
    assert await shared.ledger() == (300, 0)
    with pytest.raises(ValueError, match="already reserved"):
        await a.reserve("a-0", scopes(10_000), 1)


async def test_a_lease_admits_only_while_young(shared: Shared) -> None:
    a = await shared.open()
    (first,) = await reserve_all(a, "old", 1, 100, scopes(10_000))
    shared.clock.now += 0.99
    await reserve_all(a, "still", 1, 100, scopes(10_000))
    assert calls(a)["admit"] == 1
    shared.clock.now += 0.02  # the lease is more than a second old
    (late,) = await reserve_all(a, "new", 1, 100, scopes(10_000))
    assert calls(a)["admit"] == 2
    assert await shared.ledger() == (0, 2000)  # two leases out, the old one still busy
    for res in (first, late):
        await a.settle(res, 10)
    assert await shared.ledger() == (10, 1000)  # the old lease still holds "still"
    assert calls(a)["settle"] == 1


async def test_a_lease_never_admits_past_its_period_end(shared: Shared) -> None:
    a = await shared.open()
    ending = scopes(10_000, end=NOW + 0.5)
    (first,) = await reserve_all(a, "in", 1, 100, ending)
    shared.clock.now += 0.6  # past the period's end, within the lease's second
    (after,) = await reserve_all(a, "after", 1, 100, ending)
    assert calls(a)["admit"] == 2  # its own reservation, not the lease
    assert await shared.ledger() == (0, 1000 + 100)
    await a.settle(after, 100)
    await a.settle(first, 100)
    assert await shared.ledger() == (200, 0)


async def test_a_refused_slice_falls_back_to_an_exact_reservation(shared: Shared) -> None:
    a, b = await shared.open(), await shared.open(LeaseTuning())
    (big,) = await reserve_all(b, "b", 1, 800, scopes(1000))  # exact: above a quarter left
    # A's slice (a quarter of the limit it has not seen yet: 250) does not fit, 100 does
    (small,) = await reserve_all(a, "a", 1, 100, scopes(1000))
    assert calls(a)["admit"] == 2
    assert await shared.ledger() == (0, 900)
    refused = await a.reserve("a-2", scopes(1000), 250)
    # near exhaustion: straight to the exact call, refused with the store's own figures
    assert calls(a)["admit"] == 3
    assert refused == BudgetRejection(scopes(1000)[0], 0, 900, 250)
    await b.settle(big, 650)
    await a.settle(small, 100)
    assert await shared.ledger() == (750, 0)


async def test_idle_leases_go_back_before_an_exact_reservation(shared: Shared) -> None:
    a = await shared.open()
    # a request that leaves while its lease is being taken: the lease stays, idle
    waiter = asyncio.create_task(a.reserve("gone", scopes(1000, key="batch"), 25))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    for _ in range(200):
        if await shared.ledger() == (0, 250):
            break
        await asyncio.sleep(0.01)
    assert await shared.ledger() == (0, 250)
    # 800 only fits once that lease is back: the exact path gives it back first
    res = await a.reserve("big", scopes(1000), 800)
    assert isinstance(res, Reservation)
    assert await shared.ledger() == (0, 800)
    await a.settle(res, 1)


async def test_close_returns_every_lease_charging_requests_in_flight(shared: Shared) -> None:
    a = await shared.open()
    held = await reserve_all(a, "a", 3, 100, scopes(10_000))
    await a.settle(held[0], 40)
    shared.opened.remove(a)
    await a.close()
    # the two in flight are charged what they reserved: never less than they can cost
    assert await shared.ledger() == (240, 0)
    assert await a.settle(held[1], 10) == [  # a settlement after close changes nothing
        SpendRow("team:search", "2026-11", 240, 0),
        SpendRow("key:search/prod", "2026-11", 240, 0),
    ]
    assert await shared.ledger() == (240, 0)


async def test_a_dead_process_lease_is_released_after_the_reservation_ttl(shared: Shared) -> None:
    dead = await shared.open(reaper=False)
    await reserve_all(dead, "dead", 1, 100, scopes(1000))
    assert await shared.ledger() == (0, 250)  # a lease of a quarter of the limit
    await dead.inner.close()  # the process dies: nothing returned
    b = await shared.open(LeaseTuning())
    refused = await b.reserve("b-1", scopes(1000), 800)
    assert isinstance(refused, BudgetRejection) and refused.reserved_nano == 250
    shared.clock.now += TTL  # the store releases the dead lease like any reservation
    res = await b.reserve("b-2", scopes(1000), 800)
    assert isinstance(res, Reservation)
    assert await shared.ledger() == (0, 800)


async def test_a_cost_past_the_lease_is_written_at_once(shared: Shared) -> None:
    a, b = await shared.open(), await shared.open(LeaseTuning())
    held = await reserve_all(a, "a", 2, 100, scopes(5000))
    await a.settle(held[0], 1500)  # an upstream reporting far more than was reserved
    # the excess (1500 + 100 in flight - the lease's 1000) is in the store already
    assert await shared.ledger() == (600, 1000)
    assert await a.spend(("team:search",)) == [SpendRow("team:search", "2026-11", 1500, 100)]
    refused = await b.reserve("b", scopes(5000), 3500)  # 1500 + 100 + 3500 > 5000
    assert isinstance(refused, BudgetRejection)
    await a.settle(held[1], 100)
    assert await shared.ledger() == (1600, 0)


async def test_an_expired_lease_leaves_its_late_requests_their_spend(shared: Shared) -> None:
    a = await shared.open()
    (slow,) = await reserve_all(a, "slow", 1, 100, scopes(1000))
    shared.clock.now += TTL  # a request longer than the ttl: its lease expires
    await a.reap()
    assert await shared.ledger() == (0, 0)  # returned; nothing held any more
    await a.settle(slow, 70)
    await a.settle(slow, 70)
    assert await shared.ledger() == (70, 0)  # its spend still counts, once


async def test_balances_come_from_memory_stale_until_refreshed(shared: Shared) -> None:
    a, b = await shared.open(), await shared.open(LeaseTuning())
    (res,) = await reserve_all(a, "a", 1, 100, scopes(10_000))
    await a.settle(res, 100)
    (other,) = await reserve_all(b, "b", 1, 3000, scopes(10_000))
    await b.settle(other, 2000)  # another process spends
    before = calls(a)["balances"]
    team = scopes(10_000)[:1]
    assert await a.balances(team) == [SpendRow("team:search", "2026-11", 100, 0)]  # stale
    assert calls(a)["balances"] == before  # no store call
    assert await a.balances(team, fresh=True) == [SpendRow("team:search", "2026-11", 2100, 0)]
    b2 = await b.balances(team)
    assert b2 == [SpendRow("team:search", "2026-11", 2100, 0)]
    (more,) = await reserve_all(b, "b2", 1, 100, scopes(10_000))
    await b.settle(more, 100)
    shared.clock.now += 2.01  # figures older than 2 s are read again
    assert await a.balances(team) == [SpendRow("team:search", "2026-11", 2200, 0)]


# rate leases


def rate(rpm: int | None, tpm: int | None = None) -> tuple[RateScope, ...]:
    return (RateScope("team:search", "search", rpm, tpm),)


async def test_rate_capacity_is_leased_and_given_back(shared: Shared) -> None:
    a = await shared.open()
    decisions = [await a.rate_acquire(rate(1000, 100_000), 50) for _ in range(4)]
    assert all(d.allowed for d in decisions)
    assert calls(a)["rate_acquire"] == 1  # ten requests and 500 tokens taken at once
    # the headers' figures: the lease's view, one request and 50 tokens less each time
    assert [d.states[0].remaining_requests for d in decisions] == [999, 998, 997, 996]
    assert [d.states[0].remaining_tokens for d in decisions] == [99_950, 99_900, 99_850, 99_800]
    await a.rate_add_tokens(rate(1000, 100_000), 1000)  # output, counted into the lease
    assert calls(a)["rate_adjust"] == 0
    shared.clock.now += 1.0
    await a.reap()  # old: six requests and 300 tokens back, 1000 output tokens charged
    assert calls(a)["rate_adjust"] == 1
    reader = shared.bare()
    await reader.start()
    try:
        (state,) = await reader.rate_adjust(rate(1000, 100_000), 0, 0)
    finally:
        await reader.close()
    # the taken capacity drained for 1 s (16.7 requests, 1667 tokens: to 0), then the six
    # requests went back (still 0) and the output beyond the lease (1000 - 300 unused) was
    # charged: stricter than counting each request when it came (0 left), never looser
    assert state.remaining_requests == 1000
    assert state.remaining_tokens == 100_000 - 700


async def test_rate_leases_of_two_processes_never_pass_the_limit(shared: Shared) -> None:
    a, b = await shared.open(), await shared.open()
    admitted = 0
    for i in range(120):  # the clock stands still: nothing drains
        admitted += (await (a if i % 2 else b).rate_acquire(rate(40), 0)).allowed
    # slices shrink with the room left, then exact calls: none passes, none is lost
    assert admitted == 40
    assert calls(a)["rate_acquire"] + calls(b)["rate_acquire"] < 120


async def test_a_refused_rate_lease_falls_back_to_the_exact_call(shared: Shared) -> None:
    a, b = await shared.open(), await shared.open(LeaseTuning())
    for _ in range(8):
        assert (await b.rate_acquire(rate(10), 0)).allowed  # exact calls: 8 of 10 used
    first = await a.rate_acquire(rate(10), 0)  # a's slice: a quarter of the limit, 2
    second = await a.rate_acquire(rate(10), 0)
    assert first.allowed and second.allowed and calls(a)["rate_acquire"] == 1
    refused = await a.rate_acquire(rate(10), 0)  # the store showed no room: the exact call
    assert not refused.allowed and refused.limited_by == "requests"
    assert refused.states[0].remaining_requests == 0 and 5.9 < refused.retry_after_s <= 6.0


# on a real Redis: its clock, its scripts, and an outage


async def test_a_return_that_fails_is_retried_by_the_reaper() -> None:
    binary = require_redis_server()
    server = RedisServer(binary).start()
    config = StoreConfig(backend="redis", redis_url=server.url, timeout_s=0.5)
    store = LeasedStore(RedisStore(config), config, tuning=EAGER)
    await store.start()
    try:
        (res,) = await reserve_all(store, "r", 1, 100, scopes(10_000))
        server.pause()
        rows = await store.settle(res, 80)  # the return fails: kept, not raised
        assert rows[0] == SpendRow("team:search", "2026-11", 80, 0)
        server.resume()
        await store.reap()
        (team,) = await store.inner.balances(scopes(10_000)[:1])
        assert team == SpendRow("team:search", "2026-11", 80, 0)
    finally:
        await store.close()
        server.stop()


async def test_leases_on_redis_keep_two_replicas_exact(redis_server: RedisServer) -> None:
    redis_server.flushall()
    config = StoreConfig(backend="redis", redis_url=redis_server.url)
    replicas = [LeasedStore(RedisStore(config), config, tuning=EAGER) for _ in range(2)]
    for store in replicas:
        await store.start()
    try:

        async def one(i: int) -> int:
            res = await replicas[i % 2].reserve(f"r{i}", scopes(3000), 100)
            if isinstance(res, BudgetRejection):
                return 0
            await asyncio.sleep(0.001 * (i % 3))
            await replicas[i % 2].settle(res, 100)
            return 100

        spent = sum(await asyncio.gather(*(one(i) for i in range(100))))
        assert spent <= 3000
        for store in replicas:
            await store.reap()  # lease calls still in flight finish
        (team,) = await replicas[0].inner.balances(scopes(3000)[:1])
        assert team == SpendRow("team:search", "2026-11", spent, 0)
    finally:
        for store in replicas:
            await store.close()
