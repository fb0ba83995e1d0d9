"""The local store's in-memory ledger, for when one gateway process owns the SQLite file.

Spent and reserved per (scope_id, period_key), the outstanding reservations and the request
ids settled lately live in this process's memory, so reserve, settle and balances cost a
few dict operations and never wait for I/O. Every method is synchronous: called on the
event loop, a check and the change it decides run with no await in between, which makes
them atomic against every other task of the process.

What the file must learn is queued, for ``policies.stores.local.LocalStore`` to write back
in batches: spend to add per scope and period (``deltas``), and reservations that were
found in the file at start and have since ended (``releases``). Reservations made here
are never written while they run; the store hands the outstanding ones to the file only
on a graceful close.

Spent and reserved saturate within [0, MAX_LEDGER_NANO], like the file's columns. When the
store rejects a batch's data (``RejectedWrite``), its rows are written one by one, so one
bad row never blocks the others; a row rejected ``ROW_ATTEMPTS`` times is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Sequence

from policies.stores.base import (
    MAX_LEDGER_NANO,
    BudgetRejection,
    BudgetScope,
    Reservation,
    SpendRow,
)

Key = tuple[str, str]  # (scope_id, period_key)
FileReservation = tuple[str, str, str, int, float]  # a row of the file's reservations table
# Writes spend deltas, releases and reservations to hand over, in one transaction.
Writer = Callable[[dict[Key, int], set[str], Sequence[FileReservation]], Awaitable[None]]

# settle is idempotent for the request ids of the last this many settles. A settle comes
# twice only from a retry within this process (the pipeline settles each admission once),
# so 10,000 is ample; 100,000 cost ~13 MB, and RSS grew for the first 100k requests (soak).
SETTLED_MEMORY = 10_000
ROW_ATTEMPTS = 3  # a row the store rejects this many times is dropped (logged), not retried
_FAILURE_LOG_EVERY_S = 10.0  # a failing flusher logs at most this often

log = logging.getLogger("tallygate.store")


class RejectedWrite(Exception):
    """Raised by a Writer when the store refused the data itself (a value it cannot hold),
    not because it is unreachable: retrying the same rows will fail again, so the ledger
    writes them one by one and drops the ones that keep failing. Any other exception is
    taken as a transient failure: everything stays queued."""


# What one write of the row-by-row fallback carries: the key its failures are counted by
# (a Key for spend, a request id for a release, None for the reservations handed over).
_Piece = tuple[Key | str | None, dict[Key, int], set[str], Sequence[FileReservation]]


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
        self._rejections: dict[Key | str, int] = {}  # rows the store rejected: how often

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
            self.rows[(scope_id, period_key)] = [min(spent_nano, MAX_LEDGER_NANO), 0, 1]
        held: dict[str, tuple[float, list[tuple[Key, int]]]] = {}
        for request_id, scope_id, period_key, amount, expires_at in reservations:
            key = (scope_id, period_key)
            row = self.rows.setdefault(key, [0, 0, 1])
            row[1] = min(row[1] + amount, MAX_LEDGER_NANO)
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
                self.rows[key] = [0, 0, 0] if found is None else [min(found, MAX_LEDGER_NANO), 0, 1]

    # budgets

    def reserve(
        self,
        request_id: str,
        scopes: tuple[BudgetScope, ...],
        keys: tuple[Key, ...],
        amount: int,
        now: float,
    ) -> Reservation | BudgetRejection:
        """All of ``keys`` must be in ``rows``; ``amount`` within [0, MAX_AMOUNT_NANO]."""
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
            held = row[1] + amount  # saturates; a conditional, not min(): the hot path
            row[1] = held if held < MAX_LEDGER_NANO else MAX_LEDGER_NANO
            row[2] = 1
        self._live[request_id] = (now + self.ttl, keys, amount)
        return Reservation(request_id, scopes, amount)

    def settle(self, request_id: str, keys: tuple[Key, ...], actual: int) -> None:
        """All of ``keys`` must be in ``rows``; ``actual`` within [0, MAX_AMOUNT_NANO]. A
        reservation already expired and released only gets its spend added."""
        if request_id in self._settled:
            return
        rows = self.rows
        live = self._live.pop(request_id, None)
        if live is not None:
            _, held_keys, amount = live
            for key in held_keys:
                row = rows[key]
                held = row[1] - amount
                row[1] = held if held > 0 else 0  # see _release
        elif (inherited := self._inherited.pop(request_id, None)) is not None:
            for key, amount in inherited[1]:
                _release(rows[key], amount)
            self.releases.add(request_id)
        deltas = self.deltas
        for key in keys:
            row = rows[key]
            spent = row[0] + actual
            row[0] = spent if spent < MAX_LEDGER_NANO else MAX_LEDGER_NANO
            row[2] = 1
            # 0 too: the file gets the row. Capped like the file's column, which saturates there.
            delta = deltas.get(key, 0) + actual
            deltas[key] = delta if delta < MAX_LEDGER_NANO else MAX_LEDGER_NANO
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
                _release(rows[key], amount)
        if now >= self._inherited_next:
            for request_id, (expires_at, holds) in list(self._inherited.items()):
                if expires_at <= now:
                    del self._inherited[request_id]
                    for key, amount in holds:
                        _release(rows[key], amount)
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
            try:
                written = await self.flush(write)
            except Exception:  # a bug on the error path must not end the flusher
                log.exception("the store flusher failed; retrying at the next flush")
                written = False
            if not written:
                wake.set()

    def stop_flushing(self) -> None:
        """Let flush_every() finish the write it is doing, if any, and return."""
        self._stop.set()
        self._wake.set()

    async def flush(
        self, write: Writer, outstanding: Sequence[FileReservation] = (), *, final: bool = False
    ) -> bool:
        """Write what is queued (and ``outstanding``) in one transaction, when there is
        something. If the store rejects the data, write row by row (``_flush_rows``). On
        any other failure keep it all queued for the next attempt, log, return False."""
        if not (self.deltas or self.releases or outstanding):
            return True
        deltas, releases = self.take_pending()
        try:
            await write(deltas, releases, outstanding)
        except RejectedWrite:
            return await self._flush_rows(write, deltas, releases, outstanding, final)
        except Exception as exc:  # the flusher must survive anything, and drop nothing
            self.requeue(deltas, releases)
            self._failed(exc, outstanding, final)
            return False
        if self._rejections:
            self._forget_rejections([*deltas, *releases])
        self._recovered()
        return True

    async def _flush_rows(
        self,
        write: Writer,
        deltas: dict[Key, int],
        releases: set[str],
        outstanding: Sequence[FileReservation],
        final: bool,
    ) -> bool:
        """After the store rejected a batch: each spend row, each release and the hand-over
        in a transaction of its own, so one bad row cannot block the others. A rejected
        row is queued again until it was rejected ROW_ATTEMPTS times, then dropped (logged
        once). A transient failure stops the round: the rest stays queued."""
        pieces: list[_Piece] = [(key, {key: amount}, set(), ()) for key, amount in deltas.items()]
        pieces += [(request_id, {}, {request_id}, ()) for request_id in releases]
        if outstanding:
            pieces.append((None, {}, set(), outstanding))
        retry: Exception | None = None  # the last rejection of a row still queued
        unsent: Sequence[FileReservation] = ()
        for i, (label, piece_deltas, piece_releases, piece_outstanding) in enumerate(pieces):
            try:
                await write(piece_deltas, piece_releases, piece_outstanding)
            except RejectedWrite as exc:
                if label is None:  # handed over again by the next close attempt
                    retry, unsent = exc, piece_outstanding
                elif not self._reject(label, piece_deltas, exc):
                    self.requeue(piece_deltas, piece_releases)
                    retry = exc
            except Exception as exc:
                for _, rest_deltas, rest_releases, _ in pieces[i:]:
                    self.requeue(rest_deltas, rest_releases)
                self._failed(exc, outstanding, final)
                return False
            else:
                if label is not None:
                    self._rejections.pop(label, None)
        if retry is not None:
            self._failed(retry, unsent, final)
            return False
        self._recovered()
        return True

    def _reject(self, label: Key | str, piece_deltas: dict[Key, int], exc: Exception) -> bool:
        """Count one rejection of a row; True when it is dropped (logged here, once)."""
        count = self._rejections.get(label, 0) + 1
        if count < ROW_ATTEMPTS:
            self._rejections[label] = count
            return False
        self._rejections.pop(label, None)
        if isinstance(label, tuple):
            log.error(
                "dropping spend the store rejected %d times: scope %s period %s amount %r "
                "nano-USD (kept in memory until restart, not in the store): %s",
                count,
                label[0],
                label[1],
                piece_deltas[label],
                exc,
            )
        else:
            log.error(
                "dropping the release of reservation %s the store rejected %d times "
                "(it expires in the store instead): %s",
                label,
                count,
                exc,
            )
        return True

    def _forget_rejections(self, labels: Iterable[Key | str]) -> None:
        for label in labels:
            self._rejections.pop(label, None)

    def _failed(self, exc: Exception, outstanding: Sequence[FileReservation], final: bool) -> None:
        """Count and log a failed write (at most every _FAILURE_LOG_EVERY_S, except the last)."""
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

    def _recovered(self) -> None:
        if self._write_failures:
            log.warning("store writes work again after %d failures", self._write_failures)
            self._write_failures = 0

    def take_pending(self) -> tuple[dict[Key, int], set[str]]:
        deltas, releases = self.deltas, self.releases
        self.deltas, self.releases = {}, set()
        return deltas, releases

    def requeue(self, deltas: dict[Key, int], releases: set[str]) -> None:
        """Put back what could not be written, merged with what was queued meanwhile."""
        queued = self.deltas
        for key, amount in deltas.items():
            # no cap here: a value the store rejected must stay recognisable as one
            queued[key] = queued[key] + amount if key in queued else amount
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


def _release(row: list[int], amount: int) -> None:
    """Give back what a reservation held; never below 0 (reserved saturates at the top)."""
    row[1] = max(row[1] - amount, 0)
