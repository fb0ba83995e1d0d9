"""Budget alerts: when a team's or a key's spend in its period first reaches a threshold
of its budget, one alert, across every process and replica on the store.

After each settle (gateway/pipeline/admission.py) ``Alerts.observe`` gets the balances settle
read. Each process remembers, per scope and period, how many thresholds are known to
have fired, so a request that crosses nothing costs a dict lookup and one integer
comparison per limited scope. On a new crossing the store decides who sends
(``Store.claim_once``, keyed by scope, period and threshold); the winner logs one line
(logger ``tallygate.alerts``), counts ``budget_alert`` in ``tallygate.events``, adds a
``tallygate.budget_alert`` event to the request's SERVER span and queues the webhook
POST. A bounded queue and a few sender tasks with retries deliver it: a dead or slow
webhook never slows a request, and what does not fit is dropped, logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from gateway.config import AlertsConfig, Config
from gateway.pipeline.spend import iso
from gateway.telemetry import semconv as gen
from policies.stores.base import BudgetScope, SpendRow, Store, StoreError
from pricing.cost import NANO_PER_USD, format_usd

if TYPE_CHECKING:
    from gateway.pipeline.context import RequestContext
    from gateway.telemetry.facade import Telemetry

log = logging.getLogger("tallygate.alerts")

EVENT = "budget_alert"  # tallygate.events {tallygate.event} and the span event's suffix
QUEUE_SIZE = 1000  # alerts waiting for the webhook; more are dropped (logged, counted)
SENDERS = 4  # concurrent POSTs: one slow webhook call does not hold up the rest
ATTEMPTS = 5  # per alert: the first POST and up to 4 retries
BACKOFF_S = 1.0  # before the first retry; doubles, with jitter, up to MAX_BACKOFF_S
MAX_BACKOFF_S = 30.0
DRAIN_S = 10.0  # at shutdown, at most this long (and server.drain_timeout_s) to deliver
# A dated claim outlives its period by this much: a replica whose clock runs behind
# still finds it, rather than sending again.
CLAIM_GRACE_S = 86400.0
PPM = 1_000_000  # thresholds in parts per million: integer comparisons with nano-USD


@dataclass(frozen=True, slots=True)
class Policy:
    """One team's effective alerts section, with the thresholds in parts per million."""

    config: AlertsConfig
    ppm: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Alert:
    team: str
    key: str | None  # None: the team's budget
    threshold: float
    spent_nano: int
    limit_nano: int
    period: str  # daily | weekly | monthly | total
    period_key: str
    period_end: float | None

    @property
    def scope(self) -> str:
        return "team" if self.key is None else "key"

    def text(self) -> str:
        who = f"team '{self.team}'"
        if self.key is not None:
            who = f"key '{self.key}' of team '{self.team}'"
        if self.period_end is None:
            period = "total budget"
            ends = ""
        else:
            period = f"{self.period} budget"
            ends = f"; the period {self.period_key} ends {iso(self.period_end)}"
        return (
            f"Budget alert: {who} has reached {self.threshold * 100:g}% of its {period}: "
            f"spent ${format_usd(self.spent_nano)} of ${format_usd(self.limit_nano)}{ends}."
        )

    def message(self) -> dict[str, Any]:
        """The webhook's JSON: Slack-compatible (``text``) and the facts, USD as strings."""
        return {
            "text": self.text(),
            "team": self.team,
            "key": self.key,
            "threshold": self.threshold,
            "spent_usd": format_usd(self.spent_nano),
            "limit_usd": format_usd(self.limit_nano),
            "period": self.period,
            "period_key": self.period_key,
            "period_end": iso(self.period_end),
        }


@dataclass(slots=True)
class _Delivery:
    url: str
    headers: dict[str, str]
    timeout_s: float
    body: dict[str, Any]
    attempt: int = 0


@dataclass
class Alerts:
    """Budget alerts of one gateway process. ``start`` runs the senders; ``close`` drains."""

    store: Store
    telemetry: Telemetry
    sent: int = 0  # webhook POSTs answered 2xx
    failed: int = 0  # alerts given up after ATTEMPTS, or undeliverable (4xx)
    dropped: int = 0  # alerts that found the queue full, or were left at shutdown
    _queue: asyncio.Queue[_Delivery] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    _senders: list[asyncio.Task[None]] = field(default_factory=list)
    _retries: set[asyncio.Task[None]] = field(default_factory=set)
    _client: httpx.AsyncClient | None = None
    _config: Config | None = None
    _policies: dict[str, Policy | None] = field(default_factory=dict)
    # scope id → (period key, thresholds known fired): the hot path's only state
    _known: dict[str, tuple[str, int]] = field(default_factory=dict)
    _closing: bool = False

    def start(self) -> None:
        # A client of its own, not instrumented: webhook calls make no spans.
        self._client = httpx.AsyncClient(
            follow_redirects=False, limits=httpx.Limits(max_keepalive_connections=SENDERS)
        )
        self._senders = [
            asyncio.get_running_loop().create_task(self._send_loop(), name=f"tallygate-alerts-{i}")
            for i in range(SENDERS)
        ]

    async def close(self, timeout_s: float) -> None:
        """Deliver what is queued within ``timeout_s`` (at most DRAIN_S), retrying without
        backoff from now on; then stop. What is left is logged and counted as dropped."""
        self._closing = True
        await self._requeue_retries()
        if self._senders:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(timeout_s, DRAIN_S)):
                    await self._queue.join()
            for task in self._senders:
                task.cancel()
            await asyncio.gather(*self._senders, return_exceptions=True)
            self._senders = []
        await self._requeue_retries()
        left = self._queue.qsize()
        if left:
            self.dropped += left
            log.error("%d budget alert(s) not delivered before shutdown", left)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _requeue_retries(self) -> None:
        """Retries waiting out their backoff go back in the queue now."""
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)

    # after settle: what is newly crossed

    async def observe(
        self,
        config: Config,
        ctx: RequestContext,
        scopes: list[BudgetScope],
        rows: list[SpendRow],
    ) -> None:
        """The thresholds the settled spend of each limited scope newly reached."""
        for scope, row in zip(scopes, rows, strict=True):
            limit = scope.limit_nano
            if not limit:  # unlimited, or a zero budget: nothing to reach
                continue
            policy = self._policy(config, scope.group)
            if policy is None:
                continue
            known = self._known.get(scope.scope_id)
            done = known[1] if known is not None and known[0] == scope.period_key else 0
            if done < len(policy.ppm) and row.spent_nano * PPM >= limit * policy.ppm[done]:
                try:
                    await self._crossed(config, ctx, scope, row, policy, done)
                except Exception:  # an alert never fails the request it rode on
                    log.exception("budget alert for %s failed", scope.scope_id)

    def _policy(self, config: Config, team: str) -> Policy | None:
        if config is not self._config:  # a reloaded config: thresholds may differ
            self._config, self._policies, self._known = config, {}, {}
        if team not in self._policies:
            self._policies[team] = policy_of(config, team)
        return self._policies[team]

    async def _crossed(
        self,
        config: Config,
        ctx: RequestContext,
        scope: BudgetScope,
        row: SpendRow,
        policy: Policy,
        done: int,
    ) -> None:
        assert scope.limit_nano is not None
        ttl = None
        if scope.period_end is not None:
            ttl = max(scope.period_end - time.time(), 0) + CLAIM_GRACE_S
        for i in range(done, len(policy.ppm)):
            if row.spent_nano * PPM < scope.limit_nano * policy.ppm[i]:
                break
            threshold = policy.config.thresholds[i]
            try:
                won = await self.store.claim_once(claim_key(scope, threshold), scope.group, ttl)
            except StoreError as exc:
                # not remembered: the next settle of this scope asks again
                log.warning("budget alert for %s not claimed: %s", scope.scope_id, exc)
                return
            self._known[scope.scope_id] = (scope.period_key, i + 1)
            if won:
                self._fire(ctx, alert_of(config, scope, row, threshold), policy.config)

    def _fire(self, ctx: RequestContext, alert: Alert, policy: AlertsConfig) -> None:
        log.warning("%s", alert.text())
        # tallygate.events {tallygate.event=budget_alert, tallygate.budget.scope, .threshold}
        self.telemetry.count(
            EVENT, ctx, **{"budget.scope": alert.scope, "budget.threshold": alert.threshold}
        )
        span_event(ctx, alert)
        if policy.webhook_url is None:
            return
        url, headers, timeout = policy.webhook_url, dict(policy.headers), policy.timeout_s
        if not self.enqueue(_Delivery(url, headers, timeout, alert.message())):
            self.telemetry.count("budget_alert_dropped", ctx)

    # delivery

    def enqueue(self, delivery: _Delivery) -> bool:
        """Queue a POST; False (logged, counted) when QUEUE_SIZE already wait."""
        try:
            self._queue.put_nowait(delivery)
        except asyncio.QueueFull:
            self.dropped += 1
            log.error(
                "budget alert dropped: %d alerts already wait for the webhook (%s)",
                QUEUE_SIZE,
                delivery.body["text"],
            )
            return False
        return True

    async def _send_loop(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._send(delivery)
            except Exception:  # a sender never dies of one alert
                log.exception("budget alert delivery failed")
            finally:
                self._queue.task_done()

    async def _send(self, delivery: _Delivery) -> None:
        assert self._client is not None
        delivery.attempt += 1
        problem = ""
        try:
            response = await self._client.post(
                delivery.url,
                json=delivery.body,
                headers=delivery.headers,
                timeout=delivery.timeout_s,
            )
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
        else:
            if response.is_success:
                self.sent += 1
                return
            problem = f"HTTP {response.status_code}"
            if response.status_code != 429 and response.status_code < 500:
                delivery.attempt = ATTEMPTS  # the webhook refuses it: retrying cannot help
        if delivery.attempt >= ATTEMPTS:
            self.failed += 1
            log.error(
                "budget alert not delivered to the webhook after %d attempt(s) (%s): %s",
                delivery.attempt,
                problem,
                delivery.body["text"],
            )
            return
        if self._closing:  # shutting down: no backoff, ATTEMPTS still bounds it
            self.enqueue(delivery)
            return
        # The retry waits off the senders, so the next alerts are not held behind it.
        wait = min(MAX_BACKOFF_S, BACKOFF_S * 2 ** (delivery.attempt - 1))
        task = asyncio.get_running_loop().create_task(
            self._retry(delivery, wait * random.uniform(0.5, 1))
        )
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, delivery: _Delivery, wait_s: float) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # at shutdown: requeue at once
            await asyncio.sleep(wait_s)
        self.enqueue(delivery)


def policy_of(config: Config, team: str) -> Policy | None:
    """The team's alerts section over the top level's, or None when alerts are off."""
    tcfg = config.teams.get(team)
    own = tcfg.alerts if tcfg is not None else None
    effective = own.over(config.alerts) if own is not None else config.alerts
    if effective is None:
        return None
    return Policy(effective, tuple(round(t * PPM) for t in effective.thresholds))


def claim_key(scope: BudgetScope, threshold: float) -> str:
    """One claim per budget, period and threshold: e.g. ``team:search:2026-11:0.8``."""
    return f"{scope.scope_id}:{scope.period_key}:{threshold:g}"


def alert_of(config: Config, scope: BudgetScope, row: SpendRow, threshold: float) -> Alert:
    team = config.teams.get(scope.group)
    key_prefix = f"key:{scope.group}/"  # policies.budget.key_scope_id
    is_key = scope.scope_id.startswith(key_prefix)
    budget = None if team is None else (team.key_budget if is_key else team.budget)
    return Alert(
        team=scope.group,
        key=scope.scope_id[len(key_prefix) :] if is_key else None,
        threshold=threshold,
        spent_nano=row.spent_nano,
        limit_nano=scope.limit_nano or 0,
        period=budget.period if budget is not None else "total",
        period_key=scope.period_key,
        period_end=scope.period_end,
    )


def span_event(ctx: RequestContext, alert: Alert) -> None:
    """A ``tallygate.budget_alert`` event on the request's SERVER span, when the span is
    still open and records events."""
    span = getattr(ctx.trace, "span", None)
    add_event = getattr(span, "add_event", None)
    if add_event is None or not span.is_recording():  # type: ignore[union-attr]
        return
    with contextlib.suppress(Exception):  # telemetry never fails a request
        add_event(
            f"tallygate.{EVENT}",
            {
                gen.TALLYGATE_TEAM: alert.team,
                gen.TALLYGATE_KEY: alert.key or "",
                "tallygate.budget.scope": alert.scope,
                "tallygate.budget.threshold": alert.threshold,
                "tallygate.budget.spent_usd": alert.spent_nano / NANO_PER_USD,
                "tallygate.budget.limit_usd": alert.limit_nano / NANO_PER_USD,
                "tallygate.budget.period": alert.period_key,
            },
        )
