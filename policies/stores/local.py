"""LocalStore: the budget ledger in an embedded SQLite file, rate windows in-process or in SQLite.

Every SQLite call runs in one dedicated worker thread that owns the connection, never on
the event loop. Two modes, chosen by ``processes``:

- One process owns the file (``processes == 1``): the ledger is served from memory
  (``policies.stores.ledger_memory``). start() loads the current periods' spend and the file's
  reservations; reserve, settle and balances then check and change memory only, atomic on
  the event loop (no await between check and change); a flusher task writes the queued
  spend deltas to the file in one transaction every ~20 ms, and close() writes the rest.
  Rate windows live in a dict.
- Several processes share the file (``server.workers > 1``): each budget operation is one
  ``BEGIN IMMEDIATE`` transaction, which takes SQLite's write lock before reading, so
  check-then-reserve is atomic against every other connection to the file. Rate windows
  (GCRA, see ``policies.ratelimit``) live in the same file.

``claim_once`` (who sends a budget alert) is a row in the file in both modes.

Both modes keep one schema, so either can open a file the other wrote. Amounts are
bounded (``policies.stores.base``): spent and reserved saturate within [0, MAX_LEDGER_NANO] in
SQL too, so no write can overflow SQLite's int64.

Over 600 lines on purpose: both modes (memory-owned, shared file) share the schema, the
worker thread and the transactions.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from policies.budget import current_period
from policies.config import StoreConfig
from policies.ratelimit import (
    Bucket,
    RateWindows,
    empty_at,
    gcra_add_tokens,
    gcra_adjust,
    gcra_decide,
    states_of,
)
from policies.stores.base import (
    MAX_LEDGER_NANO,
    Admitted,
    BudgetRejection,
    BudgetScope,
    RateDecision,
    RateScope,
    RateState,
    Reservation,
    SpendRow,
    StoreError,
    check_reserve_amount,
    clamp_actual,
)
from policies.stores.ledger_memory import (
    SETTLED_MEMORY,
    FileReservation,
    Key,
    MemoryLedger,
    RejectedWrite,
    Writer,
)

T = TypeVar("T")

FLUSH_INTERVAL_S = 0.02  # one process: queued spend is written to the file this often
_CLOSE_ATTEMPTS = 3

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
CREATE TABLE IF NOT EXISTS claims (
    claim_key TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS claims_by_expiry ON claims (expires_at);
CREATE TABLE IF NOT EXISTS rate_buckets (
    scope_id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    level_requests REAL NOT NULL,
    level_tokens REAL NOT NULL,
    empty_at REAL NOT NULL
) WITHOUT ROWID;
"""


def _plus(column: str, param: str) -> str:
    """``column + param`` saturating at MAX_LEDGER_NANO, for 0 <= param <= MAX_LEDGER_NANO:
    compared against MAX - param first, so the sum is never computed where it could overflow
    (SQLite would turn it into a REAL)."""
    return (
        f"CASE WHEN {column} >= {MAX_LEDGER_NANO} - {param} THEN {MAX_LEDGER_NANO} "
        f"ELSE {column} + {param} END"
    )


def _minus(column: str, param: str) -> str:
    """``column - param`` floored at 0 (reserved saturates at the top, so never below 0)."""
    return f"MAX({column} - {param}, 0)"


_ADD_RESERVED = f"""
INSERT INTO ledger (scope_id, period_key, reserved_nano) VALUES (?1, ?2, ?3)
ON CONFLICT (scope_id, period_key) DO UPDATE SET reserved_nano = {_plus("reserved_nano", "?3")}
"""
_SETTLE_SCOPE = f"""
INSERT INTO ledger (scope_id, period_key, spent_nano, reserved_nano) VALUES (?1, ?2, ?3, 0)
ON CONFLICT (scope_id, period_key) DO UPDATE
SET spent_nano = {_plus("spent_nano", "?3")}, reserved_nano = {_minus("reserved_nano", "?4")}
"""
_ADD_SPENT = f"""
INSERT INTO ledger (scope_id, period_key, spent_nano) VALUES (?1, ?2, ?3)
ON CONFLICT (scope_id, period_key) DO UPDATE SET spent_nano = {_plus("spent_nano", "?3")}
"""
_RELEASE = f"""
UPDATE ledger SET reserved_nano = {_minus("reserved_nano", "?1")} WHERE scope_id = ?2 AND period_key = ?3
"""
# What the store cannot hold (a Python int beyond int64, an unsupported type, a NULL from a
# NaN): a rejection of the data, not of the file; see RejectedWrite.
_REJECTED = (
    OverflowError,
    TypeError,
    ValueError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
)
_SET_BUCKET = "INSERT OR REPLACE INTO rate_buckets VALUES (?, ?, ?, ?, ?)"
_BALANCE = """
SELECT
    COALESCE((SELECT spent_nano FROM ledger WHERE scope_id = ?1 AND period_key = ?2), 0),
    COALESCE((SELECT reserved_nano FROM ledger WHERE scope_id = ?1 AND period_key = ?2), 0),
    (SELECT TOTAL(amount_nano) FROM reservations
     WHERE scope_id = ?1 AND period_key = ?2 AND expires_at <= ?3)
"""
_ADMITTED = RateDecision(True, 0.0, None, ())  # no rate scopes: nothing to check
_NEVER = 1e300  # expires_at of a claim without a ttl: beyond any clock
_PURGE_SETTLED_EVERY = 256  # forget old settle tombstones every this many settles (per process)
_RATE_SWEEP_EVERY = 4096  # forget drained rate buckets every this many acquires (per process)


class LocalStore:
    """The embedded store. ``processes`` is how many worker processes share ``config.path``:
    with 1 the ledger and the rate windows are served from memory, with more every
    operation is a transaction on the file."""

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
        self._owner = processes == 1  # the ledger in memory, written back by a flusher
        self._windows = RateWindows(clock) if processes == 1 else None
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # touched only in the worker thread
        self._rate_calls = 0  # these two counters are touched only in the worker thread
        self._settles = 0
        self._mem: MemoryLedger | None = None  # set while started, when self._owner
        self._flusher: asyncio.Task[None] | None = None

    # lifecycle

    async def start(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tallygate-sqlite")
        try:
            await self._run(self._open)
            if self._owner:
                now = self._clock()
                mem = MemoryLedger(self._ttl)
                mem.load(*await self._run(self._load, _warm_periods(now), now, SETTLED_MEMORY))
                self._mem = mem
                self._flusher = asyncio.create_task(
                    mem.flush_every(FLUSH_INTERVAL_S, self._writer(self._executor)),
                    name="tallygate-store-flush",
                )
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        executor, self._executor = self._executor, None  # from here on, calls raise StoreError
        if executor is None:
            return
        try:
            flusher, self._flusher = self._flusher, None
            mem = self._mem
            if mem is not None and flusher is not None:
                mem.stop_flushing()
                await asyncio.wait([flusher])  # it finishes the write it is doing, if any
            if mem is not None:
                write = self._writer(executor)
                outstanding = mem.outstanding(self._clock())  # handed to the file, to expire there
                for attempt in range(1, _CLOSE_ATTEMPTS + 1):
                    if await mem.flush(write, outstanding, final=attempt == _CLOSE_ATTEMPTS):
                        break
                    await asyncio.sleep(FLUSH_INTERVAL_S)
            await asyncio.get_running_loop().run_in_executor(executor, self._close_conn)
        finally:
            self._mem = None
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
        check_reserve_amount(amount_nano)
        if not self._owner:
            return await self._run(self._reserve, request_id, scopes, amount_nano, self._clock())
        keys = _keys(scopes)
        mem = await self._ensure(keys)
        # no await from here on: the check and the change are one step of the event loop
        return mem.reserve(request_id, scopes, keys, amount_nano, self._clock())

    async def settle(self, reservation: Reservation, actual_nano: int) -> list[SpendRow]:
        actual_nano = clamp_actual(reservation.request_id, actual_nano)
        if not self._owner:
            return await self._run(self._settle, reservation, actual_nano, self._clock())
        keys = _keys(reservation.scopes)
        mem = await self._ensure(keys)
        mem.settle(reservation.request_id, keys, actual_nano)  # the flusher writes the spend
        return mem.balances(reservation.scopes, keys, self._clock())

    async def admit(
        self,
        request_id: str,
        scopes: tuple[BudgetScope, ...],
        amount_nano: int,
        rate_scopes: tuple[RateScope, ...] = (),
        tokens: int = 0,
        requests: int = 1,
    ) -> Admitted:
        _check_scopes(scopes)
        check_reserve_amount(amount_nano)
        if not self._owner:
            return await self._run(
                self._admit, request_id, scopes, amount_nano, rate_scopes, tokens, requests,
                self._clock(),
            )  # fmt: skip
        keys = _keys(scopes)
        mem = await self._ensure(keys)
        windows = self._windows
        assert windows is not None  # one process: the windows are in memory
        # no await from here on: rate check, budget check and both changes are one step
        decision, new = _ADMITTED, None
        if rate_scopes:
            decision, new = windows.decide(rate_scopes, tokens, requests)
            if new is None:
                return Admitted(decision, None)
        now = self._clock()
        result = mem.reserve(request_id, scopes, keys, amount_nano, now)
        if new is not None and isinstance(result, Reservation):
            windows.commit(rate_scopes, new)
        return Admitted(decision, result, tuple(mem.balances(scopes, keys, now)))

    async def spend(self, scope_ids: tuple[str, ...] | None = None) -> list[SpendRow]:
        if not self._owner:
            return await self._run(self._spend, scope_ids, self._clock())
        mem = await self._ensure(())
        if scope_ids is not None and not scope_ids:
            return []
        # periods not in memory come from the file; rows in memory are newer than the file's
        file_rows = await self._run(self._read_ledger, scope_ids)
        mem = await self._ensure(())  # still started
        return mem.spend(file_rows, scope_ids, self._clock())

    async def balances(
        self, scopes: tuple[BudgetScope, ...], *, fresh: bool = False
    ) -> list[SpendRow]:
        if not scopes:
            return []
        if not self._owner:
            return await self._run(self._balances, scopes, self._clock())
        keys = _keys(scopes)
        mem = await self._ensure(keys)
        return mem.balances(scopes, keys, self._clock())

    async def claim_once(self, key: str, group: str, ttl_s: float | None) -> bool:
        # Always in the file, in both modes: every process sharing it sees one winner, and
        # a restart does not forget what was claimed. Claims are rare (alerts), so the
        # thread hop costs nothing that matters.
        now = self._clock()
        expires_at = _NEVER if ttl_s is None else now + ttl_s
        return await self._run(self._claim, f"{len(group)}:{group}:{key}", now, expires_at)

    # rate windows

    async def rate_acquire(
        self, scopes: tuple[RateScope, ...], tokens: int, requests: int = 1
    ) -> RateDecision:
        if self._windows is not None:
            return self._windows.acquire(scopes, tokens, requests)
        if not scopes:
            return _ADMITTED
        return await self._run(self._rate_acquire, scopes, tokens, requests, self._clock())

    async def rate_adjust(
        self, scopes: tuple[RateScope, ...], requests: int, tokens: int
    ) -> tuple[RateState, ...]:
        if self._windows is not None:
            return self._windows.adjust(scopes, requests, tokens)
        if not scopes:
            return ()
        return await self._run(self._rate_adjust, scopes, requests, tokens, self._clock())

    async def rate_add_tokens(self, scopes: tuple[RateScope, ...], tokens: int) -> None:
        if self._windows is not None:
            self._windows.add_tokens(scopes, tokens)
        elif tokens > 0 and any(s.tpm is not None for s in scopes):
            await self._run(self._rate_add_tokens, scopes, tokens, self._clock())

    # the one place SQLite errors become StoreError

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise StoreError("local store is not started")
        return await self._run_on(self._executor, fn, *args)

    async def _run_on(self, executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite store {self._config.path}: {exc}") from exc

    # one process: the ledger in memory

    async def _ensure(self, keys: tuple[Key, ...]) -> MemoryLedger:
        """The ledger (StoreError unless started), with the rows of ``keys`` read from the
        file if not in memory yet: a period start() did not load costs one thread hop."""
        mem = self._mem
        if mem is None or self._executor is None:  # close() clears the executor first
            raise StoreError("local store is not started")
        missing = mem.missing(keys)
        if missing:
            found = await self._run(self._read_spent, missing)
            if self._mem is not mem or self._executor is None:
                raise StoreError("local store is closed")
            mem.add_rows(missing, found)
        return mem

    def _writer(self, executor: ThreadPoolExecutor) -> Writer:
        async def write(
            deltas: dict[Key, int], releases: set[str], outstanding: Sequence[FileReservation]
        ) -> None:
            await self._run_on(executor, self._write_back, deltas, releases, outstanding)

        return write

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
        return bool(self._db().execute("SELECT 1").fetchone() == (1,))

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
        return self._transaction(
            lambda conn: self._reserve_in(conn, request_id, scopes, amount, now)
        )

    def _reserve_in(
        self,
        conn: sqlite3.Connection,
        request_id: str,
        scopes: tuple[BudgetScope, ...],
        amount: int,
        now: float,
    ) -> Reservation | BudgetRejection:
        """The body of a reservation, inside the caller's transaction."""
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

    def _admit(
        self,
        request_id: str,
        scopes: tuple[BudgetScope, ...],
        amount: int,
        rate_scopes: tuple[RateScope, ...],
        tokens: int,
        requests: int,
        now: float,
    ) -> Admitted:
        def tx(conn: sqlite3.Connection) -> Admitted:
            decision, new = _ADMITTED, None
            if rate_scopes:
                buckets = self._read_buckets(conn, rate_scopes)
                decision, new = gcra_decide(rate_scopes, buckets, tokens, now, requests)
                if new is None:
                    return Admitted(decision, None)
            result = self._reserve_in(conn, request_id, scopes, amount, now)
            if new is not None and isinstance(result, Reservation):
                self._write_buckets(conn, rate_scopes, new)
            return Admitted(decision, result, tuple(self._read_balances(conn, scopes, now)))

        return self._transaction(tx)

    def _settle(self, reservation: Reservation, actual: int, now: float) -> list[SpendRow]:
        request_id = reservation.request_id

        def tx(conn: sqlite3.Connection) -> list[SpendRow]:
            if conn.execute("SELECT 1 FROM settled WHERE request_id = ?", (request_id,)).fetchone():
                return self._read_balances(conn, reservation.scopes, now)  # settled before
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
            return self._read_balances(conn, reservation.scopes, now)

        return self._transaction(tx)

    def _spend(self, scope_ids: tuple[str, ...] | None, now: float) -> list[SpendRow]:
        def tx(conn: sqlite3.Connection) -> list[SpendRow]:
            expired = conn.execute(
                "SELECT scope_id, period_key FROM reservations WHERE expires_at <= ? GROUP BY 1, 2",
                (now,),
            ).fetchall()
            for scope_id, period_key in expired:
                _release_expired(conn, scope_id, period_key, now)
            if scope_ids is not None and not scope_ids:
                return []
            return [SpendRow(*row) for row in self._read_ledger(scope_ids)]

        return self._transaction(tx)

    def _read_ledger(self, scope_ids: tuple[str, ...] | None) -> list[tuple[str, str, int, int]]:
        sql = "SELECT scope_id, period_key, spent_nano, reserved_nano FROM ledger"
        params: tuple[str, ...] = ()
        if scope_ids is not None:
            sql += f" WHERE scope_id IN ({','.join('?' * len(scope_ids))})"
            params = scope_ids
        return self._db().execute(sql + " ORDER BY scope_id, period_key", params).fetchall()

    def _balances(self, scopes: tuple[BudgetScope, ...], now: float) -> list[SpendRow]:
        # A read (no write lock): expired reservations are left for the next reserve to
        # release, and subtracted here.
        return self._read_balances(self._db(), scopes, now)

    def _read_balances(
        self, conn: sqlite3.Connection, scopes: tuple[BudgetScope, ...], now: float
    ) -> list[SpendRow]:
        rows = []
        for s in scopes:
            spent, reserved, expired = conn.execute(
                _BALANCE, (s.scope_id, s.period_key, now)
            ).fetchone()
            rows.append(SpendRow(s.scope_id, s.period_key, spent, max(reserved - int(expired), 0)))
        return rows

    # one process (worker thread side): load, read missing rows, write back

    def _load(
        self, periods: list[str], now: float, settled_limit: int
    ) -> tuple[list[tuple[str, str, int]], list[FileReservation], list[str]]:
        def tx(
            conn: sqlite3.Connection,
        ) -> tuple[list[tuple[str, str, int]], list[FileReservation], list[str]]:
            reservations = conn.execute(
                "SELECT request_id, scope_id, period_key, amount_nano, expires_at FROM reservations"
            ).fetchall()
            keys = sorted(set(periods) | {r[2] for r in reservations})
            spent = conn.execute(
                "SELECT scope_id, period_key, spent_nano FROM ledger "
                f"WHERE period_key IN ({','.join('?' * len(keys))})",
                keys,
            ).fetchall()
            settled = conn.execute(
                "SELECT request_id FROM settled WHERE forget_at > ? ORDER BY forget_at DESC LIMIT ?",
                (now, settled_limit),
            ).fetchall()
            return spent, reservations, [request_id for (request_id,) in reversed(settled)]

        return self._transaction(tx)

    def _read_spent(self, keys: list[Key]) -> dict[Key, int]:
        conn, found = self._db(), {}
        for key in keys:
            row = conn.execute(
                "SELECT spent_nano FROM ledger WHERE scope_id = ? AND period_key = ?", key
            ).fetchone()
            if row is not None:
                found[key] = row[0]
        return found

    def _write_back(
        self, deltas: dict[Key, int], releases: set[str], outstanding: Sequence[FileReservation]
    ) -> None:
        """One transaction: release ended reservations adopted from the file, add spend,
        and (on close) hand over the reservations still running."""

        def tx(conn: sqlite3.Connection) -> None:
            for request_id in releases:  # what is still in the file; none if another took it
                held = conn.execute(
                    "DELETE FROM reservations WHERE request_id = ? "
                    "RETURNING amount_nano, scope_id, period_key",
                    (request_id,),
                ).fetchall()
                conn.executemany(_RELEASE, held)
            conn.executemany(_ADD_SPENT, [(*key, amount) for key, amount in deltas.items()])
            for row in outstanding:
                if conn.execute(
                    "INSERT INTO reservations VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", row
                ).rowcount:
                    conn.execute(_ADD_RESERVED, row[1:4])

        try:
            self._transaction(tx)
        except _REJECTED as exc:  # rolled back; the ledger retries row by row
            raise RejectedWrite(f"{type(exc).__name__}: {exc}") from exc

    def _claim(self, key: str, now: float, expires_at: float) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM claims WHERE expires_at <= ?", (now,))
            return (
                conn.execute(
                    "INSERT INTO claims VALUES (?, ?) ON CONFLICT DO NOTHING", (key, expires_at)
                ).rowcount
                == 1
            )

        return self._transaction(tx)

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

    def _rate_acquire(
        self, scopes: tuple[RateScope, ...], tokens: int, requests: int, now: float
    ) -> RateDecision:
        def tx(conn: sqlite3.Connection) -> RateDecision:
            buckets = self._read_buckets(conn, scopes)
            decision, new = gcra_decide(scopes, buckets, tokens, now, requests)
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

    def _rate_adjust(
        self, scopes: tuple[RateScope, ...], requests: int, tokens: int, now: float
    ) -> tuple[RateState, ...]:
        def tx(conn: sqlite3.Connection) -> tuple[RateState, ...]:
            new = gcra_adjust(scopes, self._read_buckets(conn, scopes), requests, tokens, now)
            self._write_buckets(conn, scopes, new)
            return states_of(scopes, new)

        return self._transaction(tx)


def _release_expired(conn: sqlite3.Connection, scope_id: str, period_key: str, now: float) -> None:
    """Crash recovery: give back what expired reservations of one scope+period still hold."""
    where = "scope_id = ? AND period_key = ? AND expires_at <= ?"
    # TOTAL(), a float, cannot overflow like SUM(); exact below 2^53, and saturated anyway above
    count, total = conn.execute(
        f"SELECT COUNT(*), TOTAL(amount_nano) FROM reservations WHERE {where}",
        (scope_id, period_key, now),
    ).fetchone()
    if count:
        conn.execute(_RELEASE, (min(int(total), MAX_LEDGER_NANO), scope_id, period_key))
        conn.execute(f"DELETE FROM reservations WHERE {where}", (scope_id, period_key, now))


def _keys(scopes: tuple[BudgetScope, ...]) -> tuple[Key, ...]:
    return tuple([(s.scope_id, s.period_key) for s in scopes])


def _warm_periods(now: float) -> list[str]:
    """The period keys start() loads: every kind's current one and the day before's."""
    keys = {"total"}
    for at in (now, now - 86400):
        keys.update(current_period(p, at)[0] for p in ("daily", "weekly", "monthly"))
    return sorted(keys)


def _check_scopes(scopes: tuple[BudgetScope, ...]) -> None:
    if len({s.scope_id for s in scopes}) != len(scopes):
        raise ValueError("a request's scopes must have distinct scope ids")
