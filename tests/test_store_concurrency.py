"""Concurrent reservations never pass a limit together: tasks, OS processes, two Redis clients,
each bare and with leases (policies/stores/leases.py); outages."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable, Sequence
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
    StoreError,
)
from policies.stores.leases import LeasedStore
from policies.stores.local import LocalStore
from policies.stores.redis import RedisStore
from tests.redis_server import RedisServer, require_redis_server
from tests.redis_server import redis_server as redis_server  # the session fixture

AMOUNT = 1_000
LIMIT = 30 * AMOUNT + AMOUNT // 2  # fits 30 requests of AMOUNT
TASKS = 200
NOW = datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp()
END = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
SCOPES = (
    BudgetScope("team:search", "search", "2026-11", END, LIMIT),
    BudgetScope("key:search/prod", "search", "2026-11", END, None),
)
RATE = (RateScope("team:search", "search", 50, None),)


def exact(i: int) -> int:
    return AMOUNT


def varied(i: int) -> int:
    return (i * 137) % (AMOUNT + 1)  # 0..AMOUNT, never above what was reserved


async def hammer(
    stores: Sequence[Store], prefix: str, n: int, actual: Callable[[int], int]
) -> list[int]:
    """n concurrent reserve+settle requests spread over stores; the admitted ones' actual costs."""

    async def one(i: int) -> int | None:
        store = stores[i % len(stores)]
        res = await store.reserve(f"{prefix}-{i}", SCOPES, AMOUNT)
        if isinstance(res, BudgetRejection):
            return None
        await asyncio.sleep(0.001 * (i % 3))  # the upstream call: let others interleave
        await store.settle(res, actual(i))
        return actual(i)

    results = await asyncio.gather(*(one(i) for i in range(n)))
    return [cost for cost in results if cost is not None]


async def check_invariants(store: Store, costs: list[int], actual: Callable[[int], int]) -> None:
    if isinstance(store, LeasedStore):
        await store.reap()  # lease calls still in flight finish
        store = store.inner  # the store's own figures, not this process's view
    rows = await store.spend(("team:search",))
    assert rows == [SpendRow("team:search", "2026-11", sum(costs), 0)]
    assert sum(costs) <= LIMIT
    if actual is exact:
        assert len(costs) == LIMIT // AMOUNT
    else:
        assert len(costs) >= LIMIT // AMOUNT


@pytest.fixture(params=["local", "redis", "leased-local", "leased-redis"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Two clients of one store: two LocalStores on one file, or two RedisStores on one
    server; bare, or leased as open_store gives them to two gateway processes."""
    if request.param.endswith("local"):
        config = StoreConfig(path=str(tmp_path / "ledger.db"))
        opened: list[Store] = [LocalStore(config, processes=2), LocalStore(config, processes=2)]
    else:
        require_redis_server()
        server: RedisServer = request.getfixturevalue("redis_server")
        server.flushall()
        config = StoreConfig(backend="redis", redis_url=server.url)
        opened = [RedisStore(config), RedisStore(config)]  # as two gateway replicas would
    if request.param.startswith("leased-"):
        opened = [LeasedStore(store, config) for store in opened]
    for store in opened:
        await store.start()
    try:
        yield opened
    finally:
        for store in opened:
            await store.close()


@pytest.mark.parametrize("actual", [exact, varied], ids=["actual=reserved", "actual<=reserved"])
async def test_concurrent_reservations_one_client(
    stores: list[Store], actual: Callable[[int], int]
) -> None:
    costs = await hammer(stores[:1], "one", TASKS, actual)
    await check_invariants(stores[0], costs, actual)


@pytest.mark.parametrize("actual", [exact, varied], ids=["actual=reserved", "actual<=reserved"])
async def test_concurrent_reservations_two_clients(
    stores: list[Store], actual: Callable[[int], int]
) -> None:
    costs = await hammer(stores, "two", TASKS, actual)
    if isinstance(stores[0], LeasedStore):
        await stores[0].reap()
    await check_invariants(stores[1], costs, actual)


async def test_concurrent_rate_acquire_two_clients(stores: list[Store]) -> None:
    decisions = await asyncio.gather(*(stores[i % 2].rate_acquire(RATE, 1) for i in range(120)))
    admitted = sum(d.allowed for d in decisions)
    # rpm 50, and at most a request or two replenished while the test runs
    assert 50 <= admitted <= 52
    assert all(d.limited_by == "requests" for d in decisions if not d.allowed)


# several OS processes on one SQLite file (server.workers > 1)

PROCESSES = 4


def _process_main(
    path: str, worker: int, actual_name: str, barrier: Any, results: Any, leased: bool = False
) -> None:
    actual = {"exact": exact, "varied": varied}[actual_name]

    async def main() -> tuple[list[int], int]:
        # a frozen clock: the rate bucket does not refill while processes start at different times
        store: Store = LocalStore(StoreConfig(path=path), processes=PROCESSES, clock=lambda: NOW)
        if leased:  # as open_store gives it to a gateway worker (with the frozen clock)
            store = LeasedStore(store, StoreConfig(path=path), clock=lambda: NOW)
        await store.start()
        try:
            await asyncio.to_thread(barrier.wait)
            costs = await hammer([store], f"p{worker}", TASKS // PROCESSES, actual)
            decisions = await asyncio.gather(*(store.rate_acquire(RATE, 1) for _ in range(30)))
            return costs, sum(d.allowed for d in decisions)
        finally:
            await store.close()

    results.put((worker, *asyncio.run(main())))


@pytest.mark.parametrize("leased", [False, True], ids=["bare", "leased"])
@pytest.mark.parametrize("actual_name", ["exact", "varied"])
def test_processes_share_one_sqlite_file(tmp_path: Path, actual_name: str, leased: bool) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    path = str(tmp_path / "ledger.db")
    procs = [
        ctx.Process(target=_process_main, args=(path, w, actual_name, barrier, results, leased))
        for w in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
        results.close()
        results.join_thread()
    assert all(proc.exitcode == 0 for proc in procs)
    costs = [cost for _, worker_costs, _ in outcomes for cost in worker_costs]
    assert len({w for w, _, _ in outcomes}) == PROCESSES

    async def check() -> None:
        store = LocalStore(StoreConfig(path=path), clock=lambda: NOW)
        await store.start()
        try:
            await check_invariants(store, costs, exact if actual_name == "exact" else varied)
        finally:
            await store.close()

    asyncio.run(check())
    # the rate windows lived in the file too: rpm 50 across all processes together
    assert sum(rate for _, _, rate in outcomes) == 50


# durability and outages


async def test_local_spend_survives_reopening(tmp_path: Path) -> None:
    config = StoreConfig(path=str(tmp_path / "ledger.db"))
    store = LocalStore(config, clock=lambda: NOW)
    await store.start()
    done = await store.reserve("done", SCOPES, 400)
    assert isinstance(done, Reservation)
    await store.settle(done, 300)
    in_flight = await store.reserve("in-flight", SCOPES, 200)
    assert isinstance(in_flight, Reservation)
    await store.close()

    clock = [NOW]
    reopened = LocalStore(config, clock=lambda: clock[0])
    await reopened.start()
    try:
        assert await reopened.spend(("team:search",)) == [
            SpendRow("team:search", "2026-11", 300, 200)
        ]
        clock[0] += config.reservation_ttl_s  # the process that held "in-flight" died
        assert await reopened.spend(("team:search",)) == [
            SpendRow("team:search", "2026-11", 300, 0)
        ]
        await reopened.settle(in_flight, 150)  # ... or it did finish, late
        assert await reopened.spend(("team:search",)) == [
            SpendRow("team:search", "2026-11", 450, 0)
        ]
    finally:
        await reopened.close()


async def _raises_store_error(call: Any) -> None:
    """The call fails with StoreError, well within 5 s (the store's timeout is 0.5 s)."""
    with pytest.raises(StoreError):
        await asyncio.wait_for(call, 5)


async def test_redis_outage_raises_store_error_promptly() -> None:
    binary = require_redis_server()
    server = RedisServer(binary).start()
    store = RedisStore(StoreConfig(backend="redis", redis_url=server.url, timeout_s=0.5))
    await store.start()
    try:
        assert isinstance(await store.reserve("before", SCOPES, 10), Reservation)

        server.pause()  # hung: connections are accepted, nothing answers
        started = time.monotonic()
        await _raises_store_error(store.reserve("hung", SCOPES, 10))
        await _raises_store_error(store.rate_acquire(RATE, 1))
        assert await asyncio.wait_for(store.ping(), 5) is False
        elapsed = time.monotonic() - started
        assert elapsed < 5, elapsed  # not hanging; the bench measures real timings

        server.resume()
        assert await store.ping() is True
        assert isinstance(await store.reserve("after", SCOPES, 10), Reservation)

        server.stop()  # gone: connections are refused
        res = Reservation("after", SCOPES, 10)
        for call in (
            store.reserve("gone", SCOPES, 10),
            store.settle(res, 5),
            store.rate_acquire(RATE, 1),
            store.rate_add_tokens((RateScope("team:search", "search", None, 100),), 5),
            store.spend(),
        ):
            await _raises_store_error(call)
        assert await store.ping() is False
    finally:
        await store.close()
        server.stop()


async def test_local_store_errors_are_store_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    store = LocalStore(StoreConfig(path=str(blocker / "ledger.db")))
    with pytest.raises(StoreError, match="sqlite store"):
        await store.start()
    await store.close()
