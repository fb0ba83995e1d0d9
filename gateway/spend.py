"""The spend report: per team and key, spent, reserved, limit, remaining and period end."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from gateway.config import Config
from policies.budget import budget_scopes
from policies.store import Store
from pricing.cost import format_usd


async def spend_report(
    config: Config, store: Store, team: str | None = None
) -> list[dict[str, Any]]:
    now = time.time()
    wanted = []
    for name, tcfg in config.teams.items():
        if team is not None and name != team:
            continue
        keys = [k.name for k in tcfg.keys] or ["-"]
        for i, key in enumerate(keys):
            scopes = budget_scopes(name, key, tcfg.budget, tcfg.key_budget, now)
            for scope in scopes:
                is_team = scope.scope_id.startswith("team:")
                if is_team and i:
                    continue  # the team scope once per team
                budget = tcfg.budget if is_team else tcfg.key_budget
                wanted.append((name, None if is_team else key, scope, budget))
    rows = await store.spend(tuple(s.scope_id for _, _, s, _ in wanted))
    used = {(r.scope_id, r.period_key): r for r in rows}
    report = []
    for name, key, scope, budget in wanted:
        row = used.get((scope.scope_id, scope.period_key))
        spent = row.spent_nano if row else 0
        reserved = row.reserved_nano if row else 0
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
