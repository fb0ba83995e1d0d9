"""Budget periods (UTC calendar) and the budget and rate scopes a request is charged to."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from policies.config import BudgetConfig, Period, RateLimitConfig
from policies.stores.base import BudgetScope, RateScope
from pricing.cost import NANO_PER_USD


def current_period(period: Period, now: float) -> tuple[str, float | None]:
    """The period ``now`` (unix seconds) falls in: (period_key, unix time the period ends).

    daily "2026-11-26" ends at the next midnight UTC; weekly "2026-W48" (ISO week, its
    year is the ISO year) ends on the next Monday 00:00 UTC; monthly "2026-11" ends on the
    1st of the next month; total is ("total", None). A new period starts by itself: the
    key changes, so nothing has to run at the boundary.
    """
    if period == "total":
        return "total", None
    day = datetime.fromtimestamp(now, UTC).date()
    if period == "daily":
        return day.isoformat(), _midnight(day + timedelta(days=1))
    if period == "weekly":
        iso_year, week, weekday = day.isocalendar()
        return f"{iso_year}-W{week:02d}", _midnight(day + timedelta(days=8 - weekday))
    if period == "monthly":
        following = (
            date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)
        )
        return f"{day.year:04d}-{day.month:02d}", _midnight(following)
    raise ValueError(f"unknown budget period {period!r}")


def limit_nano(budget: BudgetConfig) -> int:
    """The budget's limit in nano-USD, exact (Decimal arithmetic, truncated to whole nano-USD)."""
    return int(budget.limit_usd * NANO_PER_USD)


def team_scope_id(team: str) -> str:
    return f"team:{team}"


def key_scope_id(team: str, key_name: str) -> str:
    return f"key:{team}/{key_name}"


def budget_scopes(
    team: str,
    key_name: str,
    team_budget: BudgetConfig | None,
    key_budget: BudgetConfig | None,
    now: float,
) -> tuple[BudgetScope, ...]:
    """The team scope then the key scope of one request. Both always exist so spend is
    recorded even without a budget (limit None, period "total")."""
    return (
        _budget_scope(team_scope_id(team), team, team_budget, now),
        _budget_scope(key_scope_id(team, key_name), team, key_budget, now),
    )


def rate_scopes(
    team: str,
    key_name: str,
    team_rl: RateLimitConfig | None,
    key_rl: RateLimitConfig | None,
) -> tuple[RateScope, ...]:
    """The team and key rate scopes that have an RPM or TPM limit (possibly none)."""
    scopes = []
    for scope_id, rl in ((team_scope_id(team), team_rl), (key_scope_id(team, key_name), key_rl)):
        if rl is not None and (rl.rpm is not None or rl.tpm is not None):
            scopes.append(RateScope(scope_id=scope_id, group=team, rpm=rl.rpm, tpm=rl.tpm))
    return tuple(scopes)


def _budget_scope(scope_id: str, team: str, budget: BudgetConfig | None, now: float) -> BudgetScope:
    if budget is None:
        return BudgetScope(scope_id, team, "total", None, None)
    period_key, period_end = current_period(budget.period, now)
    return BudgetScope(scope_id, team, period_key, period_end, limit_nano(budget))


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
