"""The spend report: per team and key, spent, reserved, limit, remaining and period end."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from gateway.config import Config
from policies.budget import budget_scopes
from policies.config import BudgetConfig
from policies.store import BudgetScope, Store, balances_by_group
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
        for key in keys:
            key_scope = budget_scopes(name, key, None, tcfg.key_budget, now)[1]
            wanted.append((name, key, key_scope, tcfg.key_budget))
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
            }
        )
    return report


def iso(ts: float | None) -> str | None:
    return (
        datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts is not None else None
    )
