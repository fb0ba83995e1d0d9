"""LeasedStore: budgets and rate windows taken from the store in slices (leases), so that a
request costs no store call however many processes share the budgets.

A **budget lease** is an ordinary reservation in the inner store (any backend), made with
one ``admit`` call under an id of its own: it counts, and expires after
``store.reservation_ttl_s``, like any reservation. Requests with the same scopes (team +
key, same periods and limits) are then admitted from its unused amount in memory, on the
event loop (no await between check and change), and their settlements are added up
locally. The lease admits only while young (``LeaseTuning.age_s``, never past its
period's end), and is returned (``inner.settle(lease, what its requests cost)``) as soon
as no request admitted from it is in flight, so at no time is more admitted than the
store reserved. A settlement that pushes a lease's cost past its amount (an upstream
reporting more than was reserved) writes the excess to the store at once.

Slices are sized from demand: the requests waiting for the lease, and what recent
traffic admitted (at most twice what the previous lease admitted, at most ~``span_s`` of
traffic), capped at 1/``share`` of the headroom the store last showed. When that leaves
no more than the request itself, or the slice is refused, the request takes an exact
reservation of its own (after this process gave back its idle leases on those scopes),
as without leases: near exhaustion this is exactly the per-request path.

**Rate leases** take capacity for k requests and T tokens in one ``rate_acquire`` and
admit from it while young; what is left is given back (``rate_adjust``, conservative:
capacity given back late never lets more through than the limit), together with the
output tokens counted meanwhile.

``balances()`` and the rows ``settle()`` returns come from memory: the store's figures as
of this process's last call touching the scope, corrected by its own open leases. See
docs/STORES.md for the design, the exactness argument and what a crash costs.

Over 600 lines on purpose: budget and rate leases share one lifecycle (take, admit,
return, reap) and one refusal fallback; split apart, each half would reach into the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from policies.config import StoreConfig
from policies.ratelimit import WINDOW_S, rate_state
from policies.stores.base import (
    MAX_AMOUNT_NANO,
    Admitted,
    BudgetRejection,
    BudgetScope,
    RateDecision,
    RateScope,
    RateState,
    Reservation,
    SpendRow,
    Store,
    StoreError,
    check_reserve_amount,
    clamp_actual,
)

T = TypeVar("T")
Key = tuple[str, str]  # (scope_id, period_key)

log = logging.getLogger("tallygate.store")

SETTLED_MEMORY = 10_000  # settle is idempotent for the last this many lease-admitted requests
_ADMITTED = RateDecision(True, 0.0, None, ())
_ROUNDS = 3  # lease calls a request waits for before it takes an exact reservation
_FAILURE_LOG_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class LeaseTuning:
    """How leases are sized and how long they live (the defaults are the product's)."""

    age_s: float = 1.0  # a lease admits for at most this long after it was taken
    span_s: float = 0.5  # a slice aims at about this long of recent traffic (up to twice)
    share: int = 4  # a slice takes at most 1/share of the headroom the store last showed
    reap_every_s: float = 0.25  # the reaper's tick while anything is leased
    view_max_age_s: float = 2.0  # balances() reads the store when its figures are older
    min_slice_requests: int = 1  # a slice holds at least this many times the request


class _Recent:
    """What was admitted over the last one to two ``span`` s: two buckets of ``span``."""

    __slots__ = ("cur", "prev", "span", "start")

    def __init__(self, span: float) -> None:
        self.span, self.start, self.cur, self.prev = span, -math.inf, 0, 0

    def add(self, amount: int, now: float) -> None:
        if now - self.start >= self.span:
            self._roll(now)
        self.cur += amount

    def total(self, now: float) -> int:
        if now - self.start >= self.span:
            self._roll(now)
        return self.cur + self.prev

    def _roll(self, now: float) -> None:
        self.prev = self.cur if now - self.start < 2 * self.span else 0
        self.cur, self.start = 0, now


class _Lease:
    """One budget lease: ``amount`` reserved in the store under ``id``."""

    __slots__ = (
        "adj",
        "admitted",
        "amount",
        "deadline",
        "held",
        "id",
        "inflight",
        "open",
        "pool",
        "pushed",
        "returning",
        "spent",
        "taken_at",
    )

    def __init__(
        self, lease_id: str, pool: _Pool, amount: int, taken_at: float, age_s: float
    ) -> None:
        self.id, self.pool, self.amount, self.taken_at = lease_id, pool, amount, taken_at
        self.deadline = min(taken_at + age_s, pool.period_end)
        self.spent = 0  # what its settled requests cost
        self.held = 0  # what its requests in flight reserved
        self.pushed = 0  # spend already written to the store (costs beyond ``amount``)
        self.admitted = 0  # sum of the amounts it admitted (sizes the next slice)
        self.inflight: dict[str, int] = {}
        self.open = True  # admits new requests
        self.returning = False
        self.adj = pool.adj


class _Pool:
    """The leases of one scopes tuple: the current one, a lease call in flight, sizing."""

    __slots__ = (
        "adj",
        "current",
        "keys",
        "last_admitted",
        "limited",
        "period_end",
        "recent",
        "scopes",
        "taking",
        "wanting",
    )

    def __init__(self, scopes: tuple[BudgetScope, ...], adj: list[list[int]], span: float) -> None:
        self.scopes = scopes
        self.keys: tuple[Key, ...] = tuple((s.scope_id, s.period_key) for s in scopes)
        self.limited = tuple(
            (i, s.limit_nano) for i, s in enumerate(scopes) if s.limit_nano is not None
        )
        ends = [s.period_end for s in scopes if s.period_end is not None]
        self.period_end = min(ends, default=math.inf)
        self.adj = adj  # per key: [spent, reserved] this process's open leases add to the store's
        self.current: _Lease | None = None
        self.taking: asyncio.Task[Any] | None = None
        self.wanting = 0  # amounts of the requests waiting for a lease
        self.last_admitted = 0  # what the last returned lease admitted
        self.recent = _Recent(span)


class _RateLease:
    """Capacity for ``requests`` more requests and ``tokens`` more tokens (may go below 0:
    output tokens counted beyond it), taken when the store's levels were ``levels``."""

    __slots__ = ("deadline", "levels", "requests", "taken_at", "tokens", "used")

    def __init__(
        self, requests: int, tokens: int, taken_at: float, deadline: float, levels: list[Any]
    ) -> None:
        self.requests, self.tokens = requests, tokens
        self.taken_at, self.deadline = taken_at, deadline
        self.levels = levels  # per scope: (level_r, level_t) right after the take
        self.used = 0  # requests admitted from it


class _RatePool:
    __slots__ = (
        "by_requests",
        "by_tokens",
        "current",
        "last_used",
        "pending_tokens",
        "recent_r",
        "recent_t",
        "room_r",
        "room_t",
        "scopes",
        "taking",
        "wanting_r",
        "wanting_t",
    )

    def __init__(self, scopes: tuple[RateScope, ...], span: float) -> None:
        self.scopes = scopes
        self.by_requests = any(s.rpm is not None for s in scopes)
        self.by_tokens = any(s.tpm is not None for s in scopes)
        # the room the store last showed (min over the scopes); the limit until then
        self.room_r = min((s.rpm for s in scopes if s.rpm is not None), default=0)
        self.room_t = min((s.tpm for s in scopes if s.tpm is not None), default=0)
        self.current: _RateLease | None = None
        self.taking: asyncio.Task[Any] | None = None
        self.wanting_r = self.wanting_t = 0
        self.last_used = 0
        self.pending_tokens = 0  # output tokens counted while no lease was open
        self.recent_r, self.recent_t = _Recent(span), _Recent(span)


class LeasedStore:
    """A Store that leases budgets and rate capacity from ``inner`` (see the module doc).

    Several LeasedStores (processes, replicas) on one inner store keep every budget exact:
    each admits only from what the store reserved for it. ``clock`` (unix seconds) decides
    lease ages, period ends and expiry: inject one in tests, and call ``reap()`` instead of
    waiting for the reaper task.
    """

    def __init__(
        self,
        inner: Store,
        config: StoreConfig,
        *,
        tuning: LeaseTuning | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self._tuning = tuning or LeaseTuning()
        self._ttl = config.reservation_ttl_s
        # figures older than a reservation's ttl may count reservations since expired
        self._view_max_age = min(self._tuning.view_max_age_s, self._ttl)
        self._clock = clock
        self._ids = (f"lease-{os.urandom(6).hex()}-{n}" for n in itertools.count())
        self._pools: dict[tuple[BudgetScope, ...], _Pool] = {}
        self._rpools: dict[tuple[RateScope, ...], _RatePool] = {}
        self._leases: dict[str, _Lease] = {}  # taken, not returned yet
        self._held: dict[str, _Lease] = {}  # request id -> the lease it was admitted from
        self._exact: set[str] = set()  # request ids with a reservation of their own, in flight
        self._late: OrderedDict[str, tuple[BudgetScope, ...]] = OrderedDict()
        self._settled: set[str] = set()
        self._settled_order: deque[str] = deque()
        # the store's figures per key as of this process's last call touching it: [spent,
        # reserved, when]; and what this process's open leases change in them
        self._base: dict[Key, list[float]] = {}
        self._adj: dict[Key, list[int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        self._failures = 0
        self._failure_logged_at = -math.inf

    # lifecycle

    async def start(self) -> None:
        await self.inner.start()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever(), name="tallygate-leases")

    async def close(self) -> None:
        """Return every lease (requests still in flight are charged what they reserved: the
        gateway drains them first, so there are usually none), then close the inner store."""
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        try:
            if self._tasks:
                await asyncio.wait(list(self._tasks))
            await self._return_everything()
        finally:
            await self.inner.close()

    async def ping(self) -> bool:
        return await self.inner.ping()

    async def claim_once(self, key: str, group: str, ttl_s: float | None) -> bool:
        return await self.inner.claim_once(key, group, ttl_s)

    # budgets

    async def reserve(
        self, request_id: str, scopes: tuple[BudgetScope, ...], amount_nano: int
    ) -> Reservation | BudgetRejection:
        check_reserve_amount(amount_nano)
        if request_id in self._held or request_id in self._exact or request_id in self._settled:
            raise ValueError(f"request id {request_id!r} was already reserved")
        pool = self._pools.get(scopes)
        if pool is None:
            if not scopes:
                return await self.inner.reserve(request_id, scopes, amount_nano)
            pool = self._new_pool(scopes)
        now = self._clock()
        lease = pool.current
        if (
            lease is not None
            and lease.open
            and now < lease.deadline
            and lease.spent + lease.held + amount_nano <= lease.amount
        ):
            return self._admit(lease, request_id, amount_nano, now)
        return await self._reserve_slow(pool, request_id, amount_nano)

    async def settle(self, reservation: Reservation, actual_nano: int) -> list[SpendRow]:
        request_id = reservation.request_id
        lease = self._held.pop(request_id, None)
        if lease is None:
            return await self._settle_elsewhere(reservation, actual_nano)
        actual = clamp_actual(request_id, actual_nano)
        amount = lease.inflight.pop(request_id)
        lease.held -= amount
        lease.spent += actual
        for adj in lease.adj:
            adj[0] += actual
            adj[1] -= amount
        self._remember(request_id)
        if lease.spent + lease.held > lease.amount + lease.pushed:
            try:
                await self._run(self._push(lease))
            except StoreError as exc:  # the excess stays in the lease, returned later
                self._failed(exc)
                self._wake.set()
        if not lease.inflight:
            await self._run(self._return(lease))  # no request in flight: give it back now
        return self._view(reservation.scopes)

    async def admit(
        self,
        request_id: str,
        scopes: tuple[BudgetScope, ...],
        amount_nano: int,
        rate_scopes: tuple[RateScope, ...] = (),
        tokens: int = 0,
        requests: int = 1,
    ) -> Admitted:
        """rate_acquire then reserve, from the leases; a budget refusal gives the rate
        capacity back (all or nothing, as the inner stores' admit)."""
        check_reserve_amount(amount_nano)
        decision = _ADMITTED
        if rate_scopes:
            decision = await self.rate_acquire(rate_scopes, tokens, requests)
            if not decision.allowed:
                return Admitted(decision, None)
        budget = await self.reserve(request_id, scopes, amount_nano)
        if isinstance(budget, BudgetRejection) and rate_scopes:
            await self._unacquire(rate_scopes, tokens, requests)
        return Admitted(decision, budget, tuple(self._view(scopes)))

    async def spend(self, scope_ids: tuple[str, ...] | None = None) -> list[SpendRow]:
        """The store's rows, corrected by this process's open leases (other processes'
        leases show as reserved until returned)."""
        rows = await self.inner.spend(scope_ids)
        adj = self._adj
        if not adj:
            return rows
        out = []
        for row in rows:
            a = adj.get((row.scope_id, row.period_key))
            if a is not None and (a[0] or a[1]):
                row = SpendRow(
                    row.scope_id,
                    row.period_key,
                    row.spent_nano + a[0],
                    max(0, row.reserved_nano + a[1]),
                )
            out.append(row)
        return out

    async def balances(
        self, scopes: tuple[BudgetScope, ...], *, fresh: bool = False
    ) -> list[SpendRow]:
        """From memory (see _view), unless ``fresh`` or the figures of a scope are missing
        or older than ``view_max_age_s`` (or reservation_ttl_s): then one read of the store."""
        if not scopes:
            return []
        oldest = self._clock() - self._view_max_age
        base = self._base
        for s in scopes:
            b = base.get((s.scope_id, s.period_key))
            if fresh or b is None or b[2] < oldest:
                rows = await self.inner.balances(scopes)
                self._set_base(scopes, rows, self._clock())
                break
        return self._view(scopes)

    # rate windows

    async def rate_acquire(
        self, scopes: tuple[RateScope, ...], tokens: int, requests: int = 1
    ) -> RateDecision:
        if not scopes:
            return _ADMITTED
        pool = self._rpools.get(scopes)
        if pool is None:
            pool = self._new_rate_pool(scopes)
        now = self._clock()
        lease = pool.current
        if lease is not None and _fits(pool, lease, tokens, requests, now):
            return self._rate_admit(pool, lease, tokens, requests, now)
        return await self._rate_slow(pool, tokens, requests)

    async def rate_add_tokens(self, scopes: tuple[RateScope, ...], tokens: int) -> None:
        """Counted into the open lease (given with it to the store when it is returned) or
        queued for the reaper's next tick: no store call per request."""
        pool = self._rpools.get(scopes)
        if pool is None:
            await self.inner.rate_add_tokens(scopes, tokens)
            return
        if tokens <= 0 or not pool.by_tokens:
            return
        pool.recent_t.add(tokens, self._clock())
        if pool.current is not None:
            pool.current.tokens -= tokens
        else:
            pool.pending_tokens += tokens
            self._wake.set()

    async def rate_adjust(
        self, scopes: tuple[RateScope, ...], requests: int, tokens: int
    ) -> tuple[RateState, ...]:
        return await self.inner.rate_adjust(scopes, requests, tokens)

    # the reaper

    async def reap(self) -> None:
        """One tick: close leases past their deadline, return the idle ones and the rate
        leases, expire budget leases older than reservation_ttl_s (their requests' late
        settlements still add spend), retry failed returns, write queued output tokens.
        Lease calls in flight finish first."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        now = self._clock()
        for lease in list(self._leases.values()):
            if lease.returning:
                continue
            if lease.inflight and now - lease.taken_at >= self._ttl:
                self._expire(lease)
            if now >= lease.deadline:
                self._close(lease)
            if not lease.inflight and (not lease.open or lease.pool.current is not lease):
                await self._run(self._return(lease))
        for pool in list(self._rpools.values()):
            rate = pool.current
            if (rate is not None and now >= rate.deadline) or pool.pending_tokens:
                await self._run(self._return_rate(pool))
        self._forget_idle(now)

    def _outstanding(self) -> bool:
        return bool(self._leases) or any(
            p.current is not None or p.pending_tokens for p in self._rpools.values()
        )

    async def _reap_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._tuning.reap_every_s)
            try:
                await self.reap()
            except StoreError as exc:
                self._failed(exc)
            except Exception:  # the reaper must survive a bug
                log.exception("the lease reaper failed; retrying at the next tick")
            if not self._outstanding():
                self._wake.clear()

    # budget leases: below

    def _new_pool(self, scopes: tuple[BudgetScope, ...]) -> _Pool:
        _check(scopes)
        adj = [self._adj.setdefault((s.scope_id, s.period_key), [0, 0]) for s in scopes]
        pool = self._pools[scopes] = _Pool(scopes, adj, self._tuning.span_s)
        return pool

    def _admit(self, lease: _Lease, request_id: str, amount: int, now: float) -> Reservation:
        lease.held += amount
        lease.admitted += amount
        lease.inflight[request_id] = amount
        for adj in lease.adj:
            adj[1] += amount
        self._held[request_id] = lease
        lease.pool.recent.add(amount, now)
        return Reservation(request_id, lease.pool.scopes, amount)

    async def _reserve_slow(
        self, pool: _Pool, request_id: str, amount: int
    ) -> Reservation | BudgetRejection:
        """Wait for (or make) a lease call sized for every waiting request; admit from the
        new lease. If none fits: give back this process's idle leases on these scopes
        and take an exact reservation."""
        pool.wanting += amount
        try:
            for _ in range(_ROUNDS):
                if pool.taking is None:
                    size = self._slice(pool, amount)
                    if size <= amount:
                        break  # the exact path
                    pool.taking = self._spawn(self._take(pool, size))
                result = await asyncio.shield(pool.taking)
                lease, now = pool.current, self._clock()
                if (
                    lease is not None
                    and lease.open
                    and now < lease.deadline
                    and lease.spent + lease.held + amount <= lease.amount
                ):
                    return self._admit(lease, request_id, amount, now)
                if isinstance(result, BudgetRejection):
                    break
        finally:
            pool.wanting -= amount
        await self._give_back(pool.keys)
        return await self._reserve_exact(pool, request_id, amount)

    def _slice(self, pool: _Pool, amount: int) -> int:
        """How much the next lease of ``pool`` takes; ``amount`` or less means: no lease.

        Demand (the waiting requests; recent traffic, at most twice what the previous
        lease admitted), at least min_slice_requests x the request, at most 1/share of
        the store's headroom as last seen (the limit while unseen)."""
        tuning, now = self._tuning, self._clock()
        if now >= pool.period_end:
            return 0  # a lease could not admit anything
        recent = pool.recent.total(now)
        if pool.last_admitted:
            recent = min(recent, 2 * pool.last_admitted)
        want = max(pool.wanting, recent, amount * tuning.min_slice_requests)
        room = MAX_AMOUNT_NANO
        base = self._base
        for i, limit in pool.limited:
            b = base.get(pool.keys[i])
            left = limit if b is None else limit - int(b[0]) - int(b[1])
            room = min(room, left // tuning.share)
        return min(want, room)

    async def _take(self, pool: _Pool, size: int) -> Reservation | BudgetRejection | None:
        """One lease call: the lease becomes the pool's current one (the previous one is
        closed, and returned if idle)."""
        lease_id = next(self._ids)
        taken_at = self._clock()
        try:
            got = await self.inner.admit(lease_id, pool.scopes, size)
            self._set_base(pool.scopes, got.balances, self._clock())
            if isinstance(got.budget, Reservation):
                lease = _Lease(lease_id, pool, size, taken_at, self._tuning.age_s)
                self._leases[lease_id] = lease
                for adj in pool.adj:
                    adj[1] -= size  # the store counts it reserved; its requests count here
                previous, pool.current = pool.current, lease
                if previous is not None:
                    self._close(previous)
                    if not previous.inflight:
                        self._spawn(self._return(previous))
                self._wake.set()
            return got.budget
        finally:
            pool.taking = None

    async def _reserve_exact(
        self, pool: _Pool, request_id: str, amount: int
    ) -> Reservation | BudgetRejection:
        """A reservation of the request's own: what the store decides, as without leases."""
        got = await self.inner.admit(request_id, pool.scopes, amount)
        now = self._clock()
        self._set_base(pool.scopes, got.balances, now)
        if isinstance(got.budget, Reservation):
            self._exact.add(request_id)
            pool.recent.add(amount, now)
        assert got.budget is not None  # no rate scopes: the budget was tried
        return got.budget

    async def _settle_elsewhere(self, reservation: Reservation, actual_nano: int) -> list[SpendRow]:
        """A request not admitted from an open lease: settled before (a no-op), one whose
        lease expired (its spend is added), or one with a reservation of its own."""
        request_id, scopes = reservation.request_id, reservation.scopes
        if request_id in self._settled:
            return self._view(scopes)
        late = self._late.pop(request_id, None)
        if late is not None:  # its lease expired: the store adds the spend, holds nothing
            reservation = Reservation(request_id, late, 0)
        rows = await self.inner.settle(reservation, actual_nano)
        self._exact.discard(request_id)
        self._remember(request_id)
        self._set_base(reservation.scopes, rows, self._clock())
        return self._view(scopes)

    async def _push(self, lease: _Lease) -> None:
        """The lease's requests cost more than it reserved: write the excess to the store
        now (a settlement of its own), so no process reads a budget as less spent than it
        is. The lease admits no more."""
        excess = lease.spent + lease.held - lease.amount - lease.pushed
        if excess <= 0:
            return
        self._close(lease)
        push = Reservation(f"{lease.id}+{lease.pushed}", lease.pool.scopes, 0)
        rows = await self.inner.settle(push, excess)
        lease.pushed += excess
        for adj in lease.adj:
            adj[0] -= excess
        self._set_base(lease.pool.scopes, rows, self._clock())

    async def _return(self, lease: _Lease, *, charge_inflight: bool = False) -> None:
        """Settle the lease in the store at what its requests cost (plus, on close, what
        those still in flight reserved). On a store error it stays, for the reaper."""
        if lease.returning or lease.id not in self._leases:
            return
        if lease.inflight and not charge_inflight:
            return
        self._close(lease)
        for request_id, amount in lease.inflight.items():  # closing: charged what they hold
            del self._held[request_id]
            self._remember(request_id)  # their settlement, if it comes, changes nothing
            lease.spent += amount
            lease.held -= amount
            for adj in lease.adj:
                adj[0] += amount
                adj[1] -= amount
        lease.inflight.clear()
        lease.returning = True
        cost = lease.spent - lease.pushed
        try:
            rows = await self.inner.settle(
                Reservation(lease.id, lease.pool.scopes, lease.amount), cost
            )
        except StoreError as exc:
            self._failed(exc)
            self._wake.set()
            return
        finally:
            lease.returning = False
        del self._leases[lease.id]
        for adj in lease.adj:
            adj[0] -= cost
            adj[1] += lease.amount
        lease.pool.last_admitted = lease.admitted
        self._set_base(lease.pool.scopes, rows, self._clock())
        self._recovered()

    def _close(self, lease: _Lease) -> None:
        lease.open = False
        if lease.pool.current is lease:
            lease.pool.current = None

    def _expire(self, lease: _Lease) -> None:
        """Past reservation_ttl_s the store has released the lease: its requests still in
        flight become late ones (their settlement adds their spend, as for any expired
        reservation); the lease is returned with what the others cost."""
        self._close(lease)
        for request_id, amount in lease.inflight.items():
            self._held.pop(request_id, None)
            self._late[request_id] = lease.pool.scopes
            for adj in lease.adj:
                adj[1] -= amount
            lease.held -= amount
        lease.inflight.clear()
        while len(self._late) > SETTLED_MEMORY:
            self._late.popitem(last=False)

    async def _give_back(self, keys: Iterable[Key]) -> None:
        """Return this process's idle leases on any of ``keys`` (before a refusal). Leases
        with requests in flight keep serving what fits and are returned once idle."""
        wanted = set(keys)
        for lease in list(self._leases.values()):
            if not lease.inflight and not lease.returning and wanted.intersection(lease.pool.keys):
                await self._run(self._return(lease))

    # rate leases: below

    def _new_rate_pool(self, scopes: tuple[RateScope, ...]) -> _RatePool:
        _check(scopes)
        pool = self._rpools[scopes] = _RatePool(scopes, self._tuning.span_s)
        return pool

    def _rate_admit(
        self, pool: _RatePool, lease: _RateLease, tokens: int, requests: int, now: float
    ) -> RateDecision:
        lease.requests -= requests
        lease.tokens -= tokens
        lease.used += requests
        pool.recent_r.add(requests, now)
        if tokens > 0:
            pool.recent_t.add(tokens, now)
        return RateDecision(True, 0.0, None, self._rate_states(pool, lease, now))

    def _rate_states(self, pool: _RatePool, lease: _RateLease, now: float) -> tuple[RateState, ...]:
        """The lease's view of each scope: the store's levels right after the take, less
        what is still unused, drained since. Other processes' use since is not seen."""
        elapsed = now - lease.taken_at
        states = []
        for scope, (level_r, level_t) in zip(pool.scopes, lease.levels, strict=True):
            if scope.rpm is not None:
                level_r = max(0.0, level_r - lease.requests - elapsed * scope.rpm / WINDOW_S)
            if scope.tpm is not None:
                level_t = max(0.0, level_t - lease.tokens - elapsed * scope.tpm / WINDOW_S)
            states.append(rate_state(scope, level_r, level_t))
        return tuple(states)

    async def _rate_slow(self, pool: _RatePool, tokens: int, requests: int) -> RateDecision:
        pool.wanting_r += requests
        pool.wanting_t += tokens
        try:
            for _ in range(_ROUNDS):
                if pool.taking is None:
                    size = self._rate_slice(pool, tokens, requests)
                    if size is None:
                        break
                    pool.taking = self._spawn(self._take_rate(pool, *size))
                result = await asyncio.shield(pool.taking)
                lease, now = pool.current, self._clock()
                if lease is not None and _fits(pool, lease, tokens, requests, now):
                    return self._rate_admit(pool, lease, tokens, requests, now)
                if not result:
                    break
        finally:
            pool.wanting_r -= requests
            pool.wanting_t -= tokens
        await self._give_back_rate(pool.scopes)
        decision = await self.inner.rate_acquire(pool.scopes, tokens, requests)
        _learn_room(pool, decision.states)
        if decision.allowed:
            now = self._clock()
            pool.recent_r.add(requests, now)
            pool.recent_t.add(tokens, now)
        return decision

    def _rate_slice(self, pool: _RatePool, tokens: int, requests: int) -> tuple[int, int] | None:
        """(requests, tokens) for the next rate lease, sized like budget slices; None when
        no more than this request's own would be taken (the exact path)."""
        tuning, now = self._tuning, self._clock()
        k, t = requests, tokens
        if pool.by_requests:
            recent = pool.recent_r.total(now)
            if pool.last_used:
                recent = min(recent, 2 * pool.last_used)
            want = max(pool.wanting_r, recent, requests * tuning.min_slice_requests)
            k = min(want, pool.room_r // tuning.share)
            if k < requests:
                return None
        if pool.by_tokens:
            recent_t = pool.recent_t.total(now)
            want_t = max(pool.wanting_t, recent_t, tokens * tuning.min_slice_requests)
            t = min(want_t, pool.room_t // tuning.share)
            if t < tokens:
                return None
        if k <= requests and t <= tokens:
            return None
        return k, t

    async def _take_rate(self, pool: _RatePool, requests: int, tokens: int) -> bool:
        """Give back the previous lease (with the output tokens counted since), then take
        capacity for ``requests`` requests and ``tokens`` tokens in one call."""
        try:
            await self._return_rate(pool)
            taken_at = self._clock()
            decision = await self.inner.rate_acquire(pool.scopes, tokens, requests)
            _learn_room(pool, decision.states)
            if not decision.allowed:
                return False
            levels = [
                _levels(scope, state)
                for scope, state in zip(pool.scopes, decision.states, strict=True)
            ]
            pool.current = _RateLease(
                requests, tokens, taken_at, taken_at + self._tuning.age_s, levels
            )
            self._wake.set()
            return True
        finally:
            pool.taking = None

    async def _return_rate(self, pool: _RatePool) -> None:
        """Give the current lease's unused capacity back and charge the output tokens
        counted since (one rate_adjust), or write queued output tokens."""
        lease, pool.current = pool.current, None
        requests = tokens = 0
        if lease is not None:
            pool.last_used = lease.used
            requests = -lease.requests if pool.by_requests else 0
            tokens = -lease.tokens if pool.by_tokens else 0
        tokens += pool.pending_tokens
        pool.pending_tokens = 0
        if not requests and not tokens:
            return
        try:
            _learn_room(pool, await self.inner.rate_adjust(pool.scopes, requests, tokens))
        except StoreError:
            if tokens > 0:  # output tokens are kept for the next attempt; capacity is not
                pool.pending_tokens += tokens
                self._wake.set()
            raise

    async def _give_back_rate(self, scopes: tuple[RateScope, ...]) -> None:
        wanted = {s.scope_id for s in scopes}
        for pool in list(self._rpools.values()):
            if pool.current is not None and wanted.intersection(s.scope_id for s in pool.scopes):
                await self._return_rate(pool)

    async def _unacquire(self, scopes: tuple[RateScope, ...], tokens: int, requests: int) -> None:
        pool = self._rpools.get(scopes)
        if pool is not None and pool.current is not None:
            pool.current.requests += requests
            pool.current.tokens += tokens
            pool.current.used -= requests
        else:
            await self.inner.rate_adjust(scopes, -requests, -tokens)

    # the view of the budgets

    def _set_base(
        self, scopes: tuple[BudgetScope, ...], rows: Iterable[SpendRow], now: float
    ) -> None:
        base = self._base
        for s, row in zip(scopes, rows, strict=True):
            base[(s.scope_id, s.period_key)] = [row.spent_nano, row.reserved_nano, now]

    def _view(self, scopes: tuple[BudgetScope, ...]) -> list[SpendRow]:
        """The store's figures as of this process's last call, corrected by its open
        leases: spent + what their settled requests cost, reserved - their amounts + what
        their requests in flight hold."""
        base, adj = self._base, self._adj
        rows = []
        for s in scopes:
            key = (s.scope_id, s.period_key)
            b = base.get(key)
            a = adj.get(key)
            spent, reserved = (0, 0) if b is None else (int(b[0]), int(b[1]))
            if a is not None:
                spent, reserved = spent + a[0], reserved + a[1]
            rows.append(SpendRow(s.scope_id, s.period_key, spent, max(0, reserved)))
        return rows

    # housekeeping

    def _remember(self, request_id: str) -> None:
        if len(self._settled_order) >= SETTLED_MEMORY:
            self._settled.discard(self._settled_order.popleft())
        self._settled.add(request_id)
        self._settled_order.append(request_id)

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task kept until done, so a lease call survives its waiter's cancellation."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: its waiters (if any are left) got it

    async def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` in a task of its own: a cancelled caller does not cut it short."""
        return await asyncio.shield(self._spawn(coro))

    def _forget_idle(self, now: float) -> None:
        """Drop pools with nothing out and no recent traffic (bounded memory)."""
        for scopes, pool in list(self._pools.items()):
            if (
                pool.current is None
                and pool.taking is None
                and not pool.wanting
                and not pool.recent.total(now)
                and not any(lease.pool is pool for lease in self._leases.values())
            ):
                del self._pools[scopes]
        for rscopes, rpool in list(self._rpools.items()):
            if (
                rpool.current is None
                and rpool.taking is None
                and not rpool.wanting_r
                and not rpool.pending_tokens
                and not rpool.recent_r.total(now)
            ):
                del self._rpools[rscopes]
        used = {key for pool in self._pools.values() for key in pool.keys}
        oldest = now - self._tuning.view_max_age_s
        for key, adj in list(self._adj.items()):
            if key not in used and not adj[0] and not adj[1]:
                del self._adj[key]
        for key, b in list(self._base.items()):
            if key not in used and b[2] < oldest:
                del self._base[key]

    async def _return_everything(self) -> None:
        lost: list[str] = []
        for lease in list(self._leases.values()):
            try:
                await self._return(lease, charge_inflight=True)
            except Exception as exc:  # closing: report, go on
                lost.append(f"{lease.id}: {exc}")
            if lease.id in self._leases:
                lost.append(f"{lease.id} (spent {lease.spent - lease.pushed} nano-USD)")
        for pool in list(self._rpools.values()):
            try:
                await self._return_rate(pool)
            except StoreError as exc:
                lost.append(f"rate {[s.scope_id for s in pool.scopes]}: {exc}")
        if lost:
            log.error(
                "closing the store with leases not returned (they expire after "
                "reservation_ttl_s; their spend is not recorded): %s",
                "; ".join(lost),
            )

    def _failed(self, exc: StoreError) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._failure_logged_at >= _FAILURE_LOG_EVERY_S:
            self._failure_logged_at = now
            log.error(
                "could not return a lease to the store (%d failures so far; kept, retried "
                "every %.2fs): %s",
                self._failures,
                self._tuning.reap_every_s,
                exc,
            )

    def _recovered(self) -> None:
        if self._failures:
            log.warning("lease returns work again after %d failures", self._failures)
            self._failures = 0


def _fits(pool: _RatePool, lease: _RateLease, tokens: int, requests: int, now: float) -> bool:
    return (
        now < lease.deadline
        and (not pool.by_requests or lease.requests >= requests)
        and (not pool.by_tokens or tokens <= 0 or lease.tokens >= tokens)
    )


def _levels(scope: RateScope, state: RateState) -> tuple[float, float]:
    """A scope's bucket levels from its state (the reset time is level x 60 / limit)."""
    level_r = state.reset_requests_s * scope.rpm / WINDOW_S if scope.rpm else 0.0
    level_t = state.reset_tokens_s * scope.tpm / WINDOW_S if scope.tpm else 0.0
    return level_r, level_t


def _learn_room(pool: _RatePool, states: tuple[RateState, ...]) -> None:
    """The smallest remaining requests and tokens the store just showed."""
    rooms_r = [s.remaining_requests for s in states if s.remaining_requests is not None]
    rooms_t = [s.remaining_tokens for s in states if s.remaining_tokens is not None]
    if rooms_r:
        pool.room_r = min(rooms_r)
    if rooms_t:
        pool.room_t = min(rooms_t)


def _check(scopes: tuple[BudgetScope, ...] | tuple[RateScope, ...]) -> None:
    if len({s.scope_id for s in scopes}) != len(scopes):
        raise ValueError("a request's scopes must have distinct scope ids")
    if any(s.group != scopes[0].group for s in scopes):
        raise ValueError("every scope of one request must share its group (one hash tag)")
