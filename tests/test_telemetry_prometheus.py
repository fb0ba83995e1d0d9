"""gateway.telemetry.prometheus through Telemetry: the /metrics exposition, and one scrape that
sums every worker's counts (multiprocess mode)."""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.telemetry.facade import (
    Telemetry,
    TelemetryConfig,
    prepare_multiprocess,
)
from tests.telemetry_helpers import (
    KNOWN,
    Harness,
    harnesses,
    request,
    run_ok,
    serve,
)


@pytest.fixture
async def telemetry() -> AsyncIterator[Callable[..., Harness]]:
    async with harnesses() as make:
        yield make


# --- Prometheus ----------------------------------------------------------------------------------


async def test_prometheus_exposition(telemetry: Callable[..., Harness]) -> None:
    h = telemetry()
    run_ok(h, request())
    exposition = h.tel.metrics_text()
    assert exposition is not None
    body, content_type = exposition
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert (
        'gen_ai_client_operation_duration_seconds_bucket{error_type="",gen_ai_operation_name="chat",'
        'gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o-mini",'
        'gen_ai_response_model="gpt-4o-mini-2024-07-18",le="0.01",'
        'server_address="api.openai.com",server_port="443"}'
    ) in text
    assert re.search(
        r'gen_ai_client_token_usage_bucket\{.*gen_ai_token_type="input".*le="16\.0".*\} 0\.0', text
    )
    assert re.search(
        r'gen_ai_client_token_usage_bucket\{.*gen_ai_token_type="input".*le="64\.0".*\} 1\.0', text
    )
    assert re.search(
        r'tallygate_requests_total\{.*http_response_status_code="200".*tallygate_team="search"\} 1\.0',
        text,
    )
    assert re.search(r"tallygate_cost_usd_total\{.*\} 8\.55e-06", text)
    assert "tallygate_overhead_duration_seconds_bucket" in text


async def test_prometheus_off(telemetry: Callable[..., Harness]) -> None:
    h = telemetry(TelemetryConfig(exporter="none", prometheus=False))
    run_ok(h, request())
    assert h.tel.metrics_text() is None


def test_prepare_multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert prepare_multiprocess(1) == {}
    stale = tmp_path / "counter_123.db"
    stale.write_bytes(b"old")
    assert prepare_multiprocess(4, str(tmp_path)) == {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    assert not stale.exists()
    fresh = prepare_multiprocess(2)["PROMETHEUS_MULTIPROC_DIR"]
    assert Path(fresh).is_dir()
    Path(fresh).rmdir()


def _worker(requests: int) -> None:
    """A uvicorn worker, in short: its own process, its own Telemetry, some requests."""

    async def main() -> None:
        tel = Telemetry.create(
            TelemetryConfig(exporter="none", capture_content="none"),
            service_version="t",
            access_log=io.StringIO(),
            workers=2,
            known_models=KNOWN,
        )
        for _ in range(requests):
            serve(tel, request())
        await tel.shutdown()

    asyncio.run(main())


async def test_a_scrape_merges_all_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = prepare_multiprocess(2, str(tmp_path / "prom"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spawn = multiprocessing.get_context("spawn")  # as uvicorn starts its workers
    workers = [spawn.Process(target=_worker, args=(n,)) for n in (3, 4)]
    for w in workers:
        w.start()
    for w in workers:
        await asyncio.to_thread(w.join, 60)
        assert w.exitcode == 0

    # whichever worker answers the scrape shows everyone's counts
    tel = Telemetry.create(
        TelemetryConfig(exporter="none"), service_version="t", access_log=io.StringIO(), workers=2
    )
    exposition = tel.metrics_text()
    await tel.shutdown()
    assert exposition is not None
    text = exposition[0].decode()
    requests = re.search(
        r'tallygate_requests_total\{[^}]*tallygate_team="search"[^}]*\} (\S+)', text
    )
    assert requests is not None and float(requests.group(1)) == 7.0
    count = re.search(r"gen_ai_client_operation_duration_seconds_count\{[^}]*\} (\S+)", text)
    assert count is not None and float(count.group(1)) == 7.0
    tokens = re.search(
        r'gen_ai_client_token_usage_sum\{[^}]*gen_ai_token_type="input"[^}]*\} (\S+)', text
    )
    assert tokens is not None and float(tokens.group(1)) == 7 * 21


# --- multiprocess mode writes deferred values: the same exposition once flushed ----------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402

from gateway.telemetry.prometheus import MetricSpec, PrometheusMetrics  # noqa: E402

SPECS = (
    MetricSpec("t.count", "counter", "{request}", "c", ("team",)),
    MetricSpec("t.seconds", "histogram", "s", "h", ("team",), buckets=(0.01, 0.1, 1.0)),
)
VALUES = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0]) | st.floats(0, 5),
    ),
    max_size=30,
)


@settings(max_examples=50, deadline=None)
@given(values=VALUES)
def test_deferred_records_flush_to_what_immediate_ones_write(values, tmp_path_factory) -> None:
    directory = tmp_path_factory.mktemp("prom")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        deferred = PrometheusMetrics(SPECS, workers=2)
    immediate = PrometheusMetrics(SPECS, workers=1)
    assert deferred.deferred and not immediate.deferred
    for team, v in values:
        for metrics in (deferred, immediate):
            metrics.instruments["t.count"].record(1, {"team": team})
            metrics.instruments["t.seconds"].record(v, {"team": team})
    deferred.flush()
    assert samples(deferred) == samples(immediate)
    deferred.flush()  # nothing pending: nothing counted twice
    assert samples(deferred) == samples(immediate)
    assert any("t_seconds_bucket" in line for line in samples(immediate)) == bool(values)


def samples(metrics: PrometheusMetrics) -> list[str]:
    text = generate_latest(metrics._registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]
