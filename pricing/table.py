"""PriceTable: list prices from prices.csv plus config overrides, and model-name resolution."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path

from .config import PriceOverride

COLUMNS = (
    "model",
    "provider",
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "max_output_tokens",
    "price_date",
    "source",
)

# First path segments that name a router or provider, not a model: "openai/gpt-4o",
# "anthropic/claude-sonnet-4-5", "models/gemini-2.5-pro" (the Gemini API's own prefix).
# Organisation prefixes such as "meta-llama/" are part of a host's model id and stay.
PROVIDER_PREFIXES = frozenset(
    {
        "openai", "azure", "anthropic", "models", "google", "gemini", "vertex_ai",
        "mistral", "deepseek", "groq", "together", "together_ai", "openrouter",
    }
)  # fmt: skip

# A version suffix: -2024-08-06, -20250929, -0613 / -2411 (MMDD, YYMM), -001, -latest.
_VERSION_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{3,4}|latest)$")

_CACHE_LIMIT = 4096  # distinct names remembered per table; model names come from config routes


class PriceTableError(ValueError):
    """The price file is malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Price:
    """One model's list price in USD per million tokens; None = unknown or not offered."""

    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None
    cache_write_per_mtok: Decimal | None
    max_output_tokens: int | None


class PriceTable:
    """Resolves a model name to its Price. Build with `PriceTable.load()`."""

    def __init__(
        self,
        prices: Iterable[Price],
        overrides: Iterable[Price] = (),
        version: str = "",
    ) -> None:
        self.version = version
        self._prices = _index(prices)
        self._overrides = _index(overrides)
        self._cache: dict[str, Price | None] = {}

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, PriceOverride] | None = None,
        path: str | Path | None = None,
    ) -> PriceTable:
        """Read the price file (default: prices.csv beside this module) and apply overrides."""
        if path is None:
            name = "prices.csv"
            data = resources.files(__package__).joinpath(name).read_bytes()
        else:
            name = str(path)
            data = Path(path).read_bytes()
        rows = list(_parse(data.decode("utf-8"), name))
        base = cls(price for price, _ in rows)
        extra = [
            _from_override(model, o, base.lookup(model)) for model, o in (overrides or {}).items()
        ]
        newest = max((day for _, day in rows), default=date.min).isoformat()
        digest = hashlib.sha256(data)
        for price in sorted(extra, key=lambda p: p.model):
            digest.update(_canonical(price).encode())
        return cls((p for p, _ in rows), extra, f"{newest}+{digest.hexdigest()[:8]}")

    def lookup(self, model: str) -> Price | None:
        """The price for `model`, or None if neither the table nor an override knows it.

        Tried in order, overrides before the table at each step: the name as given,
        lower-cased, without a provider prefix, without a version suffix.
        """
        try:
            return self._cache[model]
        except KeyError:
            pass
        found = None
        for candidate in _candidates(model):
            found = self._overrides.get(candidate) or self._prices.get(candidate)
            if found is not None:
                break
        if len(self._cache) < _CACHE_LIMIT:
            self._cache[model] = found
        return found

    def __len__(self) -> int:
        return len({p.model for p in self._prices.values()})


def strip_version(name: str) -> str:
    """`name` without one trailing version suffix (date, MMDD, -001, -latest)."""
    return _VERSION_SUFFIX.sub("", name)


def _candidates(model: str) -> Iterable[str]:
    yield model
    name = model.lower()
    yield name
    while "/" in name and name.split("/", 1)[0] in PROVIDER_PREFIXES:
        name = name.split("/", 1)[1]
        yield name
    yield strip_version(name)


def _index(prices: Iterable[Price]) -> dict[str, Price]:
    """Exact names first, then lower-cased names, then version-stripped family names.

    A derived key that two rows would claim is left out rather than guessed.
    """
    prices = list(prices)
    index = {p.model: p for p in prices}
    for derive in (str.lower, lambda m: strip_version(m.lower())):
        claims: dict[str, list[Price]] = {}
        for p in prices:
            claims.setdefault(derive(p.model), []).append(p)
        for key, claimants in claims.items():
            if key not in index and len(claimants) == 1:
                index[key] = claimants[0]
    return index


def _from_override(model: str, o: PriceOverride, listed: Price | None) -> Price:
    """An override replaces the prices; the output limit, a model fact, comes from the table."""
    limit = o.max_output_tokens
    if limit is None and listed is not None:
        limit = listed.max_output_tokens
    return Price(
        model, o.input_per_mtok, o.output_per_mtok,
        o.cached_input_per_mtok, o.cache_write_per_mtok, limit,
    )  # fmt: skip


def _canonical(p: Price) -> str:
    def num(d: Decimal | int | None) -> str:
        return "" if d is None else format(Decimal(d).normalize(), "f")

    return "|".join(
        [p.model, num(p.input_per_mtok), num(p.output_per_mtok), num(p.cached_input_per_mtok),
         num(p.cache_write_per_mtok), num(p.max_output_tokens)]
    )  # fmt: skip


def _parse(text: str, name: str) -> Iterable[tuple[Price, date]]:
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise PriceTableError(f"{name}:1: header must be {','.join(COLUMNS)}")
    seen: set[str] = set()
    for row in reader:
        where = f"{name}:{reader.line_num}"
        if None in row or any(v is None for v in row.values()):
            raise PriceTableError(f"{where}: expected {len(COLUMNS)} cells")
        model = row["model"].strip()
        if not model:
            raise PriceTableError(f"{where}: model is empty")
        if model in seen:
            raise PriceTableError(f"{where}: duplicate model {model!r}")
        seen.add(model)
        try:
            price = Price(
                model=model,
                input_per_mtok=_money(row["input_per_mtok"], required=True),
                output_per_mtok=_money(row["output_per_mtok"], required=True),
                cached_input_per_mtok=_money(row["cached_input_per_mtok"]),
                cache_write_per_mtok=_money(row["cache_write_per_mtok"]),
                max_output_tokens=_limit(row["max_output_tokens"]),
            )
            day = date.fromisoformat(row["price_date"].strip())
        except ValueError as exc:
            raise PriceTableError(f"{where}: {exc}") from None
        yield price, day


def _money(cell: str, required: bool = False) -> Decimal | None:
    cell = cell.strip()
    if not cell:
        if required:
            raise ValueError("input and output prices are required")
        return None
    try:
        value = Decimal(cell)
    except InvalidOperation:
        raise ValueError(f"not a decimal: {cell!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"price must be a finite number >= 0: {cell!r}")
    return value


def _limit(cell: str) -> int | None:
    cell = cell.strip()
    if not cell:
        return None
    if not cell.isdigit() or int(cell) == 0:
        raise ValueError(f"max_output_tokens must be a positive integer: {cell!r}")
    return int(cell)
