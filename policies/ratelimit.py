"""Rate windows: GCRA over 60 s for RPM and TPM, as pure math and as an in-process table.

The algorithm is GCRA (generic cell rate algorithm), kept in its continuous-state
leaky-bucket form (ITU-T I.371 shows the two forms admit exactly the same requests). A
limit of L per 60 s is a bucket of size L that drains L units per 60 s; a request
costing ``c`` units (1 for requests, its tokens for tokens) is admitted when
``level + c <= L`` after draining, and then adds ``c``. So a whole minute's worth may
burst at once, no window boundary lets 2L through (as fixed windows do), retry-after is
exact (``(level + c - L) * 60 / L``) and the remaining count is ``L - level``.

Per scope we keep ``(at, level_requests, level_tokens)``: the time of the last update
and both levels. (GCRA's usual state, the theoretical arrival time, equals
``at + level * 60 / L``; we keep the level instead because it stays a small number, so
counts are exact in floating point, while adding 60/L to a unix timestamp loses ~0.1 µs
per step and miscounts limits of thousands per minute.)

``policies/stores/redis.py`` runs the same arithmetic in Lua (times in milliseconds);
``policies/stores/local.py`` runs it here, on rows from SQLite when several processes
share the windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from policies.stores.base import RateDecision, RateScope, RateState

WINDOW_S = 60.0
_EPS = 1e-6  # units: slack for the fractions draining leaves behind
_SWEEP_EVERY = 4096  # in-process table: forget drained scopes every this many calls

Bucket = tuple[float, float, float]  # (at unix s, level_requests, level_tokens)
_EMPTY: Bucket = (0.0, 0.0, 0.0)


def drain(scope: RateScope, bucket: Bucket, now: float) -> Bucket:
    """The bucket as of ``now``: each level less what drained since ``at`` (never below 0)."""
    at, level_r, level_t = bucket
    elapsed = max(0.0, now - at)  # another process's clock may be a little ahead
    if scope.rpm is not None:
        level_r = max(0.0, level_r - elapsed * scope.rpm / WINDOW_S)
    if scope.tpm is not None:
        level_t = max(0.0, level_t - elapsed * scope.tpm / WINDOW_S)
    return (max(now, at), level_r, level_t)


def gcra_decide(
    scopes: tuple[RateScope, ...],
    buckets: Mapping[str, Bucket],
    tokens: int,
    now: float,
    requests: int = 1,
) -> tuple[RateDecision, dict[str, Bucket] | None]:
    """Decide ``requests`` requests costing ``tokens`` in all against every scope; return
    the decision and, when admitted, the buckets to store (None when refused: nothing
    changes, all or nothing)."""
    retry_after, limited_by = 0.0, None
    drained: dict[str, Bucket] = {}
    new: dict[str, Bucket] = {}
    for scope in scopes:
        at, level_r, level_t = drained[scope.scope_id] = drain(
            scope, buckets.get(scope.scope_id, _EMPTY), now
        )
        if scope.rpm is not None:
            level_r += requests
            wait = WINDOW_S if requests > scope.rpm else _wait(level_r, scope.rpm)
            if wait > retry_after:
                retry_after, limited_by = wait, "requests"
        if scope.tpm is not None and tokens > 0:
            level_t += tokens
            # A request bigger than the whole limit never fits: refuse, hint one window.
            wait = WINDOW_S if tokens > scope.tpm else _wait(level_t, scope.tpm)
            if wait > retry_after:
                retry_after, limited_by = wait, "tokens"
        new[scope.scope_id] = (at, level_r, level_t)
    if limited_by is not None:
        states = tuple(rate_state(s, *drained[s.scope_id][1:]) for s in scopes)
        return RateDecision(False, retry_after, limited_by, states), None
    states = tuple(rate_state(s, *new[s.scope_id][1:]) for s in scopes)
    return RateDecision(True, 0.0, None, states), new


def gcra_add_tokens(
    scopes: tuple[RateScope, ...], buckets: Mapping[str, Bucket], tokens: int, now: float
) -> dict[str, Bucket]:
    """Charge tokens learned after admission; may fill a bucket past its limit (a debt
    that later requests wait out)."""
    if tokens <= 0:
        return {}
    return gcra_adjust(tuple(s for s in scopes if s.tpm is not None), buckets, 0, tokens, now)


def gcra_adjust(
    scopes: tuple[RateScope, ...],
    buckets: Mapping[str, Bucket],
    requests: int,
    tokens: int,
    now: float,
) -> dict[str, Bucket]:
    """Add signed ``requests`` and ``tokens`` to each scope's drained levels, never below 0.

    Giving back capacity taken earlier (a lease's unused part) is conservative: the level
    then is at least what it would be had the capacity never been taken, because draining
    stops at 0 and the level with the capacity held drained no less. So it never lets
    more through than the limit."""
    new: dict[str, Bucket] = {}
    for scope in scopes:
        at, level_r, level_t = drain(scope, buckets.get(scope.scope_id, _EMPTY), now)
        if scope.rpm is not None:
            level_r = max(0.0, level_r + requests)
        if scope.tpm is not None:
            level_t = max(0.0, level_t + tokens)
        new[scope.scope_id] = (at, level_r, level_t)
    return new


def rate_state(scope: RateScope, level_r: float, level_t: float) -> RateState:
    """Remaining units and seconds until the bucket is empty again, per dimension."""
    rem_r, reset_r = _remaining(scope.rpm, level_r)
    rem_t, reset_t = _remaining(scope.tpm, level_t)
    return RateState(scope.scope_id, scope.rpm, rem_r, reset_r, scope.tpm, rem_t, reset_t)


def states_of(
    scopes: tuple[RateScope, ...], buckets: Mapping[str, Bucket]
) -> tuple[RateState, ...]:
    """Each scope's state from its bucket (absent: empty)."""
    return tuple(rate_state(s, *buckets.get(s.scope_id, _EMPTY)[1:]) for s in scopes)


def empty_at(scope: RateScope, bucket: Bucket) -> float:
    """When both levels will have drained to 0 (the state then equals no state at all)."""
    at, level_r, level_t = bucket
    wait_r = level_r * WINDOW_S / scope.rpm if scope.rpm else 0.0
    wait_t = level_t * WINDOW_S / scope.tpm if scope.tpm else 0.0
    return at + max(wait_r, wait_t)


def _wait(level: float, limit: int) -> float:
    """Seconds until a bucket at ``level`` drains to ``limit`` (0 when it already fits)."""
    over = level - limit
    return over * WINDOW_S / limit if over > _EPS else 0.0


def _remaining(limit: int | None, level: float) -> tuple[int | None, float]:
    if limit is None:
        return None, 0.0
    remaining = math.floor(limit - level + _EPS)
    return max(0, min(limit, remaining)), level * WINDOW_S / limit


class RateWindows:
    """The buckets of one process, in a dict. Only for a single worker: with several
    processes the windows must be shared (SQLite or Redis). Not thread-safe; called on
    the event loop, where check-and-set runs without an await in between."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[str, Bucket] = {}
        self._empty_at: dict[str, float] = {}
        self._calls = 0

    def acquire(
        self, scopes: tuple[RateScope, ...], tokens: int, requests: int = 1
    ) -> RateDecision:
        decision, new = self.decide(scopes, tokens, requests)
        if new is not None:
            self.commit(scopes, new)
        return decision

    def decide(
        self, scopes: tuple[RateScope, ...], tokens: int, requests: int = 1
    ) -> tuple[RateDecision, dict[str, Bucket] | None]:
        """The decision and the buckets to ``commit`` if admitted, changing nothing yet."""
        now = self._clock()
        self._maybe_sweep(now)
        return gcra_decide(scopes, self._buckets, tokens, now, requests)

    def commit(self, scopes: tuple[RateScope, ...], new: dict[str, Bucket]) -> None:
        self._store(scopes, new)

    def add_tokens(self, scopes: tuple[RateScope, ...], tokens: int) -> None:
        self._store(scopes, gcra_add_tokens(scopes, self._buckets, tokens, self._clock()))

    def adjust(
        self, scopes: tuple[RateScope, ...], requests: int, tokens: int
    ) -> tuple[RateState, ...]:
        new = gcra_adjust(scopes, self._buckets, requests, tokens, self._clock())
        self._store(scopes, new)
        return states_of(scopes, new)

    def _store(self, scopes: tuple[RateScope, ...], new: dict[str, Bucket]) -> None:
        for scope in scopes:
            bucket = new.get(scope.scope_id)
            if bucket is not None:
                self._buckets[scope.scope_id] = bucket
                self._empty_at[scope.scope_id] = empty_at(scope, bucket)

    def _maybe_sweep(self, now: float) -> None:
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            for scope_id in [k for k, t in self._empty_at.items() if t <= now]:
                del self._buckets[scope_id], self._empty_at[scope_id]
