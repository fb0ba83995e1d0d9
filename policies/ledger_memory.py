"""The local store's in-memory ledger, for when one gateway process owns the SQLite file.

Spent and reserved per (scope_id, period_key), the outstanding reservations and the request
ids settled lately live in this process's memory, so reserve, settle and balances cost a
few dict operations and never wait for I/O. Every method is synchronous: called on the
event loop, a check and the change it decides run with no await in between, which makes
them atomic against every other task of the process.

What the file must learn is queued, for ``policies.store_local.LocalStore`` to write back
in batches: spend to add per scope and period (``deltas``), and reservations that were
found in the file at start and have since ended (``releases``). Reservations made here
are never written while they run; the store hands the outstanding ones to the file only
on a graceful close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence

from policies.store import BudgetRejection, BudgetScope, Reservation, SpendRow

Key = tuple[str, str]  # (scope_id, period_key)
FileReservation = tuple[str, str, str, int, float]  # a row of the file's reservations table
# Writes spend deltas, releases and reservations to hand over, in one transaction.
Writer = Callable[[dict[Key, int], set[str], Sequence[FileReservation]], Awaitable[None]]

SETTLED_MEMORY = 100_000  # settle is idempotent for the request ids of the last this many settles
_FAILURE_LOG_EVERY_S = 10.0  # a failing flusher logs at most this often

log = logging.getLogger("tallygate.store")


class MemoryLedger:
    def __init__(self, ttl_s: float, settled_memory: int = SETTLED_MEMORY) -> None:
        self.ttl = ttl_s
        # [spent, reserved, listed]: listed is 1 once the row exists in the file or a reserve
        # or settle made it (spend() lists it), 0 while it is only "read, not in the file".
        self.rows: dict[Key, list[int]] = {}
        # Reservations made here: request id -> (expires_at, keys, amount), in the order
        # made, so the first to expire is at the front (the clock moves forward).
        self._live: OrderedDict[str, tuple[float, tuple[Key, ...], int]] = OrderedDict()
        # Reservations found in the file at start: request id -> (expires_at, ((key, amount), ...)).
        self._inherited: dict[str, tuple[float, tuple[tuple[Key, int], ...]]] = {}
        self._inherited_next = math.inf  # the earliest expiry among them
        self._settled: set[str] = set()
        self._settled_order: deque[str] = deque()
        self._settled_memory = settled_memory
        self.deltas: dict[Key, int] = {}  # spent to add in the file
        self.releases: set[str] = set()  # inherited reservations to delete from the file
        self._wake = asyncio.Event()  # set when something is queued (or to stop the flusher)
        self._stop = asyncio.Event()
        self._write_failures = 0
        self._failure_logged_at = -math.inf

    # filling from the file

    def load(
        self,
        spent: Iterable[tuple[str, str, int]],
        reservations: Iterable[FileReservation],
        settled: Iterable[str],
    ) -> None:
        """What start() read: spent per scope and period, the file's reservations (they
        are adopted, and released in the file when they end) and recent settled ids."""
        for scope_id, period_key, spent_nano in spent:
            self.rows[(scope_id, period_key)] = [spent_nano, 0, 1]
        held: dict[str, tuple[float, list[tuple[Key, int]]]] = {}
        for request_id, scope_id, period_key, amount, expires_at in reservations:
            key = (scope_id, period_key)
            self.rows.setdefault(key, [0, 0, 1])[1] += amount
            expires, holds = held.get(request_id, (expires_at, []))
            holds.append((key, amount))
            held[request_id] = (min(expires, expires_at), holds)
        self._inherited = {rid: (expires, tuple(holds)) for rid, (expires, holds) in held.items()}
        self._inherited_next = min((e for e, _ in self._inherited.values()), default=math.inf)
        for request_id in settled:
            self._remember(request_id)

    def missing(self, keys: Iterable[Key]) -> list[Key]:
        rows = self.rows
        return [key for key in keys if key not in rows]

    def add_rows(self, keys: Iterable[Key], spent: dict[Key, int]) -> None:
        """Rows read from the file after start (absent ones as zeros). A row that another
        task added meanwhile is newer than the file: it is kept."""
        for key in keys:
            if key not in self.rows:
                found = spent.get(key)
                self.rows[key] = [0, 0, 0] if found is None else [found, 0, 1]

    # budgets

    def reserve(
        self,
        request_id: str,
        scopes: tuple[BudgetScope, ...],
        keys: tuple[Key, ...],
        amount: int,
        now: float,
    ) -> Reservation | BudgetRejection:
        """All of ``keys`` must be in ``rows``."""
        if request_id in self._live or request_id in self._inherited or request_id in self._settled:
            raise ValueError(f"request id {request_id!r} was already reserved")
        self.expire(now)
        rows = self.rows
        for scope, key in zip(scopes, keys, strict=True):
            limit = scope.limit_nano
            if limit is not None:
                spent, reserved, _ = rows[key]
                if spent + reserved + amount > limit:
                    return BudgetRejection(scope, spent, reserved, amount)
        for key in keys:
            row = rows[key]
            row[1] += amount
            row[2] = 1
        self._live[request_id] = (now + self.ttl, keys, amount)
        return Reservation(request_id, scopes, amount)

    def settle(self, request_id: str, keys: tuple[Key, ...], actual: int) -> None:
        """All of ``keys`` must be in ``rows``. A reservation already expired and released
        only gets its spend added."""
        if request_id in self._settled:
            return
        rows = self.rows
        live = self._live.pop(request_id, None)
        if live is not None:
            _, held_keys, amount = live
            for key in held_keys:
                rows[key][1] -= amount
        elif (inherited := self._inherited.pop(request_id, None)) is not None:
            for key, amount in inherited[1]:
                rows[key][1] -= amount
            self.releases.add(request_id)
        deltas = self.deltas
        for key in keys:
            row = rows[key]
            row[0] += actual
            row[2] = 1
            deltas[key] = deltas.get(key, 0) + actual  # 0 too: the file gets the row
        self._remember(request_id)
        self._wake.set()

    def expire(self, now: float) -> None:
        """Give back what expired reservations hold."""
        live, rows = self._live, self.rows
        while live:
            request_id = next(iter(live))
            expires_at, keys, amount = live[request_id]
            if expires_at > now:
                break
            del live[request_id]
            for key in keys:
                rows[key][1] -= amount
        if now >= self._inherited_next:
            for request_id, (expires_at, holds) in list(self._inherited.items()):
                if expires_at <= now:
                    del self._inherited[request_id]
                    for key, amount in holds:
                        rows[key][1] -= amount
                    self.releases.add(request_id)
                    self._wake.set()
            self._inherited_next = min((e for e, _ in self._inherited.values()), default=math.inf)

    def balances(
        self, scopes: tuple[BudgetScope, ...], keys: tuple[Key, ...], now: float
    ) -> list[SpendRow]:
        self.expire(now)
        rows = self.rows
        return [
            SpendRow(scope.scope_id, scope.period_key, rows[key][0], rows[key][1])
            for scope, key in zip(scopes, keys, strict=True)
        ]

    def spend(
        self,
        file_rows: Iterable[tuple[str, str, int, int]],
        scope_ids: tuple[str, ...] | None,
        now: float,
    ) -> list[SpendRow]:
        """The file's rows (already filtered by scope_ids), overridden by the rows in memory."""
        self.expire(now)
        merged = {(s, p): (spent, reserved) for s, p, spent, reserved in file_rows}
        wanted = None if scope_ids is None else set(scope_ids)
        for key, (spent, reserved, listed) in self.rows.items():
            if listed and (wanted is None or key[0] in wanted):
                merged[key] = (spent, reserved)
        return [SpendRow(*key, *values) for key, values in sorted(merged.items())]

    # what the file must learn

    async def flush_every(self, interval_s: float, write: Writer) -> None:
        """The flusher task, until stop_flushing(): once something is queued, let more
        gather for ``interval_s``, then write it all in one transaction. Idle, it sleeps
        (no timer: waking the loop costs CPU too); after a failed write it retries every
        ``interval_s``."""
        wake, stop = self._wake, self._stop
        while not stop.is_set():
            await wake.wait()
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval_s):
                        await stop.wait()
            wake.clear()  # what is queued from here on wakes the next round
            if not await self.flush(write):
                wake.set()

    def stop_flushing(self) -> None:
        """Let flush_every() finish the write it is doing, if any, and return."""
        self._stop.set()
        self._wake.set()

    async def flush(
        self, write: Writer, outstanding: Sequence[FileReservation] = (), *, final: bool = False
    ) -> bool:
        """Write what is queued (and ``outstanding``) in one transaction, when there is
        something. On failure keep it all queued for the next attempt, log, return False."""
        if not (self.deltas or self.releases or outstanding):
            return True
        deltas, releases = self.take_pending()
        try:
            await write(deltas, releases, outstanding)
        except Exception as exc:  # the flusher must survive anything, and drop nothing
            self.requeue(deltas, releases)
            self._write_failures += 1
            now = time.monotonic()
            if final:
                unsaved = {f"{s} {p}": n for (s, p), n in self.deltas.items() if n}
                log.error(
                    "closing the store without writing: %s; spend lost (nano-USD per scope "
                    "and period): %s; reservations not handed over: %d",
                    exc,
                    unsaved,
                    len({row[0] for row in outstanding}),
                )
            elif now - self._failure_logged_at >= _FAILURE_LOG_EVERY_S:
                self._failure_logged_at = now
                log.error(
                    "could not write spend to the store (%d attempts so far; kept in memory, "
                    "retried at the next flush): %s",
                    self._write_failures,
                    exc,
                )
            return False
        if self._write_failures:
            log.warning("store writes work again after %d failures", self._write_failures)
            self._write_failures = 0
        return True

    def take_pending(self) -> tuple[dict[Key, int], set[str]]:
        deltas, releases = self.deltas, self.releases
        self.deltas, self.releases = {}, set()
        return deltas, releases

    def requeue(self, deltas: dict[Key, int], releases: set[str]) -> None:
        """Put back what could not be written, merged with what was queued meanwhile."""
        for key, amount in deltas.items():
            self.deltas[key] = self.deltas.get(key, 0) + amount
        self.releases |= releases

    def outstanding(self, now: float) -> list[FileReservation]:
        """The unexpired reservations made here, as rows of the file's reservations table."""
        self.expire(now)
        return [
            (request_id, scope_id, period_key, amount, expires_at)
            for request_id, (expires_at, keys, amount) in self._live.items()
            for scope_id, period_key in keys
        ]

    def _remember(self, request_id: str) -> None:
        if len(self._settled_order) >= self._settled_memory:
            self._settled.discard(self._settled_order.popleft())
        self._settled.add(request_id)
        self._settled_order.append(request_id)
