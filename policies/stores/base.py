"""The store interface: atomic budget reservations and rate windows, shared by every backend.

Backends: ``policies.stores.local.LocalStore`` (SQLite ledger + windows),
``policies.stores.redis.RedisStore`` (Lua scripts) and
``policies.stores.redis_cluster.RedisClusterStore`` (the same scripts on a Redis Cluster).
``policies.stores.leases.LeasedStore`` wraps any of them when several processes share the
budgets (see ``open_store``). All pass ``tests/test_store_contract.py``. Money is integer
nano-USD throughout, within the bounds below.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    pass

# The most one reservation or one settlement may carry: $1,000,000. reserve() refuses more
# (ValueError, a caller bug), settle() clamps to it: one absurd usage report (10^18 tokens)
# must not become a number SQLite or Redis cannot hold.
MAX_AMOUNT_NANO = 10**15
# Spent and reserved per scope and period saturate here (~$4.6B): far below int64's 2^63,
# so no sum of a row and one amount (<= MAX_AMOUNT_NANO) can overflow SQLite or Redis.
# Budget limits stay below it (BudgetConfig.limit_usd <= $1B).
MAX_LEDGER_NANO = 2**62

log = logging.getLogger("tallygate.store")


class StoreError(Exception):
    """The store could not be reached or did not answer in time (the caller applies on_error)."""


@dataclass(frozen=True, slots=True)
class BudgetScope:
    """One ledger a request is charged to: a team's or a key's budget in its current period.

    ``scope_id`` is e.g. ``team:search`` or ``key:search/search-prod``; ``group`` is the
    team name: every scope of one request shares it, so Redis keys share a hash tag.
    ``limit_nano`` None means "no limit, only record spend".
    """

    scope_id: str
    group: str
    period_key: str  # "2026-11" | "2026-W48" | "2026-11-26" | "total"
    period_end: float | None  # unix seconds when this period ends (None for total)
    limit_nano: int | None


@dataclass(frozen=True, slots=True)
class Reservation:
    request_id: str
    scopes: tuple[BudgetScope, ...]
    amount_nano: int


@dataclass(frozen=True, slots=True)
class BudgetRejection:
    scope: BudgetScope
    spent_nano: int
    reserved_nano: int
    requested_nano: int


@dataclass(frozen=True, slots=True)
class RateScope:
    """One rate window owner, e.g. ``team:search`` or ``key:search/search-prod``."""

    scope_id: str
    group: str
    rpm: int | None
    tpm: int | None


@dataclass(frozen=True, slots=True)
class RateState:
    """What one scope's windows look like after a check; feeds the x-ratelimit-* headers."""

    scope_id: str
    limit_requests: int | None
    remaining_requests: int | None
    reset_requests_s: float
    limit_tokens: int | None
    remaining_tokens: int | None
    reset_tokens_s: float


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after_s: float  # 0 when allowed
    limited_by: str | None  # "requests" | "tokens" when refused
    states: tuple[RateState, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class SpendRow:
    scope_id: str
    period_key: str
    spent_nano: int
    reserved_nano: int


@dataclass(frozen=True, slots=True)
class Admitted:
    """What ``Store.admit`` decided: the rate windows, then the budget, in one atomic call.

    ``budget`` is None when the rate windows refused (the budget was not tried). The rate
    windows are charged only when the budget admits too: a refusal by either changes nothing.
    ``balances`` are the budget scopes' rows after the call, in order (empty when the budget
    was not tried)."""

    rate: RateDecision
    budget: Reservation | BudgetRejection | None
    balances: tuple[SpendRow, ...] = ()


class Store(Protocol):
    """What the gateway needs from a store. Every method may raise StoreError.

    The scopes of one call (reserve, balances, rate_acquire, ...) must share one ``group``
    (ValueError otherwise): on Redis they are one hash tag, one Cluster slot, one script.
    ``balances_by_group`` reads scopes of many groups (the spend report).
    """

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...

    async def reserve(
        self, request_id: str, scopes: tuple[BudgetScope, ...], amount_nano: int
    ) -> Reservation | BudgetRejection:
        """Atomically: if every limited scope has spent + reserved + amount <= limit, add
        amount to each scope's reserved and remember the reservation (it expires after
        reservation_ttl_s); else change nothing and return the first scope that refused.
        ValueError (nothing changed) when amount is outside [0, MAX_AMOUNT_NANO]."""
        ...

    async def settle(self, reservation: Reservation, actual_nano: int) -> list[SpendRow]:
        """Replace the reservation by the actual cost: reserved -= amount, spent += actual.
        Idempotent per request_id; if the reservation already expired (or never existed),
        spend is still added. ``actual_nano`` is clamped into [0, MAX_AMOUNT_NANO] (see
        clamp_actual); spent and reserved saturate within [0, MAX_LEDGER_NANO]. Returns the
        balances of the reservation's scopes after it (as ``balances``), so the caller needs
        no second call for the remaining budget."""
        ...

    async def admit(
        self,
        request_id: str,
        scopes: tuple[BudgetScope, ...],
        amount_nano: int,
        rate_scopes: tuple[RateScope, ...] = (),
        tokens: int = 0,
        requests: int = 1,
    ) -> Admitted:
        """``rate_acquire`` then ``reserve``, as ONE atomic call that also returns the
        budget scopes' balances: a request's whole admission in one round trip. All or
        nothing: a budget refusal leaves the rate windows as they were. ``rate_scopes``
        share the budget scopes' group. Same ValueErrors as reserve."""
        ...

    async def rate_acquire(
        self, scopes: tuple[RateScope, ...], tokens: int, requests: int = 1
    ) -> RateDecision:
        """Admit ``requests`` requests costing ``tokens`` in all against every scope's RPM
        and TPM windows (all or nothing), recording them when admitted. ``requests`` > 1
        takes capacity for several requests at once (a lease, ``policies.stores.leases``)."""
        ...

    async def rate_adjust(
        self, scopes: tuple[RateScope, ...], requests: int, tokens: int
    ) -> tuple[RateState, ...]:
        """Add ``requests`` and ``tokens`` (signed) to every scope's windows, after draining;
        a level never goes below 0. Negative counts give capacity back (a lease's unused
        part); positive ones charge it, possibly past the limit, like rate_add_tokens.
        Returns each scope's state after."""
        ...

    async def rate_add_tokens(self, scopes: tuple[RateScope, ...], tokens: int) -> None:
        """Count tokens learned after admission (the output) into the TPM windows."""
        ...

    async def spend(self, scope_ids: tuple[str, ...] | None = None) -> list[SpendRow]:
        """Spent and reserved per scope and period (all when scope_ids is None)."""
        ...

    async def balances(
        self, scopes: tuple[BudgetScope, ...], *, fresh: bool = False
    ) -> list[SpendRow]:
        """Spent and reserved of exactly these scopes in their periods: one row per scope,
        in order, zeros when nothing is recorded yet; expired reservations not counted.
        Cheap (no scan), unlike spend(): for the remaining budget of every request.
        A LeasedStore answers from memory (its figures may be a little stale) unless
        ``fresh``: admin reports ask for fresh figures; the other stores always read."""
        ...

    async def claim_once(self, key: str, group: str, ttl_s: float | None) -> bool:
        """Atomically: True for the first caller to claim ``key`` (across every process and
        replica on this store), False for every later one until the claim expires after
        ``ttl_s`` seconds (None: never). ``group`` is the team (the Redis hash tag). A
        retried call that already won still answers True. For budget alerts: who sends."""
        ...


def check_reserve_amount(amount_nano: int) -> None:
    """A reservation outside [0, MAX_AMOUNT_NANO] is a caller bug: refused before any change."""
    if not 0 <= amount_nano <= MAX_AMOUNT_NANO:
        raise ValueError(f"amount_nano must be within [0, {MAX_AMOUNT_NANO}], got {amount_nano}")


def clamp_actual(request_id: str, actual_nano: int) -> int:
    """The cost settle() records: ``actual_nano`` clamped into [0, MAX_AMOUNT_NANO], with one
    warning when clamped (the request was served: its spend is recorded at the bound)."""
    if 0 <= actual_nano <= MAX_AMOUNT_NANO:
        return actual_nano
    clamped = 0 if actual_nano < 0 else MAX_AMOUNT_NANO
    log.warning(
        "settle %s: actual cost %s nano-USD is outside [0, %d]; recorded as %d",
        request_id,
        actual_nano,
        MAX_AMOUNT_NANO,
        clamped,
    )
    return clamped


async def balances_by_group(
    store: Store, scopes: tuple[BudgetScope, ...], *, concurrency: int = 16
) -> list[SpendRow]:
    """``store.balances`` (fresh: for reports) of scopes of any number of groups: one call
    per group, at most ``concurrency`` at a time; one row per scope, in order. The first
    StoreError cancels the calls still running and is raised."""
    by_group: dict[str, list[int]] = {}
    for i, scope in enumerate(scopes):
        by_group.setdefault(scope.group, []).append(i)
    rows: list[SpendRow | None] = [None] * len(scopes)
    gate = asyncio.Semaphore(concurrency)

    async def read(indexes: list[int]) -> None:
        async with gate:
            got = await store.balances(tuple(scopes[i] for i in indexes), fresh=True)
        for i, row in zip(indexes, got, strict=True):
            rows[i] = row

    try:
        async with asyncio.TaskGroup() as tasks:
            for indexes in by_group.values():
                tasks.create_task(read(indexes))
    except ExceptionGroup as group:
        raise group.exceptions[0] from None
    return rows  # type: ignore[return-value]  # every index was filled
