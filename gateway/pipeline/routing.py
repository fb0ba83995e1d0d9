"""Routing: a model alias → its deployments in try order, with weights and cooldowns."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.config import Config, DeploymentConfig, RoutingConfig

RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504, 529})  # 529: Anthropic's overloaded


@dataclass(slots=True)
class Deployment:
    alias: str
    index: int
    config: DeploymentConfig
    label: str
    timeout_s: float
    # health, per process: consecutive failures and the time the cooldown ends
    failures: int = 0
    cooldown_until: float = 0.0

    @property
    def provider(self) -> str:
        return self.config.provider

    @property
    def model(self) -> str:
        return self.config.model


@dataclass(slots=True)
class Route:
    alias: str
    deployments: list[Deployment] = field(default_factory=list)


class Router:
    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy: RoutingConfig = config.routing
        self._clock = clock
        self._rng = rng or random.Random()
        self.routes: dict[str, Route] = {}
        for alias, deps in config.models.items():
            route = Route(alias)
            for i, dep in enumerate(deps):
                timeout = dep.timeout_s or config.providers[dep.provider].timeout_s
                route.deployments.append(Deployment(alias, i, dep, dep.label, timeout))
            self.routes[alias] = route

    def get(self, alias: str) -> Route | None:
        return self.routes.get(alias)

    def plan(self, route: Route) -> list[Deployment]:
        """Deployments in the order to try them: weighted runs shuffled by weight, healthy
        ones first; deployments in cooldown last (better a slim chance than none)."""
        ordered: list[Deployment] = []
        group: list[Deployment] = []
        for dep in route.deployments:
            if dep.config.weight is not None:
                group.append(dep)
                continue
            if group:
                ordered.extend(self._weighted_order(group))
                group = []
            ordered.append(dep)
        if group:
            ordered.extend(self._weighted_order(group))
        now = self._clock()
        healthy = [d for d in ordered if d.cooldown_until <= now]
        cooling = [d for d in ordered if d.cooldown_until > now]
        return healthy + cooling

    def _weighted_order(self, group: list[Deployment]) -> list[Deployment]:
        """Sampling without replacement in proportion to weight (Efraimidis-Spirakis keys)."""
        if len(group) == 1:
            return group
        rng = self._rng
        return sorted(
            group, key=lambda d: rng.random() ** (1.0 / (d.config.weight or 1.0)), reverse=True
        )

    def record_success(self, dep: Deployment) -> None:
        dep.failures = 0

    def record_failure(self, dep: Deployment) -> None:
        dep.failures += 1
        if dep.failures >= self.policy.cooldown_after_failures:
            dep.cooldown_until = self._clock() + self.policy.cooldown_s
            dep.failures = 0

    def backoff_s(self, retry: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based), or None: don't wait, fall back.

        Exponential with full jitter; a Retry-After is honoured if not longer than max_backoff_s."""
        if retry_after is not None:
            return retry_after if retry_after <= self.policy.max_backoff_s else None
        base = self.policy.backoff_s * (2 ** (retry - 1))
        return float(min(self.policy.max_backoff_s, base * (0.5 + self._rng.random() / 2)))


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # HTTP-date form: rare from LLM providers; fall back to our own backoff
    if seconds != seconds:  # "nan" is junk too, not "retry at once"
        return None
    return max(0.0, seconds)
