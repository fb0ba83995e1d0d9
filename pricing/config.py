"""PricingConfig: the `pricing:` section of config.yaml (unknown-price policy, overrides)."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PriceOverride(BaseModel):
    """One model's price, in USD per million tokens, replacing or extending the table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0)
    cache_write_per_mtok: Decimal | None = Field(default=None, ge=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    context_window: int | None = Field(default=None, gt=0)


class PricingConfig(BaseModel):
    """`pricing:` in config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    on_unknown_price: Literal["reject", "allow"] = "reject"
    overrides: dict[str, PriceOverride] = Field(default_factory=dict)
    # output cap for a model whose max output and context window are both unknown
    default_max_output_tokens: int = Field(default=32768, gt=0)
