"""config.yaml: typed, frozen, strict models; ${VAR} interpolation; errors that name the key path."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.providers import PROVIDERS
from gateway.telemetry.config import TelemetryConfig
from policies.config import BudgetConfig, RateLimitConfig, StoreConfig, Strict
from policies.redaction import RedactionConfig
from pricing.config import PricingConfig

ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
DEFAULT_CONFIG = "config.yaml"


class ConfigError(Exception):
    """The config cannot be used; the message names the file and each bad key's path."""


class ServerConfig(Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=4000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    max_body_mb: float = Field(default=10, gt=0)
    drain_timeout_s: float = Field(
        default=30, ge=0
    )  # SIGTERM: wait this long for in-flight requests
    # Limits at the HTTP layer (gateway/server/limits.py), safe for an internet-facing process.
    max_header_kb: int = Field(default=64, ge=1)  # URL + headers; over it: 431
    header_timeout_s: float = Field(default=10, gt=0)  # to send a request head; then closed
    max_connections: int = Field(default=10000, ge=1)  # per worker; more: 503 and closed
    # deeper bodies: 400; the JSON encoder (orjson) stops at 254 levels, telemetry adds a few
    max_json_depth: int = Field(default=64, ge=1, le=128)


class ProviderConfig(Strict):
    kind: Literal["openai", "azure", "anthropic", "mock"]
    base_url: str | None = None
    api_key: str | None = None
    api_version: str | None = None  # azure
    headers: dict[str, str] = Field(default_factory=dict)  # extra headers sent upstream
    timeout_s: float = Field(
        default=600, gt=0
    )  # read timeout (between bytes), per deployment overridable
    connect_timeout_s: float = Field(default=5, gt=0)
    max_connections: int = Field(default=1000, ge=1)
    # mock only
    latency_ms: float = Field(default=0, ge=0)
    text: str | None = None  # fixed reply; default: echo the last user message
    chunk_delay_ms: float = Field(default=0, ge=0)


class DeploymentConfig(Strict):
    provider: str
    model: str
    weight: float | None = Field(default=None, gt=0)
    timeout_s: float | None = Field(default=None, gt=0)
    name: str | None = None  # shown in x-tallygate-deployment; default "<provider>/<model>"

    @property
    def label(self) -> str:
        return self.name or f"{self.provider}/{self.model}"


class KeyConfig(Strict):
    name: str
    key: str | None = None
    sha256: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of 'key' or 'sha256'")
        if self.key is not None and not self.key.strip():
            raise ValueError("'key' is empty")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256):
            raise ValueError("'sha256' must be 64 hex characters")
        return self

    @property
    def digest(self) -> str:
        if self.sha256 is not None:
            return self.sha256.lower()
        assert self.key is not None  # guaranteed by _one_secret
        return hash_key(self.key)


class AlertsConfig(Strict):
    """Budget alerts (gateway/pipeline/alerts.py). ``teams.<team>.alerts`` overrides the top-level
    section field by field: each field the team sets replaces the top level's (headers
    as a whole), the others are inherited; ``webhook_url: null`` there sends none."""

    webhook_url: str | None = None  # None: alerts are logged, counted and traced, not POSTed
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.8, 1.0], min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)  # sent with each POST (auth)
    timeout_s: float = Field(default=5, gt=0)  # per POST attempt

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"https?://[^/\s]+", url):
            raise ValueError("must be an http:// or https:// URL")
        return url

    @field_validator("headers")
    @classmethod
    def _header_safe(cls, headers: dict[str, str]) -> dict[str, str]:
        # refused here rather than by the HTTP client at the first alert
        for name, value in headers.items():
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any(c in value for c in "\r\n\0"):
                raise ValueError(f"the value of {name!r} holds a line break or NUL")
        return headers

    @field_validator("thresholds")
    @classmethod
    def _fractions(cls, thresholds: list[float]) -> list[float]:
        if any(not 0 < t <= 10 for t in thresholds):
            raise ValueError("each is a fraction of the budget, within (0, 10]")
        if thresholds != sorted(set(thresholds)):
            raise ValueError("must be in increasing order, without repeats")
        return thresholds

    def over(self, base: AlertsConfig | None) -> AlertsConfig:
        """This (a team's section) laid over ``base`` (the top level's), field by field."""
        if base is None:
            return self
        return base.model_copy(update={f: getattr(self, f) for f in self.model_fields_set})


class TeamConfig(Strict):
    keys: list[KeyConfig] = Field(default_factory=list)
    models: list[str] | None = None  # None: every model
    budget: BudgetConfig | None = None
    key_budget: BudgetConfig | None = None
    rate_limit: RateLimitConfig | None = None
    key_rate_limit: RateLimitConfig | None = None
    # default output cap of a request that names none, and the ceiling of one that asks more
    max_output_tokens: int | None = Field(default=None, gt=0)
    admin: bool = False
    alerts: AlertsConfig | None = None  # over the top-level alerts, field by field


class RoutingConfig(Strict):
    retries: int = Field(default=2, ge=0)
    backoff_s: float = Field(default=0.25, ge=0)
    max_backoff_s: float = Field(
        default=8, ge=0
    )  # a longer Retry-After falls back instead of waiting
    cooldown_s: float = Field(default=30, ge=0)
    cooldown_after_failures: int = Field(default=3, ge=1)


class Config(Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: dict[str, list[DeploymentConfig]] = Field(default_factory=dict)
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    store: StoreConfig = Field(default_factory=StoreConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    redaction: RedactionConfig = Field(default_factory=RedactionConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    alerts: AlertsConfig | None = None  # budget alerts; none unless this or a team's is set


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def interpolate(
    value: Any,
    env: Mapping[str, str],
    unset: dict[tuple[int | str, ...], list[str]] | None = None,
    path: tuple[int | str, ...] = (),
    seen: frozenset[int] = frozenset(),
) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a parsed YAML tree.

    An unset ${VAR} (without a default) becomes "", and its key path is noted in `unset`,
    so that a key that must not be empty fails naming the variable. A YAML alias that
    contains itself is refused (it would nest without end)."""
    if isinstance(value, str):
        if "${" not in value:
            return value

        def sub(m: re.Match[str]) -> str:
            found = env.get(m.group(1))
            if found:
                return found
            if m.group(2) is None and unset is not None:
                unset.setdefault(path, []).append(m.group(1))
            return m.group(2) or ""

        return ENV_PATTERN.sub(sub, value)
    if isinstance(value, dict | list):
        if id(value) in seen:
            raise ConfigError(f"{format_loc(path)}: a YAML alias that contains itself")
        inner = seen | {id(value)}
        if isinstance(value, dict):
            return {k: interpolate(v, env, unset, (*path, k), inner) for k, v in value.items()}
        return [interpolate(v, env, unset, (*path, i), inner) for i, v in enumerate(value)]
    return value


def unset_note(loc: tuple[int | str, ...], unset: dict[tuple[int | str, ...], list[str]]) -> str:
    """ " (${VAR} is not set)" when the value at `loc`, or under it, came from an unset variable."""
    names = [v for path, vs in unset.items() if path[: len(loc)] == loc for v in vs]
    return "".join(f" (${{{name}}} is not set)" for name in dict.fromkeys(names))


def format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _cross_check(cfg: Config) -> list[str]:
    """What pydantic cannot see alone: references between sections and duplicate keys."""
    errors = []
    for alias, deployments in cfg.models.items():
        if not deployments:
            errors.append(f"models.{alias}: needs at least one deployment")
        for i, dep in enumerate(deployments):
            if dep.provider not in cfg.providers:
                known = ", ".join(sorted(cfg.providers)) or "none"
                errors.append(
                    f"models.{alias}[{i}].provider: unknown provider '{dep.provider}' (known: {known})"
                )
    seen: dict[str, str] = {}
    for team, tcfg in cfg.teams.items():
        for model in tcfg.models or ():
            if model not in cfg.models:
                errors.append(f"teams.{team}.models: unknown model '{model}'")
        names = set()
        for i, key in enumerate(tcfg.keys):
            where = f"teams.{team}.keys[{i}]"
            if key.name in names:
                errors.append(f"{where}.name: duplicate key name '{key.name}' in team '{team}'")
            names.add(key.name)
            if key.digest in seen:
                errors.append(f"{where}: duplicate team key (same key as {seen[key.digest]})")
            else:
                seen[key.digest] = where
    for name, prov in cfg.providers.items():
        if prov.kind not in PROVIDERS:  # a documented kind whose module is not written yet
            errors.append(
                f"providers.{name}.kind: '{prov.kind}' is not implemented in this version"
            )
        if prov.kind == "azure" and (not prov.base_url or not prov.api_version):
            errors.append(f"providers.{name}: azure needs base_url and api_version")
    return errors


def parse_config(
    data: Any, *, source: str = DEFAULT_CONFIG, env: Mapping[str, str] | None = None
) -> Config:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    unset: dict[tuple[int | str, ...], list[str]] = {}
    try:
        data = interpolate(data, os.environ if env is None else env, unset)
    except ConfigError as exc:
        raise ConfigError(f"{source}: invalid config:\n  {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid config: nested too deeply") from None
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{format_loc(e['loc'])}: {e['msg']}{unset_note(tuple(e['loc']), unset)}"
            for e in exc.errors()
        ]
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None
    problems = _cross_check(cfg)
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems))
    return cfg


def config_path(path: str | None = None) -> Path:
    return Path(path or os.environ.get("TALLYGATE_CONFIG") or DEFAULT_CONFIG)


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    p = config_path(str(path) if path else None)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{p}: nested too deeply") from None
    return parse_config(data, source=str(p), env=env)
