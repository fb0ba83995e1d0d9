"""Admission and settlement: rate windows and budget reservations, applied through the store."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from gateway.errors import (
    BudgetExceeded,
    InvalidRequest,
    PriceUnknown,
    RateLimited,
    StoreUnavailable,
)
from gateway.iso_time import iso_utc
from gateway.pipeline.context import RequestContext
from gateway.pipeline.metering import estimate_usage, hides_reasoning
from gateway.pipeline.routing import Deployment
from policies.budget import budget_scopes, rate_scopes
from policies.stores.base import (
    MAX_AMOUNT_NANO,
    BudgetRejection,
    BudgetScope,
    RateDecision,
    RateScope,
    Reservation,
    SpendRow,
    StoreError,
)
from pricing.cost import cost_nano, format_usd, max_cost_nano
from pricing.table import Price, output_limit
from pricing.usage import DEFAULT_TOKEN_BOUND, at_least

if TYPE_CHECKING:
    from gateway.pipeline.apis import Api
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
    output_caps: dict[str, int]  # deployment label → output tokens reserved per choice
    choices: int  # completions the provider bills for: n x best_of x prompts
    settled: bool = False


async def guarded(gw: Gateway, ctx: RequestContext, call: Awaitable[T], fallback: T) -> T:
    """Run a store call; on an outage apply store.on_error (fail_closed → 503)."""
    try:
        return await call
    except StoreError as exc:
        ctx.record.count("store_error")
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


def requested_output_cap(body: dict[str, Any]) -> int | None:
    """The largest output cap the body names (a server may honour any of the fields)."""
    caps = [v for name in OUTPUT_CAP_FIELDS if _positive_int(v := body.get(name))]
    return max(caps) if caps else None


def choices(operation: str, body: dict[str, Any]) -> int:
    """How many completions the provider bills for: `n` (chat, completions) x `best_of`
    (completions generate best_of and return n) x the prompts of a batched completion.
    Embeddings: the number of inputs (it only bounds their usage report). A response (the
    Responses API has no `n`): one. `operation` is the API's name (gateway/pipeline/apis.py)."""
    if operation == "embeddings":
        return _items(body.get("input"))
    if operation == "responses":
        return 1
    n = _count_field(body, "n")
    if operation != "text_completion":
        return n
    return max(n, _count_field(body, "best_of")) * _items(body.get("prompt"))


def _count_field(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if value is None:
        return 1
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _positive_int(value):
        raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)
    return int(value)


def _items(value: object) -> int:
    """Prompts (or inputs) in a batch: a list of strings or of token lists; else one."""
    if isinstance(value, list) and value and not isinstance(value[0], int):
        return len(value)
    return 1


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def price_plan(gw: Gateway, plan: list[Deployment]) -> dict[str, Price | None]:
    prices: dict[str, Price | None] = {}
    for dep in plan:
        price = gw.prices.lookup(dep.model, gw.price_hosts.get(dep.provider))
        if price is None and gw.config.pricing.on_unknown_price == "reject":
            raise PriceUnknown(
                f"No price is known for model '{dep.model}' (deployment '{dep.label}'), and "
                "pricing.on_unknown_price is 'reject'. Add it under pricing.overrides.",
                param="model",
            )
        prices[dep.label] = price
    return prices


@dataclass(slots=True)
class _Plan:
    """The reservation for one request: the most it can cost on any deployment it may use."""

    amount: int
    caps: dict[str, int]
    send_caps: dict[str, tuple[str, int]]
    priciest: Price | None
    bound: int


def reservation_plan(
    gw: Gateway, ctx: RequestContext, plan: list[Deployment], prices: dict[str, Price | None],
    prompt_tokens: int, n: int, cap_field: str | None = None,
) -> _Plan:  # fmt: skip
    """Output cap per deployment = the smallest of the request's cap, the team's
    max_output_tokens and the model's limit (max output, else context window, else
    pricing.default_max_output_tokens); the amount is prompt + cap x choices at the
    deployment's price, the largest over the plan (a fallback may serve the request)."""
    assert ctx.body is not None and ctx.principal is not None
    team_cap = gw.config.teams[ctx.principal.team].max_output_tokens
    requested = None if ctx.operation == "embeddings" else requested_output_cap(ctx.body)
    default = gw.config.pricing.default_max_output_tokens
    out = _Plan(0, {}, {}, None, prompt_tokens)
    for dep in plan:
        price = prices[dep.label]
        window = price.context_window if price is not None else None
        out.bound = max(out.bound, (window or DEFAULT_TOKEN_BOUND) * n)
        if ctx.operation == "embeddings":
            out.caps[dep.label] = 0
        else:
            limit = output_limit(price, default)
            cap = min(c for c in (requested, team_cap, limit) if c is not None)
            out.caps[dep.label] = cap
            if team_cap is not None and cap == team_cap < limit:
                field = cap_field or upstream_cap_field(ctx.operation, ctx.body, dep.model)
                if ctx.body.get(field) != cap:
                    out.send_caps[dep.label] = (field, cap)
            elif requested is None and gw.providers[dep.provider].kind == "anthropic":
                # the Messages API requires max_tokens: send the cap reserved for
                out.send_caps[dep.label] = ("max_tokens", cap)
        if price is not None:
            amount = max_cost_nano(price, prompt_tokens, out.caps[dep.label] * n)
            if amount >= out.amount:
                out.amount, out.priciest = amount, price
    return out


def upstream_cap_field(operation: str, body: dict[str, Any], model: str) -> str:
    """The field a team's cap goes upstream in: the one the client used, else the one the
    model accepts (OpenAI's reasoning models refuse max_tokens)."""
    for name in OUTPUT_CAP_FIELDS:
        if name in body:
            return name
    if operation == "chat" and hides_reasoning(model):
        return "max_completion_tokens"
    return "max_tokens"


async def admit(gw: Gateway, ctx: RequestContext, plan: list[Deployment], api: Api) -> Admission:
    principal = ctx.principal
    assert principal is not None and ctx.body is not None  # earlier stages guarantee both
    team = gw.config.teams[principal.team]
    prices = price_plan(gw, plan)
    n = choices(api.name, ctx.body)
    count = await gw.counter.count_request(api.name, plan[0].model, ctx.body)

    rplan = reservation_plan(gw, ctx, plan, prices, count.tokens, n, api.cap_field)
    if rplan.amount > MAX_AMOUNT_NANO:
        raise InvalidRequest(
            f"This request could cost up to ${format_usd(rplan.amount)} ({n} completion(s) of up "
            f"to {max(rplan.caps.values())} tokens), more than the gateway's per-request ceiling "
            f"of ${format_usd(MAX_AMOUNT_NANO)}. Lower n or max_tokens.",
            param="n" if n > 1 else "max_tokens",
        )
    ctx.usage_bound = rplan.bound
    ctx.upstream_caps = rplan.send_caps

    # The rate windows and the reservation in one store call (all or nothing: a request
    # the budget refuses is not counted in the windows). The reservation gets an id of
    # our own: a client may repeat its x-request-id.
    rscopes = rate_scopes(principal.team, principal.key_name, team.rate_limit, team.key_rate_limit)
    now = time.time()
    bscopes = budget_scopes(principal.team, principal.key_name, team.budget, team.key_budget, now)
    call = gw.store.admit(gw.new_request_id(), bscopes, rplan.amount, rscopes, count.tokens)
    got = await guarded(gw, ctx, call, None)
    if got is None:  # fail_open: admitted without a rate check or a reservation
        return Admission(rscopes, bscopes, None, prices, count.tokens, rplan.caps, n)
    if rscopes:
        ctx.response_headers.update(ratelimit_headers(got.rate))
        if not got.rate.allowed:
            ctx.rejected = "rate_limit"
            ctx.record.count("rejection", kind="rate_limit")
            retry = max(1, math.ceil(got.rate.retry_after_s))
            window = got.rate.limited_by or "requests"
            raise RateLimited(
                f"Rate limit reached for team '{principal.team}' ({window} per minute). "
                f"Try again in {retry}s.",
                type=window,
                headers={"retry-after": str(retry)},
            )
    result = got.budget
    if isinstance(result, BudgetRejection):
        ctx.rejected = "budget"
        ctx.record.count("rejection", kind="budget")
        raise budget_exceeded(
            result, principal.team, rplan, count.tokens, n, now, api.cap_field or "max_tokens"
        )
    return Admission(rscopes, bscopes, result, prices, count.tokens, rplan.caps, n)


def budget_exceeded(
    rej: BudgetRejection, team: str, rplan: _Plan, prompt_tokens: int, n: int, now: float,
    cap_name: str = "max_tokens",
) -> BudgetExceeded:  # fmt: skip
    """A 429 the SDKs do not retry (x-should-retry: false): retrying cannot help before the
    period resets, which Retry-After says; the message says what would fit instead."""
    headers = {"x-should-retry": "false"}
    if rej.scope.period_end is not None:
        headers["retry-after"] = str(max(1, math.ceil(rej.scope.period_end - now)))
    hint = fit_hint(rej, rplan.priciest, prompt_tokens, n, cap_name)
    message = budget_message(rej, team) + hint
    return BudgetExceeded(message, headers=headers)


def fit_hint(
    rej: BudgetRejection, price: Price | None, prompt_tokens: int, n: int,
    cap_name: str = "max_tokens",
) -> str:  # fmt: skip
    """What would still fit in the remaining budget at the request's dearest price."""
    left = (rej.scope.limit_nano or 0) - rej.spent_nano - rej.reserved_nano
    if price is None or left <= 0:
        return ""
    prompt_cost = max_cost_nano(price, prompt_tokens, 0)
    per_output = max_cost_nano(price, 0, 1_000_000) * n  # nano-USD per Mtok of output
    if prompt_cost > left:
        return f" The prompt alone (~{prompt_tokens} tokens) costs more than the ${format_usd(left)} left."
    if per_output == 0:
        return ""
    fits = (left - prompt_cost) * 1_000_000 // per_output
    if fits < 1:
        return f" Only ${format_usd(left)} is left: not enough for one output token."
    return f" With ${format_usd(left)} left, the same request with {cap_name} <= {fits} would fit."


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
        period = f"the {scope.period_key} period ends {iso_utc(scope.period_end)}"
    return (
        f"Budget exceeded for {who}: limit ${limit}, spent ${spent}, reserved ${reserved} "
        f"by requests in flight, this request may cost up to ${needed}; {period}."
    )


def charge(gw: Gateway, ctx: RequestContext, admission: Admission, deployment: str) -> int | None:
    """The cost of the request on `deployment` (None: its price is unknown): the usage the
    upstream reported, or our count when it reported none. A report with anomalies is
    not trusted to be low: it is raised to our own count. Sets ctx.usage and ctx.cost_nano;
    the same answer however often it is asked (a stream's usage chunk, then settlement)."""
    model = next((a.upstream_model for a in ctx.attempts if a.deployment == deployment), "")
    cap = admission.output_caps.get(deployment, 0) * admission.choices
    if ctx.usage is None or (ctx.usage.estimated and not ctx.usage_anomalies):
        ctx.usage = estimate_usage(gw, ctx, model, admission.prompt_tokens, cap)
    elif ctx.usage_anomalies:
        ctx.usage = at_least(ctx.usage, estimate_usage(gw, ctx, model, admission.prompt_tokens, 0))
    price = admission.prices.get(deployment)
    if price is None:
        return None
    ctx.cost_nano = min(cost_nano(price, ctx.usage), MAX_AMOUNT_NANO)
    ctx.pricing_version = gw.prices.version
    return ctx.cost_nano


async def settle(
    gw: Gateway, ctx: RequestContext, admission: Admission, deployment: str | None
) -> None:
    """Replace the reservation with the actual cost (0 when nothing was produced)."""
    if admission.settled:
        return
    admission.settled = True
    cost = 0
    if deployment is not None:
        cost = charge(gw, ctx, admission, deployment) or 0
        if ctx.usage_anomalies:
            report_anomalies(gw, ctx, deployment)
    usage = ctx.usage
    rows = None
    try:
        if admission.reservation is not None:
            rows = await gw.store.settle(admission.reservation, cost)
        if admission.rate and usage is not None and usage.output_tokens:
            await gw.store.rate_add_tokens(admission.rate, usage.output_tokens)
    except StoreError as exc:
        # The spend could not be written: say so loudly; never lose it silently.
        ctx.record.count("store_error")
        log.error(
            "could not settle request %s (cost %s nano-USD) in the store: %s",
            ctx.request_id,
            cost,
            exc,
        )
    if rows is not None:  # the balances settle returned: no second store call
        ctx.budget_remaining_nano = await remaining_nano(gw, ctx, admission.budget, rows)


def report_anomalies(gw: Gateway, ctx: RequestContext, deployment: str) -> None:
    """A usage report that was clamped: counted, logged (one line, redacted), and on the span
    (tallygate.usage.anomalies)."""
    ctx.record.count("usage_clamped", deployment=deployment)
    what = gw.redactor.redact("; ".join(ctx.usage_anomalies))[0]
    log.warning(
        "usage reported by %s for request %s was clamped (%s); charged %s nano-USD",
        deployment, ctx.request_id, what[:500], ctx.cost_nano,
    )  # fmt: skip


async def remaining_nano(
    gw: Gateway,
    ctx: RequestContext,
    scopes: tuple[BudgetScope, ...],
    rows: list[SpendRow],
) -> int | None:
    """The tightest limited scope's limit minus its spend and reservations, from the
    balances settle returned; the same rows tell the budget alerts which thresholds were
    reached. None when no scope is limited."""
    limited = [(s, r) for s, r in zip(scopes, rows, strict=True) if s.limit_nano is not None]
    if not limited:
        return None
    await gw.alerts.observe(gw.config, ctx, [s for s, _ in limited], [r for _, r in limited])
    return min((s.limit_nano or 0) - r.spent_nano - r.reserved_nano for s, r in limited)


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
