"""Rate windows: GCRA over 60 s for RPM and TPM, as pure math and as an in-process table.

GCRA (generic cell rate algorithm) keeps one number per scope and dimension, the
theoretical arrival time ``tat``: the moment the scope's bucket would be full again.
A limit of L per 60 s emits one unit every ``T = 60 / L`` seconds and tolerates a burst
of a whole window. A request costing ``c`` units (1 for requests, its tokens for tokens)
is admitted when ``max(tat, now) + c*T - now <= 60``; admitting sets ``tat`` to that
sum. This is a token bucket of size L refilled continuously (L per minute): no window
boundary lets 2L through, retry-after is exact (``new_tat - now - 60``), and the
remaining count is ``(60 - (tat - now)) / T``. ``policies/store_redis.py`` runs the same
arithmetic in Lua (in milliseconds); ``policies/store_local.py`` runs it here, on rows
from SQLite when several processes share the windows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from policies.store import RateDecision, RateScope, RateState

WINDOW_S = 60.0
_EPS = 1e-6  # float slack so exactly L units fit in a window (7 * (60/7) may exceed 60)
_SWEEP_EVERY = 4096  # in-process table: forget idle scopes every this many calls

Tats = tuple[float, float]  # (requests tat, tokens tat), unix seconds; 0 when idle


def gcra_decide(
    scopes: tuple[RateScope, ...], tats: Mapping[str, Tats], tokens: int, now: float
) -> tuple[RateDecision, dict[str, Tats] | None]:
    """Decide one request against every scope; return the decision and, when admitted,
    the new tats to store (None when refused: nothing changes, all or nothing)."""
    retry_after, limited_by = 0.0, None
    new: dict[str, Tats] = {}
    for scope in scopes:
        tat_r, tat_t = (max(t, now) for t in tats.get(scope.scope_id, (0.0, 0.0)))
        if scope.rpm is not None:
            tat_r += WINDOW_S / scope.rpm
            over = tat_r - now - WINDOW_S
            if over > _EPS and over > retry_after:
                retry_after, limited_by = over, "requests"
        if scope.tpm is not None and tokens > 0:
            cost = tokens * WINDOW_S / scope.tpm
            tat_t += cost
            # A request bigger than the whole limit never fits: refuse, hint one window.
            over = WINDOW_S if cost > WINDOW_S + _EPS else tat_t - now - WINDOW_S
            if over > _EPS and over > retry_after:
                retry_after, limited_by = over, "tokens"
        new[scope.scope_id] = (tat_r, tat_t)
    if limited_by is not None:
        states = tuple(rate_state(s, tats.get(s.scope_id, (0.0, 0.0)), now) for s in scopes)
        return RateDecision(False, retry_after, limited_by, states), None
    states = tuple(rate_state(s, new[s.scope_id], now) for s in scopes)
    return RateDecision(True, 0.0, None, states), new


def gcra_add_tokens(
    scopes: tuple[RateScope, ...], tats: Mapping[str, Tats], tokens: int, now: float
) -> dict[str, Tats]:
    """Charge tokens learned after admission; may push a scope past its limit (a debt)."""
    new: dict[str, Tats] = {}
    for scope in scopes:
        if scope.tpm is None or tokens <= 0:
            continue
        tat_r, tat_t = tats.get(scope.scope_id, (0.0, 0.0))
        new[scope.scope_id] = (tat_r, max(tat_t, now) + tokens * WINDOW_S / scope.tpm)
    return new


def rate_state(scope: RateScope, tats: Tats, now: float) -> RateState:
    """Remaining units and seconds until the bucket is full again, per dimension."""
    rem_r, reset_r = _remaining(scope.rpm, tats[0], now)
    rem_t, reset_t = _remaining(scope.tpm, tats[1], now)
    return RateState(scope.scope_id, scope.rpm, rem_r, reset_r, scope.tpm, rem_t, reset_t)


def _remaining(limit: int | None, tat: float, now: float) -> tuple[int | None, float]:
    if limit is None:
        return None, 0.0
    used = max(0.0, tat - now)
    remaining = math.floor((WINDOW_S - used) * limit / WINDOW_S + _EPS)
    return max(0, min(limit, remaining)), used


class RateWindows:
    """GCRA tats of one process, in a dict. Only for a single worker: with several
    processes the windows must be shared (SQLite or Redis). Not thread-safe; called on
    the event loop, where check-and-set runs without an await in between."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tats: dict[str, Tats] = {}
        self._calls = 0

    def acquire(self, scopes: tuple[RateScope, ...], tokens: int) -> RateDecision:
        now = self._clock()
        self._maybe_sweep(now)
        decision, new = gcra_decide(scopes, self._tats, tokens, now)
        if new is not None:
            self._tats.update(new)
        return decision

    def add_tokens(self, scopes: tuple[RateScope, ...], tokens: int) -> None:
        self._tats.update(gcra_add_tokens(scopes, self._tats, tokens, self._clock()))

    def _maybe_sweep(self, now: float) -> None:
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            idle = [k for k, (r, t) in self._tats.items() if r <= now and t <= now]
            for k in idle:
                del self._tats[k]
