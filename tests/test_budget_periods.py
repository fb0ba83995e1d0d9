"""Budget periods at their boundaries (UTC), limits in nano-USD, and the scopes of a request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from policies.budget import budget_scopes, current_period, limit_nano, rate_scopes
from policies.config import BudgetConfig, Period, RateLimitConfig
from policies.stores.base import BudgetScope, RateScope


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[arg-type, misc]


LAST_SECOND = 1 - 1e-6  # a microsecond before the boundary

CASES: list[tuple[Period, float, str, float | None]] = [
    # daily
    ("daily", ts(2026, 11, 26, 12, 0), "2026-11-26", ts(2026, 11, 27)),
    ("daily", ts(2026, 11, 26), "2026-11-26", ts(2026, 11, 27)),  # midnight starts the day
    ("daily", ts(2026, 11, 26) - LAST_SECOND, "2026-11-25", ts(2026, 11, 26)),
    ("daily", ts(2026, 12, 31, 23, 59, 59), "2026-12-31", ts(2027, 1, 1)),
    ("daily", ts(2027, 1, 1), "2027-01-01", ts(2027, 1, 2)),
    ("daily", ts(2028, 2, 28, 23, 59, 59), "2028-02-28", ts(2028, 2, 29)),
    ("daily", ts(2028, 2, 29, 6), "2028-02-29", ts(2028, 3, 1)),  # leap day
    ("daily", ts(2027, 2, 28, 6), "2027-02-28", ts(2027, 3, 1)),
    # monthly
    ("monthly", ts(2026, 11, 26, 12), "2026-11", ts(2026, 12, 1)),
    ("monthly", ts(2026, 12, 1) - LAST_SECOND, "2026-11", ts(2026, 12, 1)),  # last second
    ("monthly", ts(2026, 11, 30, 23, 59, 59), "2026-11", ts(2026, 12, 1)),
    ("monthly", ts(2026, 12, 1), "2026-12", ts(2027, 1, 1)),
    ("monthly", ts(2026, 12, 31, 23, 59, 59), "2026-12", ts(2027, 1, 1)),  # year end
    ("monthly", ts(2027, 1, 1), "2027-01", ts(2027, 2, 1)),
    ("monthly", ts(2028, 2, 29, 23, 59, 59), "2028-02", ts(2028, 3, 1)),  # leap February
    ("monthly", ts(2027, 2, 28, 23, 59, 59), "2027-02", ts(2027, 3, 1)),
    # weekly (ISO 8601: weeks start on Monday; week 1 holds the year's first Thursday)
    ("weekly", ts(2026, 11, 26, 12), "2026-W48", ts(2026, 11, 30)),  # a Thursday
    ("weekly", ts(2026, 11, 30) - LAST_SECOND, "2026-W48", ts(2026, 11, 30)),  # Sunday night
    ("weekly", ts(2026, 11, 30), "2026-W49", ts(2026, 12, 7)),  # Monday 00:00
    ("weekly", ts(2026, 12, 31, 23, 59, 59), "2026-W53", ts(2027, 1, 4)),  # 2026 has 53 weeks
    ("weekly", ts(2027, 1, 3, 23, 59, 59), "2026-W53", ts(2027, 1, 4)),  # 2027's first days
    ("weekly", ts(2027, 1, 4), "2027-W01", ts(2027, 1, 11)),
    ("weekly", ts(2024, 12, 30), "2025-W01", ts(2025, 1, 6)),  # ISO year ahead of the calendar
    ("weekly", ts(2021, 1, 3, 12), "2020-W53", ts(2021, 1, 4)),
    ("weekly", ts(2028, 2, 29), "2028-W09", ts(2028, 3, 6)),  # leap day is a Tuesday
    # total
    ("total", ts(2026, 11, 26), "total", None),
]


@pytest.mark.parametrize(("period", "now", "key", "end"), CASES)
def test_current_period(period: Period, now: float, key: str, end: float | None) -> None:
    assert current_period(period, now) == (key, end)


@pytest.fixture
def far_timezone(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: a different local date
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_periods_ignore_the_local_timezone(far_timezone: None) -> None:
    assert current_period("daily", ts(2026, 11, 26, 12)) == ("2026-11-26", ts(2026, 11, 27))
    assert current_period("monthly", ts(2026, 11, 30, 23)) == ("2026-11", ts(2026, 12, 1))


@pytest.mark.parametrize(
    ("usd", "nano"),
    [
        ("500", 500 * 10**9),
        ("0", 0),
        ("0.000000001", 1),
        ("0.0000000019", 1),  # below a nano-USD is truncated, never rounded up
        ("12.345678901", 12_345_678_901),
        ("99999999.99", 99_999_999_990_000_000),
    ],
)
def test_limit_nano_is_exact(usd: str, nano: int) -> None:
    assert limit_nano(BudgetConfig(limit_usd=Decimal(usd))) == nano


def test_budget_scopes() -> None:
    now = ts(2026, 11, 26, 12)
    team = BudgetConfig(limit_usd=Decimal("500"), period="monthly")
    key = BudgetConfig(limit_usd=Decimal("50"), period="daily")
    assert budget_scopes("search", "search-prod", team, key, now) == (
        BudgetScope("team:search", "search", "2026-11", ts(2026, 12, 1), 500 * 10**9),
        BudgetScope("key:search/search-prod", "search", "2026-11-26", ts(2026, 11, 27), 50 * 10**9),
    )
    # without budgets both scopes still exist, to record spend
    assert budget_scopes("search", "ci", None, None, now) == (
        BudgetScope("team:search", "search", "total", None, None),
        BudgetScope("key:search/ci", "search", "total", None, None),
    )
    weekly_key = BudgetConfig(limit_usd=Decimal("1.5"), period="weekly")
    assert budget_scopes("ads", "web", None, weekly_key, now)[1] == BudgetScope(
        "key:ads/web", "ads", "2026-W48", ts(2026, 11, 30), 1_500_000_000
    )


def test_rate_scopes() -> None:
    team = RateLimitConfig(rpm=600, tpm=400_000)
    key = RateLimitConfig(tpm=1000)
    assert rate_scopes("search", "prod", team, key) == (
        RateScope("team:search", "search", 600, 400_000),
        RateScope("key:search/prod", "search", None, 1000),
    )
    assert rate_scopes("search", "prod", None, key) == (
        RateScope("key:search/prod", "search", None, 1000),
    )
    assert rate_scopes("search", "prod", RateLimitConfig(), None) == ()
    assert rate_scopes("search", "prod", None, None) == ()
