"""PriceTable: the shipped price file, model-name resolution, overrides, and PricingConfig."""

from __future__ import annotations

import csv
import re
from decimal import Decimal
from pathlib import Path

import pydantic
import pytest

from pricing.config import PriceOverride, PricingConfig
from pricing.table import COLUMNS, Price, PriceTable, PriceTableError

PRICES_CSV = Path(__file__).resolve().parent.parent / "pricing" / "prices.csv"


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    with PRICES_CSV.open(newline="") as f:
        return list(csv.DictReader(f))


def test_price_file_covers_the_required_models(table: PriceTable, rows: list[dict]) -> None:
    required = """gpt-4o gpt-4o-mini gpt-4.1 gpt-4.1-mini gpt-4.1-nano o1 o3 o3-mini o4-mini gpt-5
    gpt-5-mini gpt-5-nano gpt-4-turbo gpt-3.5-turbo text-embedding-3-small text-embedding-3-large
    text-embedding-ada-002 claude-opus-4-1 claude-opus-4 claude-sonnet-4-5 claude-sonnet-4
    claude-haiku-4-5 claude-3-7-sonnet claude-3-5-haiku claude-3-haiku gemini-2.5-pro
    gemini-2.5-flash gemini-2.5-flash-lite gemini-2.0-flash gemini-2.0-flash-lite
    mistral-large-latest mistral-medium mistral-small codestral deepseek-chat deepseek-reasoner
    meta-llama/Llama-3.3-70B-Instruct-Turbo llama-3.1-8b-instant llama-3.3-70b-versatile""".split()
    listed = {row["model"] for row in rows}
    assert set(required) <= listed
    assert len(table) == len(rows) >= 40


def test_price_file_rows_are_complete(rows: list[dict]) -> None:
    for row in rows:
        assert tuple(row) == COLUMNS
        assert row["source"].startswith("https://"), row["model"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["price_date"]), row["model"]
        assert row["provider"] in {
            "openai", "anthropic", "google", "mistral", "deepseek", "together", "groq",
        }  # fmt: skip


def test_anthropic_cache_prices_follow_the_multipliers(rows: list[dict]) -> None:
    checked = 0
    for row in rows:
        if row["provider"] != "anthropic" or row["model"] == "claude-3-haiku":
            continue  # Haiku 3 is listed at $0.30 write / $0.03 read, not 1.25x / 0.1x
        base = Decimal(row["input_per_mtok"])
        assert Decimal(row["cache_write_per_mtok"]) == base * Decimal("1.25"), row["model"]
        assert Decimal(row["cached_input_per_mtok"]) == base / 10, row["model"]
        checked += 1
    assert checked >= 8


def test_version_is_newest_date_plus_hash(table: PriceTable, rows: list[dict]) -> None:
    newest = max(row["price_date"] for row in rows)
    assert re.fullmatch(re.escape(newest) + r"\+[0-9a-f]{8}", table.version)
    assert PriceTable.load().version == table.version


def test_exact_lookup(table: PriceTable) -> None:
    assert table.lookup("gpt-4o-mini") == Price(
        "gpt-4o-mini", Decimal("0.15"), Decimal("0.60"), Decimal("0.075"), None, 16384
    )


@pytest.mark.parametrize(
    ("asked", "priced_as"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # its own, higher, row
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("mistral-small-latest", "mistral-small"),
        ("mistral-large-2411", "mistral-large-latest"),
        ("gemini-2.0-flash-001", "gemini-2.0-flash"),
        ("GPT-4o", "gpt-4o"),
        ("meta-llama/llama-3.3-70b-instruct-turbo", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
        ("openai/gpt-4o", "gpt-4o"),
        ("anthropic/claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("models/gemini-2.5-pro", "gemini-2.5-pro"),
        ("openrouter/openai/gpt-4.1-nano", "gpt-4.1-nano"),
        (
            "together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        ),
    ],
)
def test_resolution(table: PriceTable, asked: str, priced_as: str) -> None:
    price = table.lookup(asked)
    assert price is not None
    assert price.model == priced_as


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o-mini-xyz",  # never falls back to gpt-4o
        "gpt-4o-audio-preview",
        "gpt-4o-mini-tts",
        "claude-sonnet-4-5-experimental",
        "unknown-model",
        "meta-llama/Llama-3.1-8B-Instruct",
        "acme/gpt-4o",  # not a provider prefix we strip
        "",
    ],
)
def test_unknown_models_have_no_price(table: PriceTable, model: str) -> None:
    assert table.lookup(model) is None


def test_lookup_results_are_cached(table: PriceTable) -> None:
    first = table.lookup("gpt-4o-2024-08-06")
    assert first is not None
    assert table.lookup("gpt-4o-2024-08-06") is first


def test_overrides_win() -> None:
    cheap = PriceOverride(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("2"))
    table = PriceTable.load({"gpt-4o": cheap, "meta-llama/Llama-3.1-8B-Instruct": cheap})
    gpt4o = table.lookup("gpt-4o")
    assert gpt4o == Price("gpt-4o", Decimal("1"), Decimal("2"), None, None, 16384)
    assert table.lookup("gpt-4o-2024-08-06") == gpt4o  # the override's family, too
    assert table.lookup("openai/gpt-4o") == gpt4o
    local = table.lookup("meta-llama/Llama-3.1-8B-Instruct")
    assert local == Price(
        "meta-llama/Llama-3.1-8B-Instruct", Decimal(1), Decimal(2), None, None, None
    )
    assert table.lookup("gpt-4o-mini").input_per_mtok == Decimal("0.15")  # type: ignore[union-attr]


def test_override_may_set_every_field() -> None:
    override = PriceOverride(
        input_per_mtok=Decimal("0"),
        output_per_mtok=Decimal("0"),
        cached_input_per_mtok=Decimal("0"),
        cache_write_per_mtok=Decimal("0"),
        max_output_tokens=100,
    )
    table = PriceTable.load({"claude-sonnet-4-5": override})
    assert table.lookup("claude-sonnet-4-5-20250929") == Price(
        "claude-sonnet-4-5", Decimal(0), Decimal(0), Decimal(0), Decimal(0), 100
    )


def test_overrides_change_the_version() -> None:
    plain = PriceTable.load().version
    one = PriceOverride(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("1"))
    two = PriceOverride(input_per_mtok=Decimal("2"), output_per_mtok=Decimal("1"))
    v1 = PriceTable.load({"x": one}).version
    assert len({plain, v1, PriceTable.load({"x": two}).version}) == 3
    assert v1.split("+")[0] == plain.split("+")[0]
    assert PriceTable.load({"x": one}).version == v1


def write_csv(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "prices.csv"
    path.write_text("\n".join([",".join(COLUMNS), *lines]) + "\n")
    return path


def test_load_from_path(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        "a,acme,1,2,,,,2030-01-02,https://acme.example/pricing",
        "b,acme,0.5,1,0.1,0.6,1000,2029-05-01,https://acme.example/pricing",
    )
    table = PriceTable.load(path=path)
    assert table.lookup("b") == Price(
        "b", Decimal("0.5"), Decimal("1"), Decimal("0.1"), Decimal("0.6"), 1000
    )
    assert table.version.startswith("2030-01-02+")
    assert table.lookup("gpt-4o") is None


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["a,acme,1,2,,,,2030-01-02,s", "a,acme,1,2,,,,2030-01-02,s"], r":3: duplicate model 'a'"),
        (["a,acme,x,2,,,,2030-01-02,s"], r":2: not a decimal"),
        (["a,acme,-1,2,,,,2030-01-02,s"], r":2: price must be"),
        (["a,acme,,2,,,,2030-01-02,s"], r":2: input and output prices are required"),
        (["a,acme,1,2,,,0,2030-01-02,s"], r":2: max_output_tokens"),
        (["a,acme,1,2,,,,yesterday,s"], r":2: "),
        (["a,acme,1,2"], r":2: expected 9 cells"),
        ([",acme,1,2,,,,2030-01-02,s"], r":2: model is empty"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(PriceTableError, match=message):
        PriceTable.load(path=write_csv(tmp_path, *lines))


def test_wrong_header(tmp_path: Path) -> None:
    path = tmp_path / "prices.csv"
    path.write_text("model,input,output\na,1,2\n")
    with pytest.raises(PriceTableError, match=r":1: header must be"):
        PriceTable.load(path=path)


def test_pricing_config_parses_yaml_values() -> None:
    config = PricingConfig.model_validate(
        {
            "on_unknown_price": "allow",
            "overrides": {"local-model": {"input_per_mtok": 0.15, "output_per_mtok": 0.0}},
        }
    )
    assert config.on_unknown_price == "allow"
    assert config.overrides["local-model"].input_per_mtok == Decimal("0.15")
    assert PricingConfig().on_unknown_price == "reject"
    assert PricingConfig().overrides == {}


@pytest.mark.parametrize(
    "data",
    [
        {"on_unknown_price": "maybe"},
        {"unknown_key": 1},
        {"overrides": {"m": {"input_per_mtok": 1}}},
        {"overrides": {"m": {"input_per_mtok": 1, "output_per_mtok": 1, "typo": 1}}},
        {"overrides": {"m": {"input_per_mtok": -1, "output_per_mtok": 1}}},
    ],
)
def test_pricing_config_is_strict(data: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        PricingConfig.model_validate(data)


def test_pricing_config_is_frozen() -> None:
    with pytest.raises(pydantic.ValidationError):
        PricingConfig().on_unknown_price = "allow"  # type: ignore[misc]
