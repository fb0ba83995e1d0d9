"""PriceTable: the shipped price file, model-name resolution, hosts, overrides, PricingConfig."""

from __future__ import annotations

import csv
import re
from decimal import Decimal
from pathlib import Path

import pydantic
import pytest

from pricing.config import PriceOverride, PricingConfig
from pricing.table import (
    COLUMNS,
    Price,
    PriceTable,
    PriceTableError,
    host_tag,
    output_limit,
)

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
    meta-llama/Llama-3.3-70B-Instruct-Turbo llama-3.1-8b-instant llama-3.3-70b-versatile
    gpt-5.1 gpt-5.1-chat-latest gpt-5.1-codex gpt-5.1-codex-mini gpt-5-pro gpt-5-codex
    codex-mini-latest o3-deep-research o4-mini-deep-research claude-opus-4-6 claude-opus-4-7
    claude-sonnet-4-6 gemini-3-pro-preview gemini-3-flash-preview magistral-medium-latest
    magistral-small-latest devstral-medium-latest devstral-small-latest pixtral-large-latest
    gpt-3.5-turbo-0125 gpt-3.5-turbo-1106 gpt-3.5-turbo-0613 gpt-3.5-turbo-0301
    gpt-3.5-turbo-16k gpt-3.5-turbo-16k-0613 gpt-3.5-turbo-instruct mistral-large-2402
    mistral-large-2407 mistral-large-2411 mistral-medium-2312 mistral-medium-2505
    codestral-2405 codestral-2501 codestral-2508 moonshotai/Kimi-K2-Instruct
    deepseek-ai/DeepSeek-V3 deepseek-ai/DeepSeek-R1""".split()
    listed = {row["model"] for row in rows}
    assert set(required) <= listed
    assert len(table) == len(rows) >= 100


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("meta-llama/llama-4-scout-17b-16e-instruct", "groq"),
        ("meta-llama/llama-4-maverick-17b-128e-instruct", "groq"),
        ("openai/gpt-oss-120b", "groq"),
        ("openai/gpt-oss-20b", "groq"),
        ("moonshotai/kimi-k2-instruct-0905", "groq"),
        ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "together"),
        ("meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8", "together"),
        ("openai/gpt-oss-120b", "together"),
        ("openai/gpt-oss-20b", "together"),
        ("moonshotai/Kimi-K2-Instruct", "together"),
    ],
)
def test_price_file_covers_each_host(rows: list[dict], model: str, provider: str) -> None:
    assert {"model": model, "provider": provider} in [
        {"model": r["model"], "provider": r["provider"]} for r in rows
    ]


def test_no_chat_row_leaves_its_limits_empty(rows: list[dict]) -> None:
    chat = [r for r in rows if r["kind"] in {"chat", "completion"}]
    assert len(chat) >= 100
    for row in chat:
        assert row["max_output_tokens"], row["model"]  # admission's output cap needs it
        assert row["context_window"], row["model"]
        assert int(row["max_output_tokens"]) <= int(row["context_window"]), row["model"]
    for row in rows:
        if row["kind"] == "embedding":
            assert row["context_window"] and Decimal(row["output_per_mtok"]) == 0, row["model"]


def test_price_file_rows_are_complete(rows: list[dict]) -> None:
    for row in rows:
        assert tuple(row) == COLUMNS
        assert row["source"].startswith("https://"), row["model"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["price_date"]), row["model"]
        # checked: when the row was last compared with its source, never before it took effect
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["checked"]), row["model"]
        assert row["checked"] >= row["price_date"], row["model"]
        assert row["kind"] in {"chat", "completion", "embedding"}, row["model"]
        assert row["snapshots"] in {"", "shared"}, row["model"]
        assert row["provider"] in {
            "openai", "anthropic", "google", "mistral", "deepseek", "together", "groq",
        }  # fmt: skip


def test_rows_checked_in_the_latest_refresh_exist(rows: list[dict]) -> None:
    refreshed = {r["model"] for r in rows if r["checked"] == "2026-11-28"}
    assert {"claude-opus-4-6", "claude-sonnet-4-6", "o4-mini-deep-research"} <= refreshed


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
        "gpt-4o-mini", Decimal("0.15"), Decimal("0.60"), Decimal("0.075"), None, 16384, 128000
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
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo-0125"),  # its own row: the family is not shared
        ("gpt-3.5-turbo-0613", "gpt-3.5-turbo-0613"),
        ("gpt-3.5-turbo-16k-0613", "gpt-3.5-turbo-16k-0613"),
        ("gpt-3.5-turbo-instruct-0914", "gpt-3.5-turbo-instruct"),
        ("gpt-5.1-2025-11-13", "gpt-5.1"),
        ("gpt-5-pro-2025-10-06", "gpt-5-pro"),
        ("o3-deep-research-2025-06-26", "o3-deep-research"),
        ("claude-opus-4-6", "claude-opus-4-6"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("mistral-small-latest", "mistral-small-latest"),  # own row: mistral-small is not shared
        ("mistral-large-2411", "mistral-large-2411"),  # was priced as mistral-large-latest
        ("mistral-large-2402", "mistral-large-2402"),
        ("mistral-medium-2312", "mistral-medium-2312"),
        ("codestral-2405", "codestral-2405"),
        ("mistral/codestral-latest", "codestral-latest"),
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
    ("asked", "listed", "usd_in", "usd_out"),
    [
        # the mispriced names: each now costs what its own row says
        ("gpt-3.5-turbo-0613", "gpt-3.5-turbo-0613", "1.5", "2"),
        ("mistral-large-2402", "mistral-large-2402", "4", "12"),
        ("mistral-medium-2312", "mistral-medium-2312", "2.7", "8.1"),
        ("codestral-2405", "codestral-2405", "1", "3"),
    ],
)
def test_dated_rows_keep_their_own_price(
    table: PriceTable, asked: str, listed: str, usd_in: str, usd_out: str
) -> None:
    found = table.resolve(asked)
    assert (found.via, found.price.model) == ("exact", listed)  # type: ignore[union-attr]
    assert found.price.input_per_mtok == Decimal(usd_in)  # type: ignore[union-attr]
    assert found.price.output_per_mtok == Decimal(usd_out)  # type: ignore[union-attr]


def test_resolution_names_its_step(table: PriceTable) -> None:
    assert table.resolve("gpt-4o").via == "exact"
    assert table.resolve("GPT-4o").via == "case"
    assert table.resolve("openai/gpt-4o").via == "prefix"
    family = table.resolve("gpt-4o-2024-11-20")
    assert family.via == "family"
    assert family.listing is not None and family.listing.snapshots == "shared"
    assert family.listing.provider == "openai" and family.listing.source.startswith("https://")
    assert table.resolve("unknown-model").via == "unknown"


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
        # a snapshot of a family whose snapshots are not priced alike, and that has no row
        "gpt-3.5-turbo-0914",
        "mistral-large-2409",
        "mistral-medium-2403",
        "codestral-2412",
        "gemini-3-pro-preview-11-2025",
    ],
)
def test_unknown_models_have_no_price(table: PriceTable, model: str) -> None:
    assert table.lookup(model) is None


def test_lookup_results_are_cached(table: PriceTable) -> None:
    first = table.lookup("gpt-4o-2024-08-06")
    assert first is not None
    assert table.lookup("gpt-4o-2024-08-06") is first
    assert table.resolve("openai/gpt-oss-20b", "groq") is table.resolve(
        "openai/gpt-oss-20b", "groq"
    )


def test_one_model_id_on_several_hosts(table: PriceTable) -> None:
    groq = table.lookup("openai/gpt-oss-20b", "groq")
    together = table.lookup("openai/gpt-oss-20b", "together")
    assert groq is not None and together is not None
    assert (groq.input_per_mtok, groq.output_per_mtok) == (Decimal("0.075"), Decimal("0.30"))
    assert (together.input_per_mtok, together.output_per_mtok) == (Decimal("0.05"), Decimal("0.20"))
    assert table.resolve("openai/gpt-oss-20b", "groq").listing.provider == "groq"  # type: ignore[union-attr]
    # no host, or a host with no row for it: two rows claim the name, so no guess
    for host in (None, "openai", "somewhere-else"):
        found = table.resolve("openai/gpt-oss-20b", host)
        assert (found.price, found.via) == (None, "ambiguous")
        assert {row.provider for row in found.claimants} == {"groq", "together"}


def test_host_is_preferred_at_every_step(table: PriceTable) -> None:
    # Groq's id and Together's differ only in case; each host finds its own row
    scout = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
    assert table.lookup(scout, "together").input_per_mtok == Decimal("0.18")  # type: ignore[union-attr]
    groq = table.resolve(scout, "groq")
    assert (groq.via, groq.listing.provider) == ("case", "groq")  # type: ignore[union-attr]
    assert groq.price.input_per_mtok == Decimal("0.11")  # type: ignore[union-attr]
    # without a host the exact spelling is claimed by one row only
    assert table.resolve(scout).listing.provider == "together"  # type: ignore[union-attr]
    assert table.resolve(scout.upper()).via == "ambiguous"
    kimi = table.lookup("moonshotai/kimi-k2-instruct", "together")
    assert kimi is not None and kimi.model == "moonshotai/Kimi-K2-Instruct"


def test_a_host_without_its_own_row_still_finds_a_unique_name(table: PriceTable) -> None:
    assert table.lookup("gpt-4o-mini", "groq") == table.lookup("gpt-4o-mini")
    assert table.lookup("claude-sonnet-4-5-20250929", "anthropic").model == "claude-sonnet-4-5"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("base_url", "kind", "tag"),
    [
        ("https://api.groq.com/openai/v1", "openai", "groq"),
        ("https://api.together.xyz/v1", "openai", "together"),
        ("https://api.together.ai/v1", "openai", "together"),
        ("https://api.openai.com/v1", "openai", "openai"),
        ("https://api.anthropic.com", "anthropic", "anthropic"),
        ("https://api.mistral.ai/v1", "openai", "mistral"),
        ("https://codestral.mistral.ai/v1", "openai", "mistral"),
        ("https://api.deepseek.com", "openai", "deepseek"),
        ("https://generativelanguage.googleapis.com/v1beta/openai/", "openai", "google"),
        ("api.groq.com/openai/v1", None, "groq"),  # no scheme
        ("HTTPS://API.GROQ.COM/openai/v1", None, "groq"),
        ("http://localhost:8000/v1", "openai", None),
        ("https://myres.openai.azure.com", "azure", None),
        ("https://notgroq.com/v1", None, None),
        ("https://groq.com.evil.example/v1", None, None),
        (None, "openai", "openai"),  # the kind's default base_url
        (None, "anthropic", "anthropic"),
        (None, "mock", None),
        (None, None, None),
        ("", None, None),
    ],
)
def test_host_tag(base_url: str | None, kind: str | None, tag: str | None) -> None:
    assert host_tag(base_url, kind) == tag


def test_host_tag_takes_only_a_url() -> None:
    assert host_tag("https://api.groq.com/openai/v1") == "groq"
    assert host_tag(None) is None


def test_output_limit() -> None:
    def price(limit: int | None, window: int | None) -> Price:
        return Price("m", Decimal(1), Decimal(1), None, None, limit, window)

    assert output_limit(price(100, 1000), 7) == 100
    assert output_limit(price(None, 1000), 7) == 1000
    assert output_limit(price(None, None), 7) == 7
    assert output_limit(None, 7) == 7


def test_overrides_win() -> None:
    cheap = PriceOverride(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("2"))
    table = PriceTable.load({"gpt-4o": cheap, "meta-llama/Llama-3.1-8B-Instruct": cheap})
    gpt4o = table.lookup("gpt-4o")
    assert gpt4o == Price("gpt-4o", Decimal("1"), Decimal("2"), None, None, 16384, 128000)
    assert table.resolve("gpt-4o").via == "override"
    assert table.lookup("gpt-4o-2024-08-06") == gpt4o  # the override's family, too
    assert table.lookup("openai/gpt-4o") == gpt4o
    local = table.lookup("meta-llama/Llama-3.1-8B-Instruct")
    assert local == Price(
        "meta-llama/Llama-3.1-8B-Instruct", Decimal(1), Decimal(2), None, None, None, None
    )
    assert table.lookup("gpt-4o-mini").input_per_mtok == Decimal("0.15")  # type: ignore[union-attr]


def test_override_may_set_every_field() -> None:
    override = PriceOverride(
        input_per_mtok=Decimal("0"),
        output_per_mtok=Decimal("0"),
        cached_input_per_mtok=Decimal("0"),
        cache_write_per_mtok=Decimal("0"),
        max_output_tokens=100,
        context_window=1000,
    )
    table = PriceTable.load({"claude-sonnet-4-5": override})
    assert table.lookup("claude-sonnet-4-5-20250929") == Price(
        "claude-sonnet-4-5", Decimal(0), Decimal(0), Decimal(0), Decimal(0), 100, 1000
    )


def test_override_keeps_todays_family_matching() -> None:
    # an override of a family whose snapshots the table does not price alike still
    # covers those snapshots, as overrides always have; the table's own dated rows win
    cheap = PriceOverride(input_per_mtok=Decimal("1"), output_per_mtok=Decimal("1"))
    table = PriceTable.load({"mistral-large": cheap})
    assert table.resolve("mistral-large-2409").via == "override"
    assert table.lookup("mistral-large-2402").input_per_mtok == Decimal("4")  # type: ignore[union-attr]
    # the override inherits the limits of the table row of its own name only
    limits = PriceTable.load({"openai/gpt-oss-20b": cheap}).lookup("openai/gpt-oss-20b")
    assert limits is not None and limits.max_output_tokens is None  # two rows: no guess


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


# model,provider,kind,in,out,cached,write,max_out,context,snapshots,price_date,checked,source
A = "a,acme,chat,1,2,,,,,,2030-01-02,2030-01-02,s"


def test_load_from_path(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        "a,acme,chat,1,2,,,,,,2030-01-02,2030-01-03,https://acme.example/pricing",
        "b,acme,chat,0.5,1,0.1,0.6,1000,8000,shared,2029-05-01,2029-06-01,https://acme.example/p",
        "b,other,chat,0.7,1,,,1000,8000,,2029-05-01,2029-06-01,https://other.example/pricing",
        "e,acme,embedding,0.1,0,,,,512,,2029-05-01,2029-06-01,https://acme.example/pricing",
    )
    table = PriceTable.load(path=path)
    assert len(table) == 4
    assert table.lookup("b", "acme") == Price(
        "b", Decimal("0.5"), Decimal("1"), Decimal("0.1"), Decimal("0.6"), 1000, 8000
    )
    assert table.lookup("b", "other").input_per_mtok == Decimal("0.7")  # type: ignore[union-attr]
    assert table.lookup("b") is None  # two hosts
    assert table.lookup("b-0101", "acme").input_per_mtok == Decimal("0.5")  # type: ignore[union-attr]
    assert table.lookup("a-0101") is None  # a's snapshots are not shared
    listing = table.resolve("e").listing
    assert listing is not None and listing.kind == "embedding"
    assert str(table.resolve("a").listing.checked) == "2030-01-03"  # type: ignore[union-attr]
    assert table.version.startswith("2030-01-02+")
    assert table.lookup("gpt-4o") is None


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([A, A], r":3: duplicate model 'a' for provider 'acme'"),
        ([A.replace(",1,2,", ",x,2,")], r":2: not a decimal"),
        ([A.replace(",1,2,", ",-1,2,")], r":2: price must be"),
        ([A.replace(",1,2,", ",,2,")], r":2: input and output prices are required"),
        (
            ["a,acme,chat,1,2,,,0,,,2030-01-02,2030-01-02,s"],
            r":2: max_output_tokens must be a positive integer",
        ),
        (
            ["a,acme,chat,1,2,,,,-5,,2030-01-02,2030-01-02,s"],
            r":2: context_window must be a positive integer",
        ),
        (
            ["a,acme,chat,1,2,,,,,all,2030-01-02,2030-01-02,s"],
            r":2: snapshots must be 'shared' or empty",
        ),
        ([A.replace(",chat,", ",image,")], r":2: kind must be one of"),
        ([A.replace("2030-01-02,2030-01-02", "yesterday,2030-01-02")], r":2: price_date must be"),
        ([A.replace("2030-01-02,2030-01-02", "2030-01-02,")], r":2: checked must be"),
        (["a,acme,chat,1,2"], r":2: expected 13 cells"),
        ([A.replace("a,acme", ",acme")], r":2: model is empty"),
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
    assert PricingConfig().default_max_output_tokens == 32768
    tuned = PricingConfig.model_validate(
        {
            "default_max_output_tokens": 1000,
            "overrides": {"m": {"input_per_mtok": 1, "output_per_mtok": 1, "context_window": 8}},
        }
    )
    assert tuned.default_max_output_tokens == 1000
    assert tuned.overrides["m"].context_window == 8


@pytest.mark.parametrize(
    "data",
    [
        {"on_unknown_price": "maybe"},
        {"unknown_key": 1},
        {"overrides": {"m": {"input_per_mtok": 1}}},
        {"overrides": {"m": {"input_per_mtok": 1, "output_per_mtok": 1, "typo": 1}}},
        {"overrides": {"m": {"input_per_mtok": -1, "output_per_mtok": 1}}},
        {"overrides": {"m": {"input_per_mtok": 1, "output_per_mtok": 1, "context_window": 0}}},
        {"default_max_output_tokens": 0},
    ],
)
def test_pricing_config_is_strict(data: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        PricingConfig.model_validate(data)


def test_pricing_config_is_frozen() -> None:
    with pytest.raises(pydantic.ValidationError):
        PricingConfig().on_unknown_price = "allow"  # type: ignore[misc]
