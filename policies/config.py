"""Config models of the policies: budgets, rate limits, the store. Strict: unknown keys are errors."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal, Self
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, model_validator

Period = Literal["daily", "weekly", "monthly", "total"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetConfig(Strict):
    # At most $1B: the limit in nano-USD then stays below the ledger's saturation bound
    # (policies.stores.base.MAX_LEDGER_NANO, ~$4.6B), so a saturated ledger still refuses.
    limit_usd: Decimal = Field(ge=0, le=10**9)
    period: Period = "monthly"


class RateLimitConfig(Strict):
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)


class StoreConfig(Strict):
    # redis_cluster: redis_url names any node of a Redis Cluster (its database 0)
    backend: Literal["local", "redis", "redis_cluster"] = "local"
    path: str = "./tallygate.db"
    redis_url: str = "redis://localhost:6379/0"
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    # A reservation whose request died with its process is released after this long.
    reservation_ttl_s: float = Field(default=900, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)  # per store call (Redis socket timeouts)

    @model_validator(mode="after")
    def _cluster_has_one_database(self) -> Self:
        # said at config load, rather than by the cluster client when the gateway starts
        if self.backend == "redis_cluster" and urlparse(self.redis_url).path not in ("", "/", "/0"):
            raise ValueError("store.redis_url: a Redis Cluster has only database 0")
        return self
