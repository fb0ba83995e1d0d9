"""The spend report: per team and key, spent, reserved, limit, remaining and period end;
for a budget with a calendar period, the burn rate and when, at that rate, it runs out."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from gateway.config import Config
from gateway.iso_time import iso_utc
from policies.budget import budget_scopes
from policies.config import BudgetConfig
from policies.stores.base import BudgetScope, Store, balances_by_group
from pricing.cost import format_usd


async def spend_report(
    config: Config, store: Store, team: str | None = None
) -> list[dict[str, Any]]:
    now = time.time()
    wanted: list[tuple[str, str | None, BudgetScope, BudgetConfig | None]] = []
    for name, tcfg in config.teams.items():
        if team is not None and name != team:
            continue
        keys = [k.name for k in tcfg.keys]
        team_scope = budget_scopes(name, "", tcfg.budget, None, now)[0]
        wanted.append((name, None, team_scope, tcfg.budget))
        for key_name in keys:
            key_scope = budget_scopes(name, key_name, None, tcfg.key_budget, now)[1]
            wanted.append((name, key_name, key_scope, tcfg.key_budget))
    # balances: exactly these scopes in their current periods, in order (no scan); one
    # call per team, since one call's scopes share a group (one Redis hash tag)
    rows = await balances_by_group(store, tuple(scope for _, _, scope, _ in wanted))
    report = []
    for (name, key, scope, budget), row in zip(wanted, rows, strict=True):
        spent, reserved = row.spent_nano, row.reserved_nano
        limit = scope.limit_nano
        report.append(
            {
                "team": name,
                "key": key,
                "scope": scope.scope_id,
                "period": budget.period if budget else "total",
                "period_key": scope.period_key,
                "period_end": iso(scope.period_end),
                "limit_usd": format_usd(limit) if limit is not None else None,
                "spent_usd": format_usd(spent),
                "reserved_usd": format_usd(reserved),
                "remaining_usd": format_usd(max(0, limit - spent - reserved))
                if limit is not None
                else None,
                **forecast(scope, budget, spent, reserved, now),
            }
        )
    return report


MIN_ELAPSED_S = 60.0  # a period's first minute: the rate of one request is no forecast


def forecast(
    scope: BudgetScope, budget: BudgetConfig | None, spent: int, reserved: int, now: float
) -> dict[str, Any]:
    """The burn rate (spent / time since the period began, USD per hour) and when the
    remaining budget runs out at that rate. ``forecast`` says which case it is:
    ``runs_out`` (exhausted_at is set), ``exhausted`` (nothing left: exhausted_at is now),
    ``outlasts_period`` (it would run out after the period ends), ``no_spend``; None
    (and the rate None) for a total budget or no budget: no period to measure a rate in."""
    start = period_start(budget, scope)
    if scope.limit_nano is None or start is None or scope.period_end is None:
        return {"burn_usd_per_hour": None, "exhausted_at": None, "forecast": None}
    per_hour = int(spent * 3600 // max(now - start, MIN_ELAPSED_S))
    remaining = scope.limit_nano - spent - reserved
    at: float | None = None
    if remaining <= 0:
        case, at = "exhausted", now
    elif per_hour <= 0:
        case = "no_spend"
    elif (runs_out := now + remaining / per_hour * 3600) <= scope.period_end:
        case, at = "runs_out", runs_out
    else:
        case = "outlasts_period"
    return {"burn_usd_per_hour": format_usd(per_hour), "exhausted_at": iso(at), "forecast": case}


def period_start(budget: BudgetConfig | None, scope: BudgetScope) -> float | None:
    """When the scope's current calendar period began (None for total)."""
    end = scope.period_end
    if budget is None or end is None:
        return None
    if budget.period == "daily":
        return end - 86400
    if budget.period == "weekly":
        return end - 7 * 86400
    first = datetime.fromtimestamp(end, UTC)  # monthly: the 1st of the next month
    year, month = (first.year - 1, 12) if first.month == 1 else (first.year, first.month - 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp()


def iso(ts: float | None) -> str | None:
    """A unix time as ISO-8601 UTC to the second (gateway.iso_time), None as None."""
    return iso_utc(ts) if ts is not None else None
