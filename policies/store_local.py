"""LocalStore: the budget ledger in an embedded SQLite file, rate windows in-process or in SQLite.

Every SQLite call runs in one dedicated worker thread that owns the connection, never on
the event loop. Each budget operation is one ``BEGIN IMMEDIATE`` transaction: it takes
SQLite's write lock before reading, so check-then-reserve is atomic against every other
connection to the file, in this process or another (``server.workers > 1``). Rate
windows (GCRA, see ``policies.ratelimit``) live in a dict when this is the only process,
and in the same file when several workers must share them.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from policies.config import StoreConfig
from policies.ratelimit import Bucket, RateWindows, empty_at, gcra_add_tokens, gcra_decide
from policies.store import (
    BudgetRejection,
    BudgetScope,
    RateDecision,
    RateScope,
    Reservation,
    SpendRow,
    StoreError,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    scope_id TEXT NOT NULL,
    period_key TEXT NOT NULL,
    spent_nano INTEGER NOT NULL DEFAULT 0,
    reserved_nano INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (scope_id, period_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    request_id TEXT NOT NULL,
    scope_id TEXT NOT NULL,
    period_key TEXT NOT NULL,
    amount_nano INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (request_id, scope_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS reservations_by_scope
    ON reservations (scope_id, period_key, expires_at);
CREATE TABLE IF NOT EXISTS settled (
    request_id TEXT PRIMARY KEY,
    forget_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS settled_by_forget_at ON settled (forget_at);
CREATE TABLE IF NOT EXISTS rate_buckets (
    scope_id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    level_requests REAL NOT NULL,
    level_tokens REAL NOT NULL,
    empty_at REAL NOT NULL
) WITHOUT ROWID;
"""

_ADD_RESERVED = """
INSERT INTO ledger (scope_id, period_key, reserved_nano) VALUES (?, ?, ?)
ON CONFLICT (scope_id, period_key) DO UPDATE SET reserved_nano = reserved_nano + excluded.reserved_nano
"""
_SETTLE_SCOPE = """
INSERT INTO ledger (scope_id, period_key, spent_nano, reserved_nano) VALUES (?1, ?2, ?3, -?4)
ON CONFLICT (scope_id, period_key) DO UPDATE
SET spent_nano = spent_nano + ?3, reserved_nano = reserved_nano - ?4
"""
_SET_BUCKET = "INSERT OR REPLACE INTO rate_buckets VALUES (?, ?, ?, ?, ?)"
_BALANCE = """
SELECT
    COALESCE((SELECT spent_nano FROM ledger WHERE scope_id = ?1 AND period_key = ?2), 0),
    COALESCE((SELECT reserved_nano FROM ledger WHERE scope_id = ?1 AND period_key = ?2), 0),
    (SELECT COALESCE(SUM(amount_nano), 0) FROM reservations
     WHERE scope_id = ?1 AND period_key = ?2 AND expires_at <= ?3)
"""
_PURGE_SETTLED_EVERY = 256  # forget old settle tombstones every this many settles (per process)
_RATE_SWEEP_EVERY = 4096  # forget drained rate buckets every this many acquires (per process)


class LocalStore:
    """The embedded store. ``processes`` is how many worker processes share ``config.path``:
    with 1 the rate windows stay in memory, with more they live in the file."""

    def __init__(
        self,
        config: StoreConfig,
        *,
        processes: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        self._config = config
        self._clock = clock
        self._ttl = config.reservation_ttl_s
        self._windows = RateWindows(clock) if processes == 1 else None
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only in the worker thread
        self._rate_calls = 0  # these two counters are touched only in the worker thread
        self._settles = 0

    # lifecycle

    async def start(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tallygate-sqlite")
        try:
            await self._run(self._open)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_conn)
        finally:
            executor.shutdown(wait=False)  # its only job has finished; the thread exits

    async def ping(self) -> bool:
        try:
            return await self._run(self._ping)
        except StoreError:
            return False

    # budgets

    async def reserve(
        self, request_id: str, scopes: tuple[BudgetScope, ...], amount_nano: int
    ) -> Reservation | BudgetRejection:
        _check_scopes(scopes)
        if amount_nano < 0:
            raise ValueError("amount_nano must be >= 0")
        return await self._run(self._reserve, request_id, scopes, amount_nano, self._clock())

    async def settle(self, reservation: Reservation, actual_nano: int) -> None:
        if actual_nano < 0:
            raise ValueError("actual_nano must be >= 0")
        await self._run(self._settle, reservation, actual_nano, self._clock())

    async def spend(self, scope_ids: tuple[str, ...] | None = None) -> list[SpendRow]:
        return await self._run(self._spend, scope_ids, self._clock())

    async def balances(self, scopes: tuple[BudgetScope, ...]) -> list[SpendRow]:
        if not scopes:
            return []
        return await self._run(self._balances, scopes, self._clock())

    # rate windows

    async def rate_acquire(self, scopes: tuple[RateScope, ...], tokens: int) -> RateDecision:
        if self._windows is not None:
            return self._windows.acquire(scopes, tokens)
        if not scopes:
            return RateDecision(True, 0.0, None, ())
        return await self._run(self._rate_acquire, scopes, tokens, self._clock())

    async def rate_add_tokens(self, scopes: tuple[RateScope, ...], tokens: int) -> None:
        if self._windows is not None:
            self._windows.add_tokens(scopes, tokens)
        elif tokens > 0 and any(s.tpm is not None for s in scopes):
            await self._run(self._rate_add_tokens, scopes, tokens, self._clock())

    # the one place SQLite errors become StoreError

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreError("local store is not started")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite store {self._config.path}: {exc}") from exc

    # below: runs in the worker thread only

    def _open(self) -> None:
        path = self._config.path
        if path != ":memory:" and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        conn = sqlite3.connect(path, timeout=self._config.timeout_s, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._config.timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _ping(self) -> bool:
        return self._db().execute("SELECT 1").fetchone() == (1,)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("local store is closed")
        return self._conn

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run fn inside BEGIN IMMEDIATE ... COMMIT (the write lock is held throughout)."""
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
            return result
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _reserve(
        self, request_id: str, scopes: tuple[BudgetScope, ...], amount: int, now: float
    ) -> Reservation | BudgetRejection:
        def tx(conn: sqlite3.Connection) -> Reservation | BudgetRejection:
            if conn.execute(
                "SELECT 1 FROM reservations WHERE request_id = ? "
                "UNION ALL SELECT 1 FROM settled WHERE request_id = ? LIMIT 1",
                (request_id, request_id),
            ).fetchone():
                raise ValueError(f"request id {request_id!r} was already reserved")
            for scope in scopes:
                _release_expired(conn, scope.scope_id, scope.period_key, now)
            for scope in scopes:
                if scope.limit_nano is None:
                    continue
                spent, reserved = conn.execute(
                    "SELECT spent_nano, reserved_nano FROM ledger WHERE scope_id = ? AND period_key = ?",
                    (scope.scope_id, scope.period_key),
                ).fetchone() or (0, 0)
                if spent + reserved + amount > scope.limit_nano:
                    return BudgetRejection(scope, spent, reserved, amount)  # commits the sweep only
            conn.executemany(_ADD_RESERVED, [(s.scope_id, s.period_key, amount) for s in scopes])
            conn.executemany(
                "INSERT INTO reservations VALUES (?, ?, ?, ?, ?)",
                [(request_id, s.scope_id, s.period_key, amount, now + self._ttl) for s in scopes],
            )
            return Reservation(request_id, scopes, amount)

        return self._transaction(tx)

    def _settle(self, reservation: Reservation, actual: int, now: float) -> None:
        request_id = reservation.request_id

        def tx(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM settled WHERE request_id = ?", (request_id,)).fetchone():
                return  # settled before: nothing to do
            # Rows already released as expired are gone: for them only the spend is added.
            held = {
                (scope_id, period_key): amount
                for scope_id, period_key, amount in conn.execute(
                    "DELETE FROM reservations WHERE request_id = ? "
                    "RETURNING scope_id, period_key, amount_nano",
                    (request_id,),
                )
            }
            conn.executemany(
                _SETTLE_SCOPE,
                [
                    (s.scope_id, s.period_key, actual, held.get((s.scope_id, s.period_key), 0))
                    for s in reservation.scopes
                ],
            )
            self._settles += 1
            if self._settles % _PURGE_SETTLED_EVERY == 0:
                conn.execute("DELETE FROM settled WHERE forget_at < ?", (now,))
            conn.execute("INSERT INTO settled VALUES (?, ?)", (request_id, now + self._ttl))

        self._transaction(tx)

    def _spend(self, scope_ids: tuple[str, ...] | None, now: float) -> list[SpendRow]:
        def tx(conn: sqlite3.Connection) -> list[SpendRow]:
            expired = conn.execute(
                "SELECT scope_id, period_key FROM reservations WHERE expires_at <= ? GROUP BY 1, 2",
                (now,),
            ).fetchall()
            for scope_id, period_key in expired:
                _release_expired(conn, scope_id, period_key, now)
            sql = "SELECT scope_id, period_key, spent_nano, reserved_nano FROM ledger"
            params: tuple[str, ...] = ()
            if scope_ids is not None:
                if not scope_ids:
                    return []
                sql += f" WHERE scope_id IN ({','.join('?' * len(scope_ids))})"
                params = scope_ids
            rows = conn.execute(sql + " ORDER BY scope_id, period_key", params).fetchall()
            return [SpendRow(*row) for row in rows]

        return self._transaction(tx)

    def _balances(self, scopes: tuple[BudgetScope, ...], now: float) -> list[SpendRow]:
        # A read (no write lock): expired reservations are left for the next reserve to
        # release, and subtracted here.
        conn = self._db()
        rows = []
        for s in scopes:
            spent, reserved, expired = conn.execute(
                _BALANCE, (s.scope_id, s.period_key, now)
            ).fetchone()
            rows.append(SpendRow(s.scope_id, s.period_key, spent, reserved - expired))
        return rows

    def _read_buckets(
        self, conn: sqlite3.Connection, scopes: tuple[RateScope, ...]
    ) -> dict[str, Bucket]:
        ids = [s.scope_id for s in scopes]
        rows = conn.execute(
            "SELECT scope_id, at, level_requests, level_tokens FROM rate_buckets "
            f"WHERE scope_id IN ({','.join('?' * len(ids))})",
            ids,
        ).fetchall()
        return {scope_id: (at, level_r, level_t) for scope_id, at, level_r, level_t in rows}

    def _write_buckets(
        self, conn: sqlite3.Connection, scopes: tuple[RateScope, ...], new: dict[str, Bucket]
    ) -> None:
        conn.executemany(
            _SET_BUCKET,
            [
                (s.scope_id, *new[s.scope_id], empty_at(s, new[s.scope_id]))
                for s in scopes
                if s.scope_id in new
            ],
        )

    def _rate_acquire(self, scopes: tuple[RateScope, ...], tokens: int, now: float) -> RateDecision:
        def tx(conn: sqlite3.Connection) -> RateDecision:
            decision, new = gcra_decide(scopes, self._read_buckets(conn, scopes), tokens, now)
            if new is not None:
                self._write_buckets(conn, scopes, new)
            self._rate_calls += 1
            if self._rate_calls % _RATE_SWEEP_EVERY == 0:
                conn.execute("DELETE FROM rate_buckets WHERE empty_at <= ?", (now,))
            return decision

        return self._transaction(tx)

    def _rate_add_tokens(self, scopes: tuple[RateScope, ...], tokens: int, now: float) -> None:
        def tx(conn: sqlite3.Connection) -> None:
            new = gcra_add_tokens(scopes, self._read_buckets(conn, scopes), tokens, now)
            self._write_buckets(conn, scopes, new)

        self._transaction(tx)


def _release_expired(conn: sqlite3.Connection, scope_id: str, period_key: str, now: float) -> None:
    """Crash recovery: give back what expired reservations of one scope+period still hold."""
    where = "scope_id = ? AND period_key = ? AND expires_at <= ?"
    count, total = conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM(amount_nano), 0) FROM reservations WHERE {where}",
        (scope_id, period_key, now),
    ).fetchone()
    if count:
        conn.execute(
            "UPDATE ledger SET reserved_nano = reserved_nano - ? WHERE scope_id = ? AND period_key = ?",
            (total, scope_id, period_key),
        )
        conn.execute(f"DELETE FROM reservations WHERE {where}", (scope_id, period_key, now))


def _check_scopes(scopes: tuple[BudgetScope, ...]) -> None:
    if len({s.scope_id for s in scopes}) != len(scopes):
        raise ValueError("a request's scopes must have distinct scope ids")
