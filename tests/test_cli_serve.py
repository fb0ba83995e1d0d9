"""`python -m gateway serve` as users run it: the example config, the demo model, SIGTERM drain."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import threading
from decimal import Decimal
from pathlib import Path

import httpx
import openai

from tests.fake_upstream import FakeUpstream, Stream, chat_answer
from tests.gateway_harness import serve_command
from tests.servers import LOOPBACK, free_port, run_process_server, wait_until

REPO = Path(__file__).resolve().parent.parent


def serve(tmp_path: Path, port: int, config: Path | None = None, env: dict | None = None):
    if config is None:
        config = tmp_path / "config.yaml"
        shutil.copy(REPO / "config.yaml", config)
    cmd = serve_command(config, port)
    return run_process_server(cmd, port, env=env or {}, cwd=tmp_path)


def test_example_config_serves_the_demo_model(tmp_path: Path) -> None:
    port = free_port()
    with serve(tmp_path, port) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-demo", max_retries=0) as c:
            reply = c.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "ping pong"}]
            )
            chunks = list(
                c.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": "a b c"}], stream=True
                )
            )
        assert reply.choices[0].message.content == "ping pong"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "a b c"
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 200 and ready.json()["store"] is True
    assert server.returncode == 0
    assert f"listening on http://127.0.0.1:{port}" in server.stderr
    assert "store: local" in server.stderr and "telemetry: none" in server.stderr
    lines = [json.loads(x) for x in server.stdout.splitlines() if x.startswith("{")]
    assert [x["model"] for x in lines] == ["demo", "demo"]
    assert all(x["team"] == "demo" and x["status"] == 200 for x in lines)
    # a quiet start: no exporter errors for the collector that is not there
    assert "Traceback" not in server.stderr and "Failed to export" not in server.stderr
    assert (tmp_path / "tallygate.db").exists()


def refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return False
    except OSError:
        return True


def test_sigterm_drains_in_flight_requests(tmp_path: Path, fake_upstream: FakeUpstream) -> None:
    # The upstream sends half its answer, then waits for the test: the request is in
    # flight until we let it finish, after the gateway has begun its drain.
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "finish me"}]}
    answer = json.dumps(chat_answer(body).json)
    half = len(answer) // 2
    json_headers = {"content-type": "application/json"}
    fake_upstream.enqueue(
        Stream([answer[:half], answer[half:]], gate=True, done=False, headers=json_headers)
    )
    config = tmp_path / "slow.yaml"
    config.write_text(
        f"providers: {{up: {{kind: openai, base_url: '{fake_upstream.base_url}', api_key: k}}}}\n"
        "models: {gpt-4o-mini: [{provider: up, model: gpt-4o-mini}]}\n"
        "teams: {t: {keys: [{name: k, key: sk-t}]}}\n"
        "telemetry: {exporter: none}\n"
    )
    port = free_port()
    result: dict = {}
    with serve(tmp_path, port, config) as server:

        def call() -> None:
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                headers={"authorization": "Bearer sk-t"},
                json=body,
                timeout=20,
            )
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=call)
        t.start()
        wait_until(lambda: fake_upstream.sent_chunks == 1, what="the request is in flight")
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: refuses_connections(port), within=10, what="the drain to begin")
        assert result == {}  # still in flight when the listener closed
        fake_upstream.release()
        t.join(20)
        server.proc.wait(20)
    assert result["status"] == 200
    assert result["body"]["choices"][0]["message"]["content"] == "finish me"
    assert server.returncode == 0


def test_two_workers_share_the_ledger_and_the_metrics(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    shutil.copy(REPO / "config.yaml", config)
    cmd = serve_command(config, port, "--workers", "2")
    with run_process_server(cmd, port, cwd=tmp_path) as server, httpx.Client(timeout=20) as h:
        costs = []
        for _ in range(20):
            # a new connection each time, so both workers take requests
            r = httpx.post(
                f"{server.url}/v1/chat/completions",
                headers={"authorization": "Bearer sk-demo"},
                json={"model": "demo", "messages": [{"role": "user", "content": "count me"}]},
            )
            assert r.status_code == 200
            costs.append(Decimal(r.headers["x-tallygate-cost-usd"]))

        def scrapes() -> set[str]:
            return {
                line
                for _ in range(4)
                for line in h.get(f"{server.url}/metrics").text.splitlines()
                if line.startswith("tallygate_requests_total{")
                and 'http_response_status_code="200"' in line
            }

        def summed() -> bool:
            seen = scrapes()
            return len(seen) == 1 and next(iter(seen)).endswith(" 20.0")

        # a worker writes its counts for the others' scrapes once a second
        # (gateway/telemetry/prometheus.py FLUSH_EVERY_S): the sum shows within that
        wait_until(summed, within=5, what="both workers' counts in every scrape")
        final = scrapes()
        spend = h.get(
            f"{server.url}/admin/spend", headers={"authorization": "Bearer sk-admin-demo"}
        ).json()
    # every scrape, whichever worker answers it, shows the sum over both workers
    assert len(final) == 1 and final.pop().endswith(" 20.0")
    team = next(r for r in spend["data"] if r["key"] is None and r["team"] == "demo")
    assert Decimal(team["spent_usd"]) == sum(costs)
    assert len([x for x in server.stdout.splitlines() if x.startswith("{")]) == 20
