"""LocalStore for one process (processes=1): the ledger in memory, spend written back by a flusher."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from policies.config import StoreConfig
from policies.stores.base import BudgetRejection, BudgetScope, Reservation, SpendRow, StoreError
from policies.stores.ledger_memory import MemoryLedger
from policies.stores.local import FLUSH_INTERVAL_S, LocalStore

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp()
END = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
AMOUNT = 1_000
LIMIT = 30 * AMOUNT + AMOUNT // 2
SCOPES = (
    BudgetScope("team:search", "search", "2026-11", END, LIMIT),
    BudgetScope("key:search/prod", "search", "2026-11", END, None),
)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def file_ledger(path: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """The ledger as the file has it, read by a connection of its own."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT scope_id, period_key, spent_nano, reserved_nano FROM ledger")
        return {(s, p): (spent, reserved) for s, p, spent, reserved in rows}
    finally:
        conn.close()


def file_reservations(path: Path) -> list[tuple[str, str, int]]:
    conn = sqlite3.connect(path)
    try:
        sql = "SELECT request_id, scope_id, amount_nano FROM reservations ORDER BY 1, 2"
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def wait_for_file(
    path: Path, key: tuple[str, str], spent: int, within_s: float = 2.0
) -> float:
    """Seconds until the file shows ``spent`` for ``key`` (fails after ``within_s``)."""
    started = time.monotonic()
    while file_ledger(path).get(key, (None, None))[0] != spent:
        assert time.monotonic() - started < within_s, file_ledger(path)
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def opened(
    path: Path, processes: int = 1, clock: Clock | None = None, ttl: float = 900
) -> LocalStore:
    config = StoreConfig(path=str(path), reservation_ttl_s=ttl)
    store = LocalStore(config, processes=processes, clock=clock or Clock())
    await store.start()
    return store


async def reserve_settle(
    store: LocalStore, request_id: str, amount: int, actual: int
) -> Reservation:
    res = await store.reserve(request_id, SCOPES, amount)
    assert isinstance(res, Reservation), res
    await store.settle(res, actual)
    return res


async def test_spend_reaches_the_file_shortly_and_on_close(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = await opened(path)
    try:
        await reserve_settle(store, "r1", 400, 300)
        assert file_ledger(path).get(("team:search", "2026-11")) is None  # not on the hot path
        await wait_for_file(path, ("team:search", "2026-11"), 300)
        await wait_for_file(path, ("key:search/prod", "2026-11"), 300)
        await reserve_settle(store, "r2", 400, 50)
    finally:
        await store.close()
    # close() wrote the rest before returning
    assert file_ledger(path)[("team:search", "2026-11")] == (350, 0)
    reopened = await opened(path)
    try:
        assert await reopened.spend() == [
            SpendRow("key:search/prod", "2026-11", 350, 0),
            SpendRow("team:search", "2026-11", 350, 0),
        ]
        assert (await reopened.balances(SCOPES[:1]))[0].spent_nano == 350
    finally:
        await reopened.close()


async def test_nothing_written_when_nothing_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.db"
    store = await opened(path)
    writes: list[int] = []
    original = store._write_back

    def counting(*args: object) -> None:
        writes.append(1)
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_write_back", counting)
    try:
        await asyncio.sleep(FLUSH_INTERVAL_S * 5)
        assert writes == []  # idle: no transaction
        for i in range(50):  # many settles within one interval: one transaction or two
            await reserve_settle(store, f"r{i}", 10, 10)
        await wait_for_file(path, ("team:search", "2026-11"), 500)
        assert 1 <= len(writes) <= 2
        await asyncio.sleep(FLUSH_INTERVAL_S * 5)
        assert len(writes) <= 2  # nothing new: nothing written
    finally:
        await store.close()


async def test_reservations_stay_in_memory_until_a_graceful_close(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    clock = Clock()
    store = await opened(path, clock=clock)
    try:
        held = await store.reserve("in-flight", SCOPES, 700)
        assert isinstance(held, Reservation)
        await reserve_settle(store, "done", 100, 100)
        await wait_for_file(path, ("team:search", "2026-11"), 100)
        assert file_reservations(path) == []  # a crash here loses the reservation
        assert file_ledger(path)[("team:search", "2026-11")] == (100, 0)
    finally:
        await store.close()
    # a graceful close hands it to the file, where it expires as usual
    assert file_reservations(path) == [
        ("in-flight", "key:search/prod", 700),
        ("in-flight", "team:search", 700),
    ]
    assert file_ledger(path)[("team:search", "2026-11")] == (100, 700)
    reopened = await opened(path, clock=clock)
    try:
        assert await reopened.balances(SCOPES) == [
            SpendRow("team:search", "2026-11", 100, 700),
            SpendRow("key:search/prod", "2026-11", 100, 700),
        ]
        await reopened.settle(held, 650)  # the adopted reservation is settled in memory ...
        assert (await reopened.balances(SCOPES))[0] == SpendRow("team:search", "2026-11", 750, 0)
        with pytest.raises(ValueError, match="already reserved"):
            await reopened.reserve("in-flight", SCOPES, 1)
    finally:
        await reopened.close()
    assert file_reservations(path) == []  # ... and released in the file
    assert file_ledger(path)[("team:search", "2026-11")] == (750, 0)


async def test_adopted_reservations_expire(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    clock = Clock()
    shared = await opened(path, processes=2, clock=clock, ttl=60)
    try:
        assert isinstance(await shared.reserve("crashed", SCOPES, LIMIT), Reservation)
    finally:
        await shared.close()
    store = await opened(path, clock=clock, ttl=60)
    try:
        assert isinstance(await store.reserve("refused", SCOPES, 1), BudgetRejection)
        clock.now += 61
        assert isinstance(await store.reserve("admitted", SCOPES, 1), Reservation)
    finally:
        await store.close()
    assert [r[0] for r in file_reservations(path)] == ["admitted", "admitted"]
    assert file_ledger(path)[("team:search", "2026-11")] == (0, 1)


async def test_200_concurrent_requests_keep_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    store = await opened(path)

    def actual(i: int) -> int:
        return (i * 137) % (AMOUNT + 1)

    async def one(i: int) -> int | None:
        res = await store.reserve(f"t-{i}", SCOPES, AMOUNT)
        if isinstance(res, BudgetRejection):
            return None
        await asyncio.sleep(0.001 * (i % 3))  # the upstream call: let others interleave
        await store.settle(res, actual(i))
        return actual(i)

    try:
        costs = [c for c in await asyncio.gather(*(one(i) for i in range(200))) if c is not None]
        assert len(costs) >= LIMIT // AMOUNT
        assert sum(costs) <= LIMIT
        assert await store.spend(("team:search",)) == [
            SpendRow("team:search", "2026-11", sum(costs), 0)
        ]
    finally:
        await store.close()
    assert file_ledger(path)[("team:search", "2026-11")] == (sum(costs), 0)
    assert file_ledger(path)[("key:search/prod", "2026-11")] == (sum(costs), 0)


async def test_a_failing_flusher_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ledger.db"
    store = await opened(path)
    original = store._write_back
    failures = [3]
    failed_once = threading.Event()

    def flaky(*args: object) -> None:  # runs in the store's worker thread
        if failures[0]:
            failures[0] -= 1
            failed_once.set()
            raise sqlite3.OperationalError("disk I/O error")
        original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_write_back", flaky)
    try:
        with caplog.at_level(logging.WARNING, logger="tallygate.store"):
            await reserve_settle(store, "a", 100, 100)
            assert await asyncio.to_thread(failed_once.wait, 2)  # the first write fails ...
            await reserve_settle(store, "b", 100, 20)  # ... the hot path does not notice
            assert (await store.balances(SCOPES[:1]))[0].spent_nano == 120
            await wait_for_file(path, ("team:search", "2026-11"), 120)
            await reserve_settle(store, "c", 100, 3)
            await wait_for_file(path, ("team:search", "2026-11"), 123)
        assert failures == [0]
        assert any("could not write spend" in r.message for r in caplog.records)
        assert any("work again after 3 failures" in r.message for r in caplog.records)
    finally:
        await store.close()
    assert file_ledger(path)[("team:search", "2026-11")] == (123, 0)
    assert file_ledger(path)[("key:search/prod", "2026-11")] == (123, 0)


async def test_close_retries_the_last_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.db"
    store = await opened(path)
    original = store._write_back
    failures = [1]

    def flaky(*args: object) -> None:
        if failures[0]:
            failures[0] -= 1
            raise sqlite3.OperationalError("database is locked")
        original(*args)  # type: ignore[arg-type]

    await reserve_settle(store, "a", 100, 77)
    monkeypatch.setattr(store, "_write_back", flaky)
    await store.close()  # the flusher may or may not have tried first: nothing is lost
    assert file_ledger(path)[("team:search", "2026-11")] == (77, 0)


async def test_one_process_then_two_agree_on_spend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    clock = Clock()
    alone = await opened(path, clock=clock)
    try:
        for i in range(10):
            await reserve_settle(alone, f"one-{i}", AMOUNT, 100 + i)
        pending = await alone.reserve("pending", SCOPES, AMOUNT)
        assert isinstance(pending, Reservation)
        one_process = await alone.spend()
    finally:
        await alone.close()
    assert one_process == [
        SpendRow("key:search/prod", "2026-11", 1045, AMOUNT),
        SpendRow("team:search", "2026-11", 1045, AMOUNT),
    ]
    workers = [await opened(path, processes=2, clock=clock) for _ in range(2)]
    try:
        assert await workers[0].spend() == one_process
        await workers[1].settle(pending, 5)  # the handed-over reservation settles there
        await reserve_settle(workers[0], "two-0", AMOUNT, 50)
        assert await workers[1].spend() == [
            SpendRow("key:search/prod", "2026-11", 1100, 0),
            SpendRow("team:search", "2026-11", 1100, 0),
        ]
    finally:
        for store in workers:
            await store.close()
    again = await opened(path, clock=clock)
    try:
        assert await again.spend(("team:search",)) == [SpendRow("team:search", "2026-11", 1100, 0)]
        refused = await again.reserve("big", SCOPES, LIMIT - 1100 + 1)
        assert isinstance(refused, BudgetRejection) and refused.spent_nano == 1100
    finally:
        await again.close()


async def test_periods_not_loaded_at_start_come_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    old_end = datetime(2020, 2, 1, tzinfo=UTC).timestamp()
    old = (BudgetScope("team:search", "search", "2020-01", old_end, 1000),)
    shared = await opened(path, processes=2)
    try:
        res = await shared.reserve("old", old, 900)
        assert isinstance(res, Reservation)
        await shared.settle(res, 900)
    finally:
        await shared.close()
    store = await opened(path)  # loads 2026-11's periods, not 2020-01
    try:
        refused = await store.reserve("late", old, 101)
        assert isinstance(refused, BudgetRejection) and refused.spent_nano == 900
        await reserve_settle(store, "now", 10, 10)
        assert await store.spend(("team:search",)) == [
            SpendRow("team:search", "2020-01", 900, 0),
            SpendRow("team:search", "2026-11", 10, 0),
        ]
        never = (BudgetScope("team:nobody", "nobody", "2019-05", old_end, 5),)
        assert await store.balances(never) == [SpendRow("team:nobody", "2019-05", 0, 0)]
        assert await store.spend(("team:nobody",)) == []  # a read creates no row
    finally:
        await store.close()


async def test_calls_after_close_raise_store_error(tmp_path: Path) -> None:
    store = await opened(tmp_path / "ledger.db")
    res = await store.reserve("r1", SCOPES, 10)
    assert isinstance(res, Reservation)
    await store.close()
    for call in (store.reserve("r2", SCOPES, 10), store.settle(res, 5), store.balances(SCOPES)):
        with pytest.raises(StoreError):
            await call
    with pytest.raises(StoreError):
        await store.spend()


def test_settled_ids_are_remembered_for_a_bounded_number_of_settles() -> None:
    ledger = MemoryLedger(ttl_s=900, settled_memory=2)
    keys = (("team:search", "2026-11"),)
    ledger.add_rows(keys, {})
    for rid in ("a", "b", "c"):
        assert isinstance(ledger.reserve(rid, SCOPES[:1], keys, 10, NOW), Reservation)
        ledger.settle(rid, keys, 10)
    ledger.settle("c", keys, 10)  # remembered: a no-op
    assert ledger.rows[keys[0]] == [30, 0, 1]
    with pytest.raises(ValueError, match="already reserved"):
        ledger.reserve("b", SCOPES[:1], keys, 10, NOW)
    # "a" was forgotten after two later settles: reserving it again is allowed
    assert isinstance(ledger.reserve("a", SCOPES[:1], keys, 10, NOW), Reservation)
