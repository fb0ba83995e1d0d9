"""Budgets and rate limits through the real gateway: concurrency, replicas, restarts, outages."""

from __future__ import annotations

import asyncio
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.gateway_harness import KEYS, RunningGateway, merge, running_gateway, serve_command
from tests.redis_server import RedisServer, require_redis_server
from tests.servers import free_port, run_process_server

PROMPT = [{"role": "user", "content": "alpha beta gamma delta"}]
ALPHA = {"authorization": f"Bearer {KEYS['alpha']}"}
ADMIN = {"authorization": f"Bearer {KEYS['admin']}"}


def demo_body(**extra) -> dict:
    return {"model": "demo", "messages": PROMPT, "max_tokens": 8, **extra}


async def fire(base_url: list[str], n: int, headers: dict = ALPHA) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        calls = [
            client.post(
                base_url[i % len(base_url)] + "/v1/chat/completions",
                json=demo_body(),
                headers=headers,
            )
            for i in range(n)
        ]
        return await asyncio.gather(*calls)


def check_budget_outcome(responses: list[httpx.Response], limit: Decimal, spent: Decimal) -> int:
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) + len(refused) == len(responses), {r.status_code for r in responses}
    for r in refused:
        err = r.json()["error"]
        assert err["type"] == "insufficient_quota" and err["code"] == "budget_exceeded"
        assert "team 'alpha'" in err["message"]
    charged = sum(Decimal(r.headers["x-tallygate-cost-usd"]) for r in ok)
    assert spent <= limit  # the budget held
    assert spent == charged  # and every admitted request's cost is in the ledger, no more
    return len(ok)


def per_request_cost(gw_url: str) -> Decimal:
    r = httpx.post(
        gw_url + "/v1/chat/completions",
        json=demo_body(),
        headers={"authorization": f"Bearer {KEYS['alpha2']}"},
    )
    assert r.status_code == 200
    return Decimal(r.headers["x-tallygate-cost-usd"])


def team_spent(gw_url: str) -> Decimal:
    rows = httpx.get(gw_url + "/admin/spend", params={"team": "alpha"}, headers=ADMIN).json()[
        "data"
    ]
    team = next(r for r in rows if r["key"] is None)
    return Decimal(team["spent_usd"])


def test_200_concurrent_requests_never_pass_the_budget_local(gateway_config: dict) -> None:
    # learn one request's actual cost with an unlimited team first, then size the budget at ~30
    with running_gateway(gateway_config) as gw:
        unit = per_request_cost(gw.url)
    limit = unit * 30 + unit / 2
    cfg = merge(
        gateway_config,
        {
            "teams": {"alpha": {"budget": {"limit_usd": str(limit), "period": "monthly"}}},
            "providers": {"demo": {"kind": "mock", "latency_ms": 30}},
        },
    )
    cfg["store"]["path"] = str(Path(cfg["store"]["path"]).with_name("concurrency.db"))
    with running_gateway(cfg) as gw:
        responses = asyncio.run(fire([gw.url], 200))
        spent = team_spent(gw.url)
    admitted = check_budget_outcome(responses, limit, spent)
    # reservations are larger than actual costs (max_tokens reserved), so fewer than 30 may pass
    # while others are in flight, but never more
    assert 1 <= admitted <= 30


def test_spend_survives_a_restart_on_the_local_store(gateway_config: dict) -> None:
    with running_gateway(gateway_config) as gw:
        for _ in range(3):
            assert (
                httpx.post(
                    gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA
                ).status_code
                == 200
            )
        before = team_spent(gw.url)
    assert before > 0
    with running_gateway(gateway_config) as gw:
        assert team_spent(gw.url) == before


def test_budget_exceeded_message_and_key_budget(gateway_config: dict) -> None:
    cfg = merge(
        gateway_config,
        {"teams": {"alpha": {"key_budget": {"limit_usd": "0.000001", "period": "daily"}}}},
    )
    with running_gateway(cfg) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA)
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["code"] == "budget_exceeded" and err["type"] == "insufficient_quota"
    assert "key 'alpha-app' of team 'alpha'" in err["message"]
    assert "limit $0.000001" in err["message"] and "spent $0" in err["message"]
    assert "period ends" in err["message"]


def test_admin_spend_needs_an_admin_key(gateway: RunningGateway) -> None:
    assert httpx.get(gateway.url + "/admin/spend", headers=ALPHA).status_code == 403
    assert httpx.get(gateway.url + "/admin/spend").status_code == 401
    httpx.post(gateway.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA)
    rows = httpx.get(gateway.url + "/admin/spend", headers=ADMIN).json()["data"]
    key_row = next(r for r in rows if r["key"] == "alpha-app")
    assert Decimal(key_row["spent_usd"]) > 0 and key_row["reserved_usd"] == "0"
    assert {r["team"] for r in rows} == {"alpha", "beta", "ops"}


def test_rate_limit_rpm_headers_and_429(gateway_config: dict) -> None:
    cfg = merge(gateway_config, {"teams": {"alpha": {"rate_limit": {"rpm": 2, "tpm": 100000}}}})
    with running_gateway(cfg) as gw:
        first = httpx.post(gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA)
        second = httpx.post(gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA)
        third = httpx.post(gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100000
    assert third.status_code == 429
    err = third.json()["error"]
    assert err["code"] == "rate_limit_exceeded" and err["type"] == "requests"
    assert int(third.headers["retry-after"]) >= 1
    assert third.headers["x-ratelimit-remaining-requests"] == "0"


def test_rate_limit_tpm(gateway_config: dict) -> None:
    cfg = merge(gateway_config, {"teams": {"alpha": {"key_rate_limit": {"tpm": 15}}}})
    with running_gateway(cfg) as gw:
        codes = [
            httpx.post(gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA)
            for _ in range(3)
        ]
        other_key = httpx.post(
            gw.url + "/v1/chat/completions",
            json=demo_body(),
            headers={"authorization": f"Bearer {KEYS['alpha2']}"},
        )
    assert codes[0].status_code == 200
    limited = [r for r in codes if r.status_code == 429]
    assert limited and limited[0].json()["error"]["type"] == "tokens"
    assert other_key.status_code == 200  # per-key windows: another key of the team is unaffected


@pytest.fixture
def redis() -> RedisServer:
    require_redis_server()
    with RedisServer() as server:
        yield server


def test_redis_outage_fail_closed_and_fail_open(gateway_config: dict, redis: RedisServer) -> None:
    cfg = merge(
        gateway_config, {"store": {"backend": "redis", "redis_url": redis.url, "timeout_s": 0.5}}
    )
    with running_gateway(cfg) as gw:
        assert (
            httpx.post(gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA).status_code
            == 200
        )
        redis.stop()
        r = httpx.post(gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA, timeout=20)
        ready = httpx.get(gw.url + "/readyz", timeout=20)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "store_unavailable"
    assert ready.status_code == 503
    cfg["store"]["on_error"] = "fail_open"
    with running_gateway(cfg) as gw:
        r = httpx.post(gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA, timeout=20)
    assert r.status_code == 200


def test_two_gateway_processes_share_one_redis_budget(tmp_path: Path, redis: RedisServer) -> None:
    port_a, port_b = free_port(), free_port()
    base = {
        "providers": {"demo": {"kind": "mock", "latency_ms": 30}},
        "models": {"demo": [{"provider": "demo", "model": "gpt-4o-mini"}]},
        "teams": {
            "alpha": {"keys": [{"name": "alpha-app", "key": KEYS["alpha"]}]},
            "ops": {"keys": [{"name": "ops", "key": KEYS["admin"]}], "admin": True},
        },
        "store": {"backend": "redis", "redis_url": redis.url},
        "telemetry": {"exporter": "none", "prometheus": False},
    }
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(base))
    with run_process_server(
        serve_command(tmp_path / "probe.yaml", port_a),
        port_a,
        cwd=tmp_path,
    ) as probe:
        unit = per_request_cost_key(probe.url)
    redis.flushall()
    limit = unit * 30 + unit / 2
    base["teams"]["alpha"]["budget"] = {"limit_usd": str(limit), "period": "total"}
    shared = tmp_path / "shared.yaml"
    shared.write_text(yaml.safe_dump(base))
    with (
        run_process_server(serve_command(shared, port_a), port_a, cwd=tmp_path) as a,
        run_process_server(serve_command(shared, port_b), port_b, cwd=tmp_path) as b,
    ):
        responses = asyncio.run(fire([a.url, b.url], 200))
        spent = team_spent(a.url)
        assert team_spent(b.url) == spent  # both replicas read one ledger
    admitted = check_budget_outcome(responses, limit, spent)
    assert 1 <= admitted <= 30
    # both replicas took part: whichever admitted, the one ledger held across them
    assert {r.url.port for r in responses} == {port_a, port_b}


def per_request_cost_key(url: str) -> Decimal:
    r = httpx.post(url + "/v1/chat/completions", json=demo_body(), headers=ALPHA)
    assert r.status_code == 200, r.text
    return Decimal(r.headers["x-tallygate-cost-usd"])


def test_spend_cli(gateway_config: dict, tmp_path: Path) -> None:
    import subprocess

    with running_gateway(gateway_config) as gw:
        httpx.post(gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA)
        spent = team_spent(gw.url)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(gateway_config))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "spend",
            "--config",
            str(path),
            "--team",
            "alpha",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    import json

    rows = json.loads(done.stdout)
    assert Decimal(next(r for r in rows if r["key"] is None)["spent_usd"]) == spent
    table = subprocess.run(
        [sys.executable, "-m", "gateway", "spend", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert table.returncode == 0 and "alpha-app" in table.stdout and "remaining_usd" in table.stdout


def test_a_repeated_client_request_id_is_served_and_charged_each_time(
    gateway: RunningGateway,
) -> None:
    headers = {**ALPHA, "x-request-id": "same-id-every-time"}
    responses = [
        httpx.post(gateway.url + "/v1/chat/completions", json=demo_body(), headers=headers)
        for _ in range(3)
    ]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert all(r.headers["x-request-id"] == "same-id-every-time" for r in responses)
    charged = sum(Decimal(r.headers["x-tallygate-cost-usd"]) for r in responses)
    assert team_spent(gateway.url) == charged


def test_a_store_outage_is_logged_once_not_per_request(
    gateway_config: dict, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = merge(
        gateway_config, {"store": {"backend": "redis", "redis_url": redis.url, "timeout_s": 0.3}}
    )
    with running_gateway(cfg) as gw:
        redis.stop()
        with caplog.at_level("ERROR", logger="tallygate.admission"):
            codes = [
                httpx.post(
                    gw.url + "/v1/chat/completions", json=demo_body(), headers=ALPHA, timeout=20
                ).status_code
                for _ in range(5)
            ]
    assert codes == [503] * 5
    outage_lines = [r for r in caplog.records if "store unavailable" in r.getMessage()]
    assert len(outage_lines) == 1


class SlowSpanExporter(InMemorySpanExporter):
    """Takes 0.2 s to take each span: bookkeeping that runs after the response is out
    shows up as spans missing when the client has read the last byte."""

    def export(self, spans):  # type: ignore[no-untyped-def]
        time.sleep(0.2)
        return super().export(spans)


def test_a_stream_is_settled_and_recorded_before_its_last_byte(gateway_config: dict) -> None:
    # like a whole response: the client's next request finds this one's spend settled
    # (not still reserved at its maximum) and its telemetry done
    with (
        running_gateway(gateway_config, spans=SlowSpanExporter()) as gw,
        httpx.Client(base_url=gw.url, timeout=30) as client,
    ):
        for i in range(2):
            with client.stream(
                "POST", "/v1/chat/completions", json=demo_body(stream=True), headers=ALPHA
            ) as r:
                assert r.status_code == 200
                assert b"data: [DONE]" in b"".join(r.iter_bytes())
            # no request in between: what is there now was there before the last byte
            servers = [s for s in gw.spans.get_finished_spans() if s.kind == SpanKind.SERVER]
            assert len(servers) == i + 1, f"stream {i}: recorded after its end"
            rows = client.get("/admin/spend", params={"team": "alpha"}, headers=ADMIN).json()
            row = next(x for x in rows["data"] if x["key"] == "alpha-app")
            assert row["reserved_usd"] == "0" and Decimal(row["spent_usd"]) > 0
