"""PriceTable: list prices from prices.csv plus config overrides, and model-name resolution."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from .config import PriceOverride

COLUMNS = (
    "model",
    "provider",
    "kind",
    "input_per_mtok",
    "output_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "max_output_tokens",
    "context_window",
    "snapshots",
    "price_date",
    "checked",
    "source",
)

KINDS = frozenset({"chat", "completion", "embedding"})
SHARED = "shared"  # `snapshots` value: this family's dated snapshots cost what its row costs

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

# A provider's API host → the `provider` name its rows carry. A host matches itself and
# its subdomains. Hosts not listed here (a local vLLM, a proxy, Azure) have no tag.
_HOSTS = (
    ("api.openai.com", "openai"),
    ("api.anthropic.com", "anthropic"),
    ("generativelanguage.googleapis.com", "google"),
    ("mistral.ai", "mistral"),  # api.mistral.ai, codestral.mistral.ai
    ("api.deepseek.com", "deepseek"),
    ("groq.com", "groq"),
    ("together.xyz", "together"),
    ("together.ai", "together"),
)
# A provider kind whose base_url defaults to the vendor's own API (gateway/providers).
_KIND_HOSTS = {"openai": "openai", "anthropic": "anthropic"}

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
    context_window: int | None = None


@dataclass(frozen=True, slots=True)
class Listing:
    """One row of the price file: a price, the host that charges it, and its provenance."""

    price: Price
    provider: str
    kind: str = "chat"
    snapshots: str = ""  # SHARED or ""
    price_date: date = date.min
    checked: date = date.min
    source: str = ""

    @property
    def model(self) -> str:
        return self.price.model


@dataclass(frozen=True, slots=True)
class Resolution:
    """How a model name was priced: `via` is exact | case | prefix | family | override
    | ambiguous | unknown. `listing` is the table row (None for an override or no price)."""

    price: Price | None
    via: str
    listing: Listing | None = None
    claimants: tuple[Listing, ...] = ()  # the rows an ambiguous name matched


def output_limit(price: Price | None, default: int) -> int:
    """The most output tokens a request to this model can produce: its max output, else its
    context window, else `default` (pricing.default_max_output_tokens)."""
    if price is not None:
        if price.max_output_tokens is not None:
            return price.max_output_tokens
        if price.context_window is not None:
            return price.context_window
    return default


def host_tag(base_url: str | None, kind: str | None = None) -> str | None:
    """The price table's provider name for a provider's base_url, or None when unknown.

    With no base_url, `kind` ("openai", "anthropic") names the vendor API it defaults to.
    """
    if not base_url:
        return _KIND_HOSTS.get(kind or "")
    host = urlsplit(base_url if "//" in base_url else f"//{base_url}").hostname or ""
    for domain, tag in _HOSTS:
        if host == domain or host.endswith("." + domain):
            return tag
    return None


class PriceTable:
    """Resolves a model name (and the host serving it) to its Price. Build with `load()`."""

    def __init__(
        self,
        prices: Iterable[Listing | Price],
        overrides: Iterable[Price] = (),
        version: str = "",
    ) -> None:
        self.version = version
        self.listings = tuple(p if isinstance(p, Listing) else Listing(p, "") for p in prices)
        self._exact = _claims(self.listings, lambda m: m)
        self._folded = _claims(self.listings, str.lower)
        self._families = _claims(
            (row for row in self.listings if row.snapshots == SHARED), str.lower
        )
        self._overrides = _override_index(overrides)
        self._cache: dict[tuple[str, str | None], Resolution] = {}

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
        base = cls(rows)
        extra = [
            _from_override(model, o, base.lookup(model)) for model, o in (overrides or {}).items()
        ]
        newest = max((row.price_date for row in rows), default=date.min).isoformat()
        digest = hashlib.sha256(data)
        for price in sorted(extra, key=lambda p: p.model):
            digest.update(_canonical(price).encode())
        return cls(rows, extra, f"{newest}+{digest.hexdigest()[:8]}")

    def lookup(self, model: str, host: str | None = None) -> Price | None:
        """The price for `model` served by `host` (a `host_tag`), or None if unknown."""
        return self.resolve(model, host).price

    def resolve(self, model: str, host: str | None = None) -> Resolution:
        """How `model` is priced. Tried in order, overrides before the table at each step:
        the name as given, lower-cased, without a provider prefix, and its version-stripped
        family when the family row says `snapshots=shared`. A `host` row is preferred at
        every step; without one, a name resolves only if exactly one row claims it."""
        key = (model, host)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = None
        if host is not None:
            found = self._walk(model, lambda rows: [r for r in rows if r.provider == host])
        if found is None:
            found = self._walk(model, lambda rows: rows) or Resolution(None, "unknown")
        if len(self._cache) < _CACHE_LIMIT:
            self._cache[key] = found
        return found

    def _walk(
        self, model: str, pick: Callable[[list[Listing]], list[Listing]]
    ) -> Resolution | None:
        for name, via in _candidates(model):
            override = self._overrides.get(name)
            if override is not None:
                return Resolution(override, "override")
            rows = pick(self._index(via).get(name, []))
            if len(rows) == 1:
                return Resolution(rows[0].price, via, rows[0])
            if len(rows) > 1:  # several hosts charge for this name: no guess
                return Resolution(None, "ambiguous", claimants=tuple(rows))
        return None

    def _index(self, via: str) -> dict[str, list[Listing]]:
        if via == "exact":
            return self._exact
        return self._families if via == "family" else self._folded

    def __len__(self) -> int:
        return len(self.listings)


def strip_version(name: str) -> str:
    """`name` without one trailing version suffix (date, MMDD, -001, -latest)."""
    return _VERSION_SUFFIX.sub("", name)


def _candidates(model: str) -> Iterator[tuple[str, str]]:
    yield model, "exact"
    name = model.lower()
    yield name, "case"
    while "/" in name and name.split("/", 1)[0] in PROVIDER_PREFIXES:
        name = name.split("/", 1)[1]
        yield name, "prefix"
    family = strip_version(name)
    if family != name:
        yield family, "family"


def _claims(rows: Iterable[Listing], key: Callable[[str], str]) -> dict[str, list[Listing]]:
    claims: dict[str, list[Listing]] = {}
    for row in rows:
        claims.setdefault(key(row.model), []).append(row)
    return claims


def _override_index(prices: Iterable[Price]) -> dict[str, Price]:
    """Overrides match as they always have: exact names, then lower-cased names, then
    version-stripped names, whatever the table says of snapshots. A derived key that two
    overrides would claim is left out rather than guessed."""
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
    """An override replaces the prices; the output limit and context window, model facts,
    come from the table unless the override sets them."""
    limit, window = o.max_output_tokens, o.context_window
    if listed is not None:
        limit = listed.max_output_tokens if limit is None else limit
        window = listed.context_window if window is None else window
    return Price(
        model, o.input_per_mtok, o.output_per_mtok,
        o.cached_input_per_mtok, o.cache_write_per_mtok, limit, window,
    )  # fmt: skip


def _canonical(p: Price) -> str:
    def num(d: Decimal | int | None) -> str:
        return "" if d is None else format(Decimal(d).normalize(), "f")

    return "|".join(
        [p.model, num(p.input_per_mtok), num(p.output_per_mtok), num(p.cached_input_per_mtok),
         num(p.cache_write_per_mtok), num(p.max_output_tokens), num(p.context_window)]
    )  # fmt: skip


def _parse(text: str, name: str) -> Iterator[Listing]:
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise PriceTableError(f"{name}:1: header must be {','.join(COLUMNS)}")
    seen: set[tuple[str, str]] = set()
    for row in reader:
        where = f"{name}:{reader.line_num}"
        if None in row or any(v is None for v in row.values()):
            raise PriceTableError(f"{where}: expected {len(COLUMNS)} cells")
        cells = {k: v.strip() for k, v in row.items()}
        model, provider = cells["model"], cells["provider"]
        if not model:
            raise PriceTableError(f"{where}: model is empty")
        if (model, provider) in seen:
            raise PriceTableError(f"{where}: duplicate model {model!r} for provider {provider!r}")
        seen.add((model, provider))
        try:
            yield _listing(cells)
        except ValueError as exc:
            raise PriceTableError(f"{where}: {exc}") from None


def _listing(cells: dict[str, str]) -> Listing:
    if cells["kind"] not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(sorted(KINDS))}: {cells['kind']!r}")
    if cells["snapshots"] not in ("", SHARED):
        raise ValueError(f"snapshots must be {SHARED!r} or empty: {cells['snapshots']!r}")
    price = Price(
        model=cells["model"],
        input_per_mtok=_required_money(cells["input_per_mtok"]),
        output_per_mtok=_required_money(cells["output_per_mtok"]),
        cached_input_per_mtok=_money(cells["cached_input_per_mtok"]),
        cache_write_per_mtok=_money(cells["cache_write_per_mtok"]),
        max_output_tokens=_tokens(cells["max_output_tokens"], "max_output_tokens"),
        context_window=_tokens(cells["context_window"], "context_window"),
    )
    return Listing(
        price,
        provider=cells["provider"],
        kind=cells["kind"],
        snapshots=cells["snapshots"],
        price_date=_day(cells["price_date"], "price_date"),
        checked=_day(cells["checked"], "checked"),
        source=cells["source"],
    )


def _required_money(cell: str) -> Decimal:
    value = _money(cell)
    if value is None:
        raise ValueError("input and output prices are required")
    return value


def _money(cell: str) -> Decimal | None:
    if not cell:
        return None
    try:
        value = Decimal(cell)
    except InvalidOperation:
        raise ValueError(f"not a decimal: {cell!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"price must be a finite number >= 0: {cell!r}")
    return value


def _tokens(cell: str, column: str) -> int | None:
    if not cell:
        return None
    if not cell.isdigit() or int(cell) == 0:
        raise ValueError(f"{column} must be a positive integer: {cell!r}")
    return int(cell)


def _day(cell: str, column: str) -> date:
    try:
        return date.fromisoformat(cell)
    except ValueError:
        raise ValueError(f"{column} must be an ISO date (YYYY-MM-DD): {cell!r}") from None
