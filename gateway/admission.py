"""Admission and settlement: rate windows and budget reservations, applied through the store."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

from gateway.context import RequestContext
from gateway.errors import BudgetExceeded, PriceUnknown, RateLimited, StoreUnavailable
from gateway.routing import Deployment
from policies.budget import budget_scopes, rate_scopes
from policies.store import (
    BudgetRejection,
    BudgetScope,
    RateDecision,
    RateScope,
    Reservation,
    StoreError,
)
from pricing.cost import cost_nano, format_usd, max_cost_nano, output_cap
from pricing.table import Price

if TYPE_CHECKING:
    from gateway.state import Gateway

log = logging.getLogger("tallygate.admission")
T = TypeVar("T")

OUTPUT_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


@dataclass(slots=True)
class Admission:
    """What admission took, so settlement can give back what was not used."""

    rate: tuple[RateScope, ...]
    budget: tuple[BudgetScope, ...]
    reservation: Reservation | None
    prices: dict[str, Price | None]  # deployment label → its price (None: unknown, allowed)
    prompt_tokens: int
    prompt_estimated: bool
    settled: bool = False


async def guarded(gw: Gateway, ctx: RequestContext, call: Awaitable[T], fallback: T) -> T:
    """Run a store call; on an outage apply store.on_error (fail_closed → 503)."""
    try:
        return await call
    except StoreError as exc:
        gw.telemetry.count("store_error", ctx)
        log_outage(gw, exc)
        if gw.config.store.on_error == "fail_open":
            return fallback
        raise StoreUnavailable(
            "The gateway's budget store is unavailable, so the request was refused "
            "(store.on_error: fail_closed). Try again shortly."
        ) from None


OUTAGE_LOG_EVERY_S = 10.0


def log_outage(gw: Gateway, exc: StoreError) -> None:
    """One line per OUTAGE_LOG_EVERY_S during an outage, not one per request (every failure
    is still counted in tallygate.store.errors)."""
    now = time.monotonic()
    if now - gw.outage_logged_at < OUTAGE_LOG_EVERY_S:
        gw.outages_unlogged += 1
        return
    more = (
        f" ({gw.outages_unlogged} more failures since the last line)" if gw.outages_unlogged else ""
    )
    log.error("store unavailable (%s): %s%s", gw.config.store.on_error, exc, more)
    gw.outage_logged_at, gw.outages_unlogged = now, 0


def requested_output_cap(body: dict) -> int | None:
    for name in OUTPUT_CAP_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def price_plan(gw: Gateway, plan: list[Deployment]) -> dict[str, Price | None]:
    prices: dict[str, Price | None] = {}
    for dep in plan:
        price = gw.prices.lookup(dep.model)
        if price is None and gw.config.pricing.on_unknown_price == "reject":
            raise PriceUnknown(
                f"No price is known for model '{dep.model}' (deployment '{dep.label}'), and "
                "pricing.on_unknown_price is 'reject'. Add it under pricing.overrides.",
                param="model",
            )
        prices[dep.label] = price
    return prices


async def admit(gw: Gateway, ctx: RequestContext, plan: list[Deployment]) -> Admission:
    principal = ctx.principal
    assert principal is not None and ctx.body is not None  # earlier stages guarantee both
    team = gw.config.teams[principal.team]
    prices = price_plan(gw, plan)
    count = await gw.counter.count_request(ctx.operation, plan[0].model, ctx.body)

    rscopes = rate_scopes(principal.team, principal.key_name, team.rate_limit, team.key_rate_limit)
    if rscopes:
        decision = await guarded(
            gw, ctx, gw.store.rate_acquire(rscopes, count.tokens), RateDecision(True, 0.0, None)
        )
        ctx.response_headers.update(ratelimit_headers(decision))
        if not decision.allowed:
            ctx.rejected = "rate_limit"
            gw.telemetry.count("rejection", ctx, kind="rate_limit")
            retry = max(1, math.ceil(decision.retry_after_s))
            window = decision.limited_by or "requests"
            raise RateLimited(
                f"Rate limit reached for team '{principal.team}' ({window} per minute). "
                f"Try again in {retry}s.",
                type=window,
                headers={"retry-after": str(retry)},
            )

    cap = 0 if ctx.operation == "embeddings" else requested_output_cap(ctx.body)
    amount = 0
    for dep in plan:
        price = prices[dep.label]
        if price is not None:
            out = 0 if cap == 0 else output_cap(price, cap)
            amount = max(amount, max_cost_nano(price, count.tokens, out))

    # The reservation gets an id of our own: a client may repeat its x-request-id.
    bscopes = budget_scopes(
        principal.team, principal.key_name, team.budget, team.key_budget, time.time()
    )
    result = await guarded(gw, ctx, gw.store.reserve(gw.new_request_id(), bscopes, amount), None)
    if isinstance(result, BudgetRejection):
        ctx.rejected = "budget"
        gw.telemetry.count("rejection", ctx, kind="budget")
        raise BudgetExceeded(budget_message(result, principal.team))
    return Admission(rscopes, bscopes, result, prices, count.tokens, count.estimated)


def budget_message(rej: BudgetRejection, team: str) -> str:
    scope = rej.scope
    who = f"team '{team}'"
    if scope.scope_id.startswith("key:"):
        who = f"key '{scope.scope_id.split('/', 1)[-1]}' of team '{team}'"
    limit = format_usd(scope.limit_nano or 0)
    spent = format_usd(rej.spent_nano)
    reserved = format_usd(rej.reserved_nano)
    needed = format_usd(rej.requested_nano)
    if scope.period_end is None:
        period = "the total budget has no period end"
    else:
        end = datetime.fromtimestamp(scope.period_end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        period = f"the {scope.period_key} period ends {end}"
    return (
        f"Budget exceeded for {who}: limit ${limit}, spent ${spent}, reserved ${reserved} "
        f"by requests in flight, this request may cost up to ${needed}; {period}."
    )


async def settle(
    gw: Gateway, ctx: RequestContext, admission: Admission, deployment: str | None
) -> None:
    """Replace the reservation with the actual cost (0 when nothing was produced)."""
    if admission.settled:
        return
    admission.settled = True
    usage = ctx.usage
    cost = 0
    if usage is not None and deployment is not None:
        price = admission.prices.get(deployment)
        if price is not None:
            cost = cost_nano(price, usage)
            ctx.cost_nano = cost
            ctx.pricing_version = gw.prices.version
    try:
        if admission.reservation is not None:
            await gw.store.settle(admission.reservation, cost)
        if admission.rate and usage is not None and usage.output_tokens:
            await gw.store.rate_add_tokens(admission.rate, usage.output_tokens)
    except StoreError as exc:
        # The spend could not be written: say so loudly; never lose it silently.
        gw.telemetry.count("store_error", ctx)
        log.error(
            "could not settle request %s (cost %s nano-USD) in the store: %s",
            ctx.request_id,
            cost,
            exc,
        )
    limited = [s for s in admission.budget if s.limit_nano is not None]
    if limited and admission.reservation is not None:
        ctx.budget_remaining_nano = await remaining_nano(gw, limited)


async def remaining_nano(gw: Gateway, scopes: list[BudgetScope]) -> int | None:
    """The tightest limited scope's limit minus its spend and reservations, after settling."""
    try:
        rows = await gw.store.balances(tuple(scopes))
    except StoreError:
        return None
    return min(
        (s.limit_nano or 0) - r.spent_nano - r.reserved_nano
        for s, r in zip(scopes, rows, strict=True)
    )


def ratelimit_headers(decision: RateDecision) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers from the tightest window among the scopes."""
    headers: dict[str, str] = {}
    req = [s for s in decision.states if s.limit_requests is not None]
    if req:
        s = min(req, key=lambda s: s.remaining_requests or 0)
        headers["x-ratelimit-limit-requests"] = str(s.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(max(0, s.remaining_requests or 0))
        headers["x-ratelimit-reset-requests"] = fmt_duration(s.reset_requests_s)
    tok = [s for s in decision.states if s.limit_tokens is not None]
    if tok:
        s = min(tok, key=lambda s: s.remaining_tokens or 0)
        headers["x-ratelimit-limit-tokens"] = str(s.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, s.remaining_tokens or 0))
        headers["x-ratelimit-reset-tokens"] = fmt_duration(s.reset_tokens_s)
    return headers


def fmt_duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
