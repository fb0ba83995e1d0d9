"""Config models of the policies: budgets, rate limits, the store. Strict: unknown keys are errors."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Period = Literal["daily", "weekly", "monthly", "total"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetConfig(Strict):
    # At most $1B: the limit in nano-USD then stays below the ledger's saturation bound
    # (policies.store.MAX_LEDGER_NANO, ~$4.6B), so a saturated ledger still refuses.
    limit_usd: Decimal = Field(ge=0, le=10**9)
    period: Period = "monthly"


class RateLimitConfig(Strict):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class StoreConfig(Strict):
    backend: Literal["local", "redis"] = "local"
    path: str = "./tallygate.db"
    redis_url: str = "redis://localhost:6379/0"
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    # A reservation whose request died with its process is released after this long.
    reservation_ttl_s: float = Field(default=900, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)  # per store call (Redis socket timeouts)
