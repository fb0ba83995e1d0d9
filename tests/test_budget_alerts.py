"""Budget alerts through the real gateway: a webhook receiver on loopback records the POSTs;
each threshold fires once per period per budget, across processes and Redis replicas;
a dead or slow webhook never holds a request up. And the spend forecast."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.config import parse_config
from gateway.pipeline import alerts as alerts_module
from gateway.pipeline.alerts import Alert, Alerts, span_event
from gateway.pipeline.context import Principal, RequestContext
from gateway.pipeline.spend import forecast
from gateway.telemetry.facade import Telemetry, TelemetryConfig
from policies.config import BudgetConfig, StoreConfig
from policies.stores.base import BudgetScope, SpendRow
from policies.stores.local import LocalStore
from tests.gateway_harness import KEYS, RunningGateway, running_gateway, serve_command
from tests.redis_server import RedisServer, require_redis_server
from tests.servers import ServerThread, free_port, run_process_server, wait_until

ALPHA = {"authorization": f"Bearer {KEYS['alpha']}"}
ALPHA_CI = {"authorization": f"Bearer {KEYS['alpha2']}"}
ADMIN = {"authorization": f"Bearer {KEYS['admin']}"}
HOOK_SECRET = "Bearer hook-secret-5555"
USD = 10**9


# ---- the webhook receiver ----------------------------------------------------------------


@dataclass
class Post:
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    """An ASGI webhook that records each POST on arrival. ``hold``: answer nothing until
    ``release`` (at most ``hold_s``); ``statuses``: the next answers' status codes."""

    hold: bool = False
    hold_s: float = 5.0
    statuses: list[int] = field(default_factory=list)
    arrived: list[Post] = field(default_factory=list)
    answered: int = 0
    released: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"]
                await send({"type": f"{kind}.complete"})
                if kind == "lifespan.shutdown":
                    return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.arrived.append(Post(headers, json.loads(raw)))
        if self.hold:
            await asyncio.to_thread(self.released.wait, self.hold_s)
        status = self.statuses.pop(0) if self.statuses else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        self.answered += 1

    def thresholds(self) -> list[tuple[str | None, float]]:
        return [(p.body["key"], p.body["threshold"]) for p in self.arrived]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    hook = Receiver()
    with ServerThread(hook) as server:
        try:
            yield hook, server.url + "/hooks/budget"
        finally:
            hook.released.set()  # no POST left hanging at shutdown


# ---- a gateway whose requests cost exactly what they reserve --------------------------


PROMPT = [{"role": "user", "content": "alpha beta gamma delta"}]
BODY = {"model": "demo", "messages": PROMPT, "max_tokens": 1}


def alerts_config(tmp_path: Path, store: dict | None = None) -> dict[str, Any]:
    """The mock answers "ok" (one token) and the request reserves one output token, so a
    request's reservation is its cost: spend can reach a limit exactly."""
    return {
        "providers": {"demo": {"kind": "mock", "text": "ok"}},
        "models": {"demo": [{"provider": "demo", "model": "gpt-4o-mini"}]},
        "teams": {
            "alpha": {
                "keys": [
                    {"name": "alpha-app", "key": KEYS["alpha"]},
                    {"name": "alpha-ci", "key": KEYS["alpha2"]},
                ]
            },
            "ops": {"keys": [{"name": "ops", "key": KEYS["admin"]}], "admin": True},
        },
        "store": store or {"backend": "local", "path": str(tmp_path / "alerts.db")},
        "telemetry": {"exporter": "none", "prometheus": False},
    }


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Decimal:
    """What one request costs (USD), from a gateway with no budget."""
    with running_gateway(alerts_config(tmp_path_factory.mktemp("probe"))) as gw:
        r = httpx.post(gw.base_url + "/chat/completions", json=BODY, headers=ALPHA)
        assert r.status_code == 200, r.text
        cost = Decimal(r.headers["x-tallygate-cost-usd"])
    assert cost > 0
    return cost


def chat(gw: RunningGateway, headers: dict[str, str] = ALPHA) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", json=BODY, headers=headers, timeout=30)


def next_midnight() -> str:
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    return f"{tomorrow.isoformat()}T00:00:00Z"


def event_points(gw: RunningGateway) -> list[Any]:
    points = []
    for rm in gw.metrics.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "tallygate.events":
                    points += [
                        p
                        for p in m.data.data_points
                        if p.attributes.get("tallygate.event") == "budget_alert"
                    ]
    return points


# ---- team and key budgets --------------------------------------------------------------


def test_each_team_threshold_is_posted_once(
    tmp_path: Path,
    unit: Decimal,
    receiver: tuple[Receiver, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    hook, url = receiver
    config = alerts_config(tmp_path)
    config["alerts"] = {"webhook_url": url, "headers": {"Authorization": HOOK_SECRET}}
    config["teams"]["alpha"]["budget"] = {"limit_usd": str(unit * 10), "period": "daily"}
    caplog.set_level(logging.INFO, logger="tallygate.alerts")
    with running_gateway(config) as gw:
        seen = []
        for n in range(1, 11):
            assert chat(gw).status_code == 200
            expected = [t for t in (0.5, 0.8, 1.0) if n >= t * 10]
            wait_until(lambda e=expected: len(hook.arrived) == len(e), what=f"{expected}")
            seen.append(len(hook.arrived))
        assert seen == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3]  # each on the request that reached it
        refused = chat(gw)
        assert refused.status_code == 429  # the budget is spent: no request, no alert
        assert {p.attributes["tallygate.budget.threshold"] for p in event_points(gw)} == {
            "0.5",
            "0.8",
            "1.0",
        }
        spend = httpx.get(gw.url + "/admin/spend", params={"team": "alpha"}, headers=ADMIN)
    assert hook.thresholds() == [(None, 0.5), (None, 0.8), (None, 1.0)]  # after the drain too
    first = hook.arrived[0]
    assert first.headers["authorization"] == HOOK_SECRET
    assert first.headers["content-type"] == "application/json"
    assert first.body == {
        "text": first.body["text"],
        "team": "alpha",
        "key": None,
        "threshold": 0.5,
        "spent_usd": first.body["spent_usd"],
        "limit_usd": first.body["limit_usd"],
        "period": "daily",
        "period_key": datetime.now(UTC).date().isoformat(),
        "period_end": next_midnight(),
    }
    spent, limit = Decimal(first.body["spent_usd"]), Decimal(first.body["limit_usd"])
    assert (spent, limit) == (unit * 5, unit * 10)
    assert "team 'alpha' has reached 50% of its daily budget" in first.body["text"]
    assert f"${first.body['spent_usd']} of ${first.body['limit_usd']}" in first.body["text"]
    assert Decimal(hook.arrived[2].body["spent_usd"]) == unit * 10
    lines = [r.getMessage() for r in caplog.records if r.name == "tallygate.alerts"]
    assert len(lines) == 3 and all("Budget alert: team 'alpha'" in line for line in lines)
    # the same spend, read by the report: nothing left, so it has run out now
    team_row = next(r for r in spend.json()["data"] if r["key"] is None)
    assert team_row["forecast"] == "exhausted" and team_row["exhausted_at"] is not None


def test_key_budgets_alert_per_key_with_the_team_override(
    tmp_path: Path, unit: Decimal, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    config = alerts_config(tmp_path)
    config["alerts"] = {"webhook_url": url, "thresholds": [0.25]}
    # the team's section replaces the thresholds only; the webhook is inherited
    config["teams"]["alpha"]["alerts"] = {"thresholds": [0.5, 1.0]}
    config["teams"]["alpha"]["key_budget"] = {"limit_usd": str(unit * 4), "period": "monthly"}
    with running_gateway(config) as gw:
        for _ in range(4):
            assert chat(gw).status_code == 200
        for _ in range(2):
            assert chat(gw, ALPHA_CI).status_code == 200
        wait_until(lambda: len(hook.arrived) == 3)
    assert sorted(hook.thresholds(), key=str) == [
        ("alpha-app", 0.5),
        ("alpha-app", 1.0),
        ("alpha-ci", 0.5),
    ]
    app_full = next(p.body for p in hook.arrived if p.body["threshold"] == 1.0)
    assert app_full["period"] == "monthly" and Decimal(app_full["limit_usd"]) == unit * 4
    assert (
        "key 'alpha-app' of team 'alpha' has reached 100% of its monthly budget"
        in (app_full["text"])
    )


def test_no_alerts_section_no_alerts(
    tmp_path: Path, unit: Decimal, receiver: tuple[Receiver, str]
) -> None:
    hook, _ = receiver
    config = alerts_config(tmp_path)
    config["teams"]["alpha"]["budget"] = {"limit_usd": str(unit * 2), "period": "daily"}
    with running_gateway(config) as gw:
        assert chat(gw).status_code == 200 and chat(gw).status_code == 200
        assert gw.gateway.alerts.sent == 0 and event_points(gw) == []
    assert hook.arrived == []


# ---- a dead or slow webhook --------------------------------------------------------------


def test_a_slow_webhook_does_not_hold_requests(
    tmp_path: Path, unit: Decimal, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    hook.hold = True  # every POST hangs (up to 5 s) until released
    config = alerts_config(tmp_path)
    config["alerts"] = {"webhook_url": url, "timeout_s": 30}
    config["teams"]["alpha"]["budget"] = {"limit_usd": str(unit * 10), "period": "daily"}
    with running_gateway(config) as gw:
        for _ in range(5):
            assert chat(gw).status_code == 200
        wait_until(lambda: len(hook.arrived) == 1, what="the 0.5 alert reaching the webhook")
        for _ in range(5):  # the webhook is still hanging on the first alert meanwhile
            assert chat(gw).status_code == 200
        wait_until(lambda: len(hook.arrived) == 3, what="the 0.8 and 1.0 alerts")
        assert hook.answered == 0  # every request above finished while no POST had
        hook.released.set()
        wait_until(lambda: hook.answered == 3)
        assert gw.gateway.alerts.sent == 3
    assert sorted(hook.thresholds()) == [(None, 0.5), (None, 0.8), (None, 1.0)]


def test_a_dead_webhook_costs_only_the_alerts(
    tmp_path: Path, unit: Decimal, caplog: pytest.LogCaptureFixture
) -> None:
    config = alerts_config(tmp_path)
    config["alerts"] = {"webhook_url": f"http://127.0.0.1:{free_port()}/hook"}  # closed
    config["teams"]["alpha"]["budget"] = {"limit_usd": str(unit * 4), "period": "daily"}
    caplog.set_level(logging.INFO, logger="tallygate.alerts")
    with running_gateway(config) as gw:
        assert [chat(gw).status_code for _ in range(5)] == [200, 200, 200, 200, 429]
        alerts = gw.gateway.alerts
    # at shutdown the retries ran without backoff, then gave up: logged, counted
    assert alerts.sent == 0 and alerts.failed == 3 and alerts.dropped == 0
    gave_up = [r for r in caplog.records if "not delivered to the webhook" in r.getMessage()]
    assert len(gave_up) == 3 and "ConnectError" in gave_up[0].getMessage()


def test_a_failing_webhook_is_retried(
    tmp_path: Path, unit: Decimal, receiver: tuple[Receiver, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hook, url = receiver
    hook.statuses = [503, 500]  # then 200
    monkeypatch.setattr(alerts_module, "BACKOFF_S", 0.01)
    config = alerts_config(tmp_path)
    config["alerts"] = {"webhook_url": url, "thresholds": [0.5]}
    config["teams"]["alpha"]["budget"] = {"limit_usd": str(unit * 2), "period": "daily"}
    with running_gateway(config) as gw:
        assert chat(gw).status_code == 200
        wait_until(lambda: gw.gateway.alerts.sent == 1, what="the third attempt")
    assert hook.thresholds() == [(None, 0.5)] * 3  # the same alert, until it was taken


def test_a_webhook_that_refuses_is_not_retried(
    tmp_path: Path, unit: Decimal, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    hook.statuses = [400]
    config = alerts_config(tmp_path)
    config["alerts"] = {"webhook_url": url, "thresholds": [0.5]}
    config["teams"]["alpha"]["budget"] = {"limit_usd": str(unit * 2), "period": "daily"}
    with running_gateway(config) as gw:
        assert chat(gw).status_code == 200
        wait_until(lambda: gw.gateway.alerts.failed == 1)
    assert len(hook.arrived) == 1


# ---- once per period, per budget, across processes: at the alerts level ----------------


def telemetry() -> Telemetry:
    return Telemetry.create(
        TelemetryConfig(exporter="none", capture_content="none"), service_version="test"
    )


def request() -> RequestContext:
    ctx = RequestContext("req_1", "POST", "/v1/chat/completions", "chat")
    ctx.principal = Principal("alpha", "alpha-app")
    return ctx


async def test_once_per_period_and_across_processes(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    config = parse_config(
        {
            "alerts": {"webhook_url": url, "thresholds": [0.5, 1.0]},
            "teams": {"alpha": {"budget": {"limit_usd": 10, "period": "daily"}}},
        },
        env={},
    )
    store_config = StoreConfig(path=str(tmp_path / "shared.db"))
    stores = [LocalStore(store_config, processes=2) for _ in range(2)]  # two workers, one file
    senders = [Alerts(store, telemetry()) for store in stores]
    for store, alerts in zip(stores, senders, strict=True):
        await store.start()
        alerts.start()

    def seen(alerts: Alerts, day: str, spent_usd: int) -> Any:
        end = datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() + 86400
        scope = BudgetScope("team:alpha", "alpha", day, end, 10 * USD)
        row = SpendRow("team:alpha", day, spent_usd * USD, 0)
        return alerts.observe(config, request(), [scope], [row])

    try:
        await seen(senders[0], "2026-11-26", 6)  # crosses 0.5
        await seen(senders[1], "2026-11-26", 7)  # the other process: already sent
        await seen(senders[0], "2026-11-26", 8)  # known here: not even asked again
        await seen(senders[1], "2026-11-26", 10)  # crosses 1.0
        await seen(senders[0], "2026-11-27", 5)  # the next day: a new period, alerts again
        await seen(senders[1], "2026-11-27", 10)
        restarted = Alerts(stores[0], telemetry())  # a new process forgets, the store not
        restarted.start()
        senders.append(restarted)
        await seen(restarted, "2026-11-27", 10)
    finally:
        for alerts in senders:
            await alerts.close(5)
        for store in stores:
            await store.close()
    assert sorted((p.body["period_key"], p.body["threshold"]) for p in hook.arrived) == [
        ("2026-11-26", 0.5),
        ("2026-11-26", 1.0),
        ("2026-11-27", 0.5),
        ("2026-11-27", 1.0),
    ]
    first = next(p.body for p in hook.arrived if p.body["period_key"] == "2026-11-26")
    assert first["threshold"] == 0.5 and first["spent_usd"] == "6"
    assert first["period_end"] == "2026-11-27T00:00:00Z"


async def test_a_store_outage_defers_the_alert(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    config = parse_config(
        {
            "alerts": {"webhook_url": url, "thresholds": [0.5]},
            "teams": {"alpha": {"budget": {"limit_usd": 10, "period": "total"}}},
        },
        env={},
    )
    store = LocalStore(StoreConfig(path=str(tmp_path / "s.db")))
    alerts = Alerts(store, telemetry())
    alerts.start()
    scope = BudgetScope("team:alpha", "alpha", "total", None, 10 * USD)
    row = SpendRow("team:alpha", "total", 5 * USD, 0)
    await alerts.observe(config, request(), [scope], [row])  # not started: StoreError
    await store.start()
    try:
        await alerts.observe(config, request(), [scope], [row])  # asked again: sent
    finally:
        await alerts.close(5)
        await store.close()
    assert [p.body["period_end"] for p in hook.arrived] == [None]
    assert "of its total budget: spent $5 of $10." in hook.arrived[0].body["text"]


def test_the_alert_is_an_event_on_a_recording_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = provider.get_tracer("test").start_span("POST /v1/chat/completions")
    ctx = request()
    ctx.trace = type("Trace", (), {"span": span})()
    alert = Alert("alpha", "alpha-app", 0.8, 8 * USD, 10 * USD, "daily", "2026-11-26", None)
    span_event(ctx, alert)
    span.end()
    span_event(ctx, alert)  # ended: nothing (and no SDK warning)
    (event,) = exporter.get_finished_spans()[0].events
    assert event.name == "tallygate.budget_alert"
    assert event.attributes is not None
    assert event.attributes["tallygate.key"] == "alpha-app"
    assert event.attributes["tallygate.budget.threshold"] == 0.8
    assert event.attributes["tallygate.budget.scope"] == "key"


def test_the_server_span_carries_the_alert_event(
    tmp_path: Path, unit: Decimal, receiver: tuple[Receiver, str]
) -> None:
    _, url = receiver
    config = alerts_config(tmp_path)
    config["alerts"] = {"webhook_url": url, "thresholds": [0.5]}
    config["teams"]["alpha"]["budget"] = {"limit_usd": str(unit * 2), "period": "daily"}
    with running_gateway(config) as gw:
        assert chat(gw).status_code == 200
        wait_until(lambda: any(s.kind.name == "SERVER" for s in gw.spans.get_finished_spans()))
    (server,) = [s for s in gw.spans.get_finished_spans() if s.kind.name == "SERVER"]
    assert [e.name for e in server.events] == ["tallygate.budget_alert"]


# ---- two replicas on one Redis -----------------------------------------------------------


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    require_redis_server()
    with RedisServer() as server:
        yield server


def test_two_replicas_on_redis_post_each_threshold_once(
    tmp_path: Path, unit: Decimal, redis: RedisServer, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    config = alerts_config(tmp_path, {"backend": "redis", "redis_url": redis.url})
    config["alerts"] = {"webhook_url": url, "thresholds": [0.2, 0.5, 0.8, 1.0]}
    config["teams"]["alpha"]["budget"] = {"limit_usd": str(unit * 30), "period": "daily"}
    path = tmp_path / "replicas.yaml"
    path.write_text(yaml.safe_dump(config))
    port_a, port_b = free_port(), free_port()
    with (
        run_process_server(serve_command(path, port_a), port_a, cwd=tmp_path) as a,
        run_process_server(serve_command(path, port_b), port_b, cwd=tmp_path) as b,
    ):
        codes = asyncio.run(burst([a.url, b.url], 60))
        assert codes <= {200, 429}
        for i in range(40):  # then one at a time, until the budget is spent to the last unit
            r = httpx.post((a.url, b.url)[i % 2] + "/v1/chat/completions", json=BODY, headers=ALPHA)
            if r.status_code == 429:
                break
        spent = next(
            r["spent_usd"]
            for r in httpx.get(a.url + "/admin/spend", headers=ADMIN).json()["data"]
            if r["team"] == "alpha" and r["key"] is None
        )
        assert Decimal(spent) == unit * 30
    # both stopped (SIGTERM drains their alerts): every threshold reached exactly once
    assert sorted(t for _, t in hook.thresholds()) == [0.2, 0.5, 0.8, 1.0]
    assert "Budget alert" in a.stderr + b.stderr


async def burst(urls: list[str], n: int) -> set[int]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=n)) as client:
        calls = [
            client.post(urls[i % len(urls)] + "/v1/chat/completions", json=BODY, headers=ALPHA)
            for i in range(n)
        ]
        return {r.status_code for r in await asyncio.gather(*calls)}


# ---- the forecast ------------------------------------------------------------------------


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[arg-type, misc]


def daily(limit_usd: int, now: float) -> tuple[BudgetScope, BudgetConfig]:
    budget = BudgetConfig(limit_usd=Decimal(limit_usd), period="daily")
    day = datetime.fromtimestamp(now, UTC).date()
    end = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() + 86400
    return BudgetScope("team:alpha", "alpha", day.isoformat(), end, limit_usd * USD), budget


def test_forecast_burn_rate_and_when_it_runs_out() -> None:
    noon = ts(2026, 11, 26, 12)
    scope, budget = daily(16, noon)
    # $12 in 12 hours: $1/h; $4 left (less $1 reserved: $3) → 15:00
    assert forecast(scope, budget, 12 * USD, 1 * USD, noon) == {
        "burn_usd_per_hour": "1",
        "exhausted_at": "2026-11-26T15:00:00Z",
        "forecast": "runs_out",
    }
    scope, budget = daily(24, noon)  # $0.5/h; $18 left → 36 h: after midnight
    assert forecast(scope, budget, 6 * USD, 0, noon) == {
        "burn_usd_per_hour": "0.5",
        "exhausted_at": None,
        "forecast": "outlasts_period",
    }
    assert forecast(scope, budget, 0, 0, noon)["forecast"] == "no_spend"
    assert forecast(scope, budget, 24 * USD, 0, noon) == {
        "burn_usd_per_hour": "2",
        "exhausted_at": "2026-11-26T12:00:00Z",
        "forecast": "exhausted",
    }


def test_forecast_periods_start_on_the_calendar() -> None:
    now = ts(2027, 1, 3, 0)  # two days into January; a Sunday, 6 days into ISO week 53
    monthly = BudgetConfig(limit_usd=Decimal(1000), period="monthly")
    scope = BudgetScope("team:alpha", "alpha", "2027-01", ts(2027, 2, 1), 1000 * USD)
    assert forecast(scope, monthly, 48 * USD, 0, now)["burn_usd_per_hour"] == "1"
    weekly = BudgetConfig(limit_usd=Decimal(1000), period="weekly")
    scope = BudgetScope("team:alpha", "alpha", "2026-W53", ts(2027, 1, 4), 1000 * USD)
    assert forecast(scope, weekly, 144 * USD, 0, now)["burn_usd_per_hour"] == "1"
    total = BudgetConfig(limit_usd=Decimal(10), period="total")
    scope = BudgetScope("team:alpha", "alpha", "total", None, 10 * USD)
    assert forecast(scope, total, USD, 0, now) == {
        "burn_usd_per_hour": None,
        "exhausted_at": None,
        "forecast": None,
    }


def test_spend_cli_shows_the_forecast(tmp_path: Path, unit: Decimal) -> None:
    config = alerts_config(tmp_path)
    config["teams"]["alpha"]["budget"] = {"limit_usd": str(unit * 2), "period": "daily"}
    with running_gateway(config) as gw:
        assert chat(gw).status_code == 200 and chat(gw).status_code == 200
        api = httpx.get(gw.url + "/admin/spend", headers=ADMIN).json()["data"]
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = [sys.executable, "-m", "gateway", "spend", "--config", str(path)]
    done = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {(r["team"], r["key"]): r for r in json.loads(done.stdout)}
    team = rows[("alpha", None)]
    assert team["forecast"] == "exhausted" and team["exhausted_at"] is not None
    assert Decimal(team["burn_usd_per_hour"]) > 0
    assert rows[("alpha", "alpha-app")]["forecast"] is None  # no key budget: no forecast
    api_team = next(r for r in api if r["team"] == "alpha" and r["key"] is None)
    assert api_team["forecast"] == "exhausted"
    table = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[-2:] == ["burn_usd_per_hour", "exhausted_at"]
    alpha = next(line.split() for line in lines if line.split()[:2] == ["alpha", "-"])
    assert alpha[-1].endswith("Z")  # when it ran out: now
