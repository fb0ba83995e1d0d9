"""cost_nano / max_cost_nano / output_cap / USD conversions, against hand-computed figures.

nano-USD = tokens x (USD per million tokens) x 1000, so each expected value below is
written out as that arithmetic on the list price in pricing/prices.csv.
"""

from __future__ import annotations

from decimal import Decimal

import pytest

from pricing.cost import cost_nano, format_usd, max_cost_nano
from pricing.table import Price, PriceTable, output_limit
from pricing.usage import Usage, usage_from_anthropic


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


def price_of(table: PriceTable, model: str) -> Price:
    price = table.lookup(model)
    assert price is not None, model
    return price


@pytest.mark.parametrize(
    ("model", "usage", "expected"),
    [
        # 1000*0.15*1000 + 500*0.60*1000 = 150_000 + 300_000
        ("gpt-4o-mini", Usage(input_tokens=1000, output_tokens=500), 450_000),
        # 1000*2.50*1000 + 500*10.00*1000 = 2_500_000 + 5_000_000
        ("gpt-4o", Usage(input_tokens=1000, output_tokens=500), 7_500_000),
        # uncached 1500*2.00*1000 + cached 500*0.50*1000 + 300*8.00*1000
        # = 3_000_000 + 250_000 + 2_400_000
        (
            "gpt-4.1",
            Usage(input_tokens=2000, output_tokens=300, cache_read_input_tokens=500),
            5_650_000,
        ),
        # 12345*0.10*1000 + 678*0.40*1000 = 1_234_500 + 271_200
        ("gpt-4.1-nano", Usage(input_tokens=12345, output_tokens=678), 1_505_700),
        # reasoning is inside output_tokens: 1000*1.10*1000 + 2000*4.40*1000
        # = 1_100_000 + 8_800_000
        (
            "o3-mini",
            Usage(input_tokens=1000, output_tokens=2000, reasoning_output_tokens=1500),
            9_900_000,
        ),
        # 7*0.05*1000 + 3*0.40*1000 = 350 + 1200
        ("gpt-5-nano", Usage(input_tokens=7, output_tokens=3), 1550),
        # 1000*1.00*1000 + 1000*5.00*1000
        ("claude-haiku-4-5", Usage(input_tokens=1000, output_tokens=1000), 6_000_000),
        # uncached 600*0.30*1000 + cached 400*0.03*1000 + 100*2.50*1000
        # = 180_000 + 12_000 + 250_000
        (
            "gemini-2.5-flash",
            Usage(input_tokens=1000, output_tokens=100, cache_read_input_tokens=400),
            442_000,
        ),
        # 3*0.075*1000 + 1*0.30*1000 = 225 + 300
        ("gemini-2.0-flash-lite", Usage(input_tokens=3, output_tokens=1), 525),
        # miss 200*0.28*1000 + hit 800*0.028*1000 + 100*0.42*1000 = 56_000 + 22_400 + 42_000
        (
            "deepseek-chat",
            Usage(input_tokens=1000, output_tokens=100, cache_read_input_tokens=800),
            120_400,
        ),
        # 8*0.02*1000
        ("text-embedding-3-small", Usage(input_tokens=8), 160),
        # 1*0.10*1000 + 1*0.30*1000
        ("mistral-small", Usage(input_tokens=1, output_tokens=1), 400),
        # 1*0.05*1000 + 1*0.08*1000
        ("llama-3.1-8b-instant", Usage(input_tokens=1, output_tokens=1), 130),
        # 1_000_000*0.88*1000 + 1_000_000*0.88*1000
        (
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            Usage(input_tokens=1_000_000, output_tokens=1_000_000),
            1_760_000_000,
        ),
        # gpt-4-turbo has no cached price: cached tokens fall back to input, 1000*10*1000
        (
            "gpt-4-turbo",
            Usage(input_tokens=1000, cache_read_input_tokens=600),
            10_000_000,
        ),
    ],
)
def test_cost_of_listed_models(table: PriceTable, model: str, usage: Usage, expected: int) -> None:
    assert cost_nano(price_of(table, model), usage) == expected


def test_anthropic_cache_buckets(table: PriceTable) -> None:
    # Anthropic reports input_tokens without the cache buckets.
    usage = usage_from_anthropic(
        {
            "input_tokens": 100,
            "cache_read_input_tokens": 2000,
            "cache_creation_input_tokens": 1000,
            "output_tokens": 500,
        }
    )
    assert usage.input_tokens == 3100
    # 100*3.00*1000 + read 2000*0.30*1000 + write 1000*3.75*1000 + 500*15.00*1000
    # = 300_000 + 600_000 + 3_750_000 + 7_500_000
    assert cost_nano(price_of(table, "claude-sonnet-4-5"), usage) == 12_150_000


def test_anthropic_cache_buckets_haiku_3_5(table: PriceTable) -> None:
    usage = usage_from_anthropic(
        {
            "input_tokens": 10,
            "cache_read_input_tokens": 1000,
            "cache_creation_input_tokens": 500,
            "output_tokens": 100,
        }
    )
    # 10*0.80*1000 + 1000*0.08*1000 + 500*1.00*1000 + 100*4.00*1000
    # = 8000 + 80_000 + 500_000 + 400_000
    assert cost_nano(price_of(table, "claude-3-5-haiku-20241022"), usage) == 988_000


def test_cache_write_without_price_falls_back_to_input() -> None:
    price = Price("m", Decimal("2"), Decimal("4"), None, None, None)
    usage = Usage(input_tokens=100, cache_creation_input_tokens=100)
    assert cost_nano(price, usage) == 200_000  # 100*2*1000


def test_rounds_half_up_once_after_summing() -> None:
    price = Price("m", Decimal("0.0005"), Decimal("0.0005"), None, None, None)
    # 1 token: 1*0.0005*1000 = 0.5 nano -> 1
    assert cost_nano(price, Usage(input_tokens=1)) == 1
    # 3*0.5 + 3*0.5 = 3.0 exactly; rounding each term first would give 2 + 2 = 4
    assert cost_nano(price, Usage(input_tokens=3, output_tokens=3)) == 3
    # 0.4999 nano rounds down
    assert cost_nano(Price("m", Decimal("0.0004999"), Decimal(0), None, None, None), Usage(1)) == 0


def test_inconsistent_usage_never_goes_negative(table: PriceTable) -> None:
    price = price_of(table, "gpt-4o")
    usage = Usage(input_tokens=10, cache_read_input_tokens=50)  # more cached than input
    # uncached clamps to 0; 50 cached at 1.25: 50*1.25*1000
    assert cost_nano(price, usage) == 62_500
    assert cost_nano(price, Usage()) == 0


def test_max_cost_nano(table: PriceTable) -> None:
    # 1000*0.15*1000 + 4096*0.60*1000 = 150_000 + 2_457_600
    assert max_cost_nano(price_of(table, "gpt-4o-mini"), 1000, 4096) == 2_607_600
    # Anthropic input may all be written to the cache: 1000*3.75*1000 + 100*15*1000
    assert max_cost_nano(price_of(table, "claude-sonnet-4-5"), 1000, 100) == 5_250_000


@pytest.mark.parametrize("model", ["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro", "o3"])
def test_max_cost_bounds_every_actual_cost(table: PriceTable, model: str) -> None:
    price = price_of(table, model)
    bound = max_cost_nano(price, 1000, 200)
    for read, write, out in [(0, 0, 200), (1000, 0, 200), (0, 1000, 200), (300, 700, 0)]:
        usage = Usage(
            input_tokens=1000,
            output_tokens=out,
            cache_read_input_tokens=read,
            cache_creation_input_tokens=write,
        )
        assert cost_nano(price, usage) <= bound


def test_output_limit(table: PriceTable) -> None:
    gpt4o = price_of(table, "gpt-4o")
    assert output_limit(gpt4o, 1000) == 16384  # the model's max output
    windowed = Price("m", Decimal(1), Decimal(1), None, None, None, context_window=32_000)
    assert output_limit(windowed, 1000) == 32_000  # else its context window
    assert output_limit(None, 1000) == 1000  # else pricing.default_max_output_tokens


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "0"),
        (1, "0.000000001"),
        (120, "0.00000012"),
        (123_450, "0.00012345"),
        (450_000, "0.00045"),
        (10**9, "1"),
        (1_500_000_000, "1.5"),
        (10**20, "100000000000"),
        (-5, "-0.000000005"),
    ],
)
def test_format_usd(nano: int, text: str) -> None:
    assert format_usd(nano) == text


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "0.000000000"),
        (1, "0.000000001"),
        (123_450, "0.000123450"),
        (1_500_000_000, "1.500000000"),
        (10**30 + 1, "1000000000000000000000.000000001"),
        (-5, "-0.000000005"),
    ],
)
def test_format_usd_fixed_keeps_all_nine_decimals(nano: int, text: str) -> None:
    assert format_usd(nano, fixed=True) == text
    assert int(text.replace(".", "")) == nano  # exact, whatever the size
