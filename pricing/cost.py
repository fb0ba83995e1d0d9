"""Cost arithmetic: usage x price in integer nano-USD (1 USD = 10**9 nano), and USD formatting."""

from __future__ import annotations

import functools
from decimal import ROUND_HALF_UP, Decimal, localcontext

from .table import Price
from .usage import Usage

NANO_PER_USD = 10**9
_NANO_PER_TOKEN_PER_MTOK = 1000  # (per_mtok USD / 10**6 tokens) x 10**9 nano/USD
_PRECISION = 60  # digits; far beyond any token count x price, so products are exact


def cost_nano(price: Price, usage: Usage) -> int:
    """What `usage` costs at `price`, rounded half-up once, after summing exact terms.

    Input is split into buckets: uncached input at the input price, cache reads at the
    cached-input price, cache writes at the cache-write price (each falling back to the
    input price when the table has none). Output, reasoning included, at the output price.
    """
    cache_read = max(usage.cache_read_input_tokens, 0)
    cache_write = max(usage.cache_creation_input_tokens, 0)
    uncached = max(usage.input_tokens - cache_read - cache_write, 0)
    return _round(
        (uncached, price.input_per_mtok),
        (cache_read, _or(price.cached_input_per_mtok, price.input_per_mtok)),
        (cache_write, _or(price.cache_write_per_mtok, price.input_per_mtok)),
        (max(usage.output_tokens, 0), price.output_per_mtok),
    )


def max_cost_nano(price: Price, input_tokens: int, max_output_tokens: int) -> int:
    """The most a request can cost: what admission reserves against a budget.

    Input is priced at the higher of the input and cache-write prices (an Anthropic
    prompt written to the cache costs 1.25x input), output at the output price.
    """
    per_input = max(price.input_per_mtok, _or(price.cache_write_per_mtok, price.input_per_mtok))
    return _round(
        (max(input_tokens, 0), per_input),
        (max(max_output_tokens, 0), price.output_per_mtok),
    )


def format_usd(nano: int, *, fixed: bool = False) -> str:
    """A plain decimal USD string, never an exponent: no trailing zeros and at least "0"
    ("0.00012345": the x-tallygate-cost-usd header, usage.cost, messages, the spend
    report), or with `fixed` all nine decimals, nano-USD exactly ("0.000123450": the
    access log's cost_usd, as documented)."""
    nano = int(nano)
    whole, frac = divmod(abs(nano), NANO_PER_USD)  # integers: no Decimal on the hot path
    sign = "-" if nano < 0 else ""
    if fixed:
        return f"{sign}{whole}.{frac:09d}"
    if not frac:
        return f"{sign}{whole}" if whole else "0"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")


def _or(value: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if value is None else value


_UNITS_PER_MTOK = 10**12  # a per-Mtok price in these units is exact for up to 12 decimals
_UNITS_PER_NANO = 10**9  # tokens x units = nano-USD x 10**9


@functools.lru_cache(maxsize=4096)
def _units(per_mtok: Decimal) -> int | None:
    """A price as an integer (USD per Mtok x 10**12), or None if that is not exact.

    Memoised: a pure function of a handful of table prices, so the hot path multiplies
    ints instead of Decimals."""
    scaled = per_mtok.scaleb(12)
    return int(scaled) if scaled == scaled.to_integral_value() else None


def _round(*terms: tuple[int, Decimal]) -> int:
    total = 0
    for tokens, per_mtok in terms:
        units = _units(per_mtok)
        if units is None:
            return _round_decimal(terms)
        total += tokens * units
    return (total + _UNITS_PER_NANO // 2) // _UNITS_PER_NANO  # half-up (terms are >= 0)


def _round_decimal(terms: tuple[tuple[int, Decimal], ...]) -> int:
    with localcontext(prec=_PRECISION):
        total = sum(
            (Decimal(tokens) * per_mtok * _NANO_PER_TOKEN_PER_MTOK for tokens, per_mtok in terms),
            Decimal(0),
        )
        return int(total.to_integral_value(ROUND_HALF_UP))
