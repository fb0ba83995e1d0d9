"""bench.scaleout's pieces that need no load: the configurations it runs, CPU summed over a
process tree, the cleanup of a tree, the slow mock's answer, wrk's errors and the ratios.
No figure is timed here (that is bench.scaleout's job)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import run as bench
from bench import scaleout
from bench.mock_upstream import COMPLETION_BODY, MODELS_BODY
from gateway.config import load_config

REDIS_URL = "redis://127.0.0.1:7001/0"
BURN_S = 0.3  # CPU the child spends before it says so


def env_for(cfg: scaleout.Configuration, logdir: Path) -> dict[str, str]:
    return scaleout.config_env(cfg, logdir, REDIS_URL, 9001, 4318)


@pytest.mark.parametrize("cfg", scaleout.CONFIGURATIONS, ids=lambda c: c.name)
def test_each_configuration_loads_with_its_workers_and_store(
    cfg: scaleout.Configuration, tmp_path: Path
) -> None:
    config = load_config(scaleout.CONFIG, env=env_for(cfg, tmp_path))
    assert config.server.workers == cfg.workers
    assert config.store.backend == cfg.backend
    assert config.store.path == str(tmp_path / f"tallygate-{cfg.name}.db")
    assert config.store.redis_url == REDIS_URL
    assert config.teams["ops"].admin and config.teams["ops"].keys[0].key == scaleout.ADMIN_KEY


def test_the_configurations_are_the_ones_issue_16_names(tmp_path: Path) -> None:
    shapes = {(c.name, c.workers, c.backend) for c in scaleout.CONFIGURATIONS}
    assert shapes == {
        ("w1-local", 1, "local"),
        ("w2-local", 2, "local"),
        ("w1-redis", 1, "redis"),
        ("w2-redis", 2, "redis"),
        ("w1-cluster", 1, "redis_cluster"),
    }
    paths = {env_for(c, tmp_path)["BENCH_DB"] for c in scaleout.CONFIGURATIONS}
    assert len(paths) == len(scaleout.CONFIGURATIONS)  # no two share a SQLite file


def test_every_feature_is_on_as_in_the_main_bench_config(tmp_path: Path) -> None:
    env = env_for(scaleout.CONFIGURATIONS[0], tmp_path)
    scaled, main = load_config(scaleout.CONFIG, env=env), load_config(bench.CONFIG, env=env)
    for section in ("providers", "models", "routing", "pricing", "redaction", "telemetry"):
        assert getattr(scaled, section) == getattr(main, section), section
    assert scaled.teams["bench"] == main.teams["bench"]  # the same budgets and rate limits
    assert scaled.store.on_error == main.store.on_error


def test_configs_picks_a_subset_and_always_keeps_the_base() -> None:
    assert [c.name for c in scaleout.parse_configs(None)] == [
        c.name for c in scaleout.CONFIGURATIONS
    ]
    assert [c.name for c in scaleout.parse_configs("w1-cluster, w2-local")] == [
        "w1-local",
        "w2-local",
        "w1-cluster",
    ]
    with pytest.raises(ValueError, match="w3-local"):
        scaleout.parse_configs("w1-redis,w3-local")


# --- process trees -------------------------------------------------------------------

PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
print(child.pid, flush=True)
child.wait()
"""
CHILD = f"""
import time
while time.process_time() < {BURN_S}:
    pass
print("burnt", flush=True)
time.sleep(120)
"""


def state(pid: int) -> str | None:
    """/proc's state letter of ``pid``; None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.fixture
def parent_and_child(tmp_path: Path) -> Iterator[tuple[bench.Server, int]]:
    """A parent process whose child has spent BURN_S of CPU and now sleeps."""
    cmd = [sys.executable, "-c", PARENT, CHILD]
    parent = bench.spawn("parent", cmd, scaleout.UNPINNED, 0, tmp_path)
    try:
        deadline = time.monotonic() + 30
        while "burnt" not in parent.stdout.read_text():
            assert time.monotonic() < deadline, parent.stderr_tail()
            time.sleep(0.02)
        yield parent, int(parent.stdout.read_text().split()[0])
    finally:
        scaleout.stop_tree(parent)


def test_cpu_is_summed_over_the_children_too(parent_and_child: tuple[bench.Server, int]) -> None:
    parent, child = parent_and_child
    cpu = scaleout.gateway_cpu(parent.pid)
    assert set(cpu) == {parent.pid, child}
    assert cpu[child] >= BURN_S - 0.02  # /proc counts in clock ticks
    assert sum(cpu.values()) >= cpu[parent.pid] + BURN_S - 0.02
    assert bench.cpu_seconds(parent.pid) == pytest.approx(sum(cpu.values()), abs=0.02)


def test_stopping_a_tree_leaves_no_child_behind(
    parent_and_child: tuple[bench.Server, int],
) -> None:
    # SIGINT ends the parent only: its child would live on, eating CPU, without the kill
    parent, child = parent_and_child
    scaleout.stop_tree(parent)
    assert not parent.alive()
    deadline = time.monotonic() + 10
    while state(child) not in (None, "Z"):
        assert time.monotonic() < deadline, f"child {child} is still {state(child)}"
        time.sleep(0.02)


# --- the slow mock -------------------------------------------------------------------


def test_the_slow_mock_answers_the_mock_upstreams_completion(tmp_path: Path) -> None:
    port = bench.free_port()
    cmd = [sys.executable, "-m", "bench.scaleout", "--serve-mock", str(port),
           "--upstream-latency-ms", "5"]  # fmt: skip
    mock = bench.spawn("mock", cmd, scaleout.UNPINNED, port, tmp_path)
    try:
        assert bench.wait_port(mock, 30), mock.stderr_tail()
        base = f"http://127.0.0.1:{port}/v1"
        assert bench.http("POST", f"{base}/chat/completions", bench.chat_body()) == (
            200,
            COMPLETION_BODY,
        )
        assert bench.http("GET", f"{base}/models") == (200, MODELS_BODY)
    finally:
        mock.stop()


# --- wrk's errors and the report -----------------------------------------------------


def wrk_result(**extra: Any) -> dict[str, Any]:
    errors = dict.fromkeys(("connect", "read", "write", "status", "timeout"), 0)
    return {"requests": 100, **{f"errors_{k}": v for k, v in errors.items()}, **extra}


def test_wrk_errors_flag_any_failure() -> None:
    assert scaleout.wrk_errors(wrk_result()) == {}
    assert scaleout.wrk_errors(wrk_result(errors_status=3)) == {"errors_status": 3}
    assert scaleout.wrk_errors(wrk_result(requests=0)) == {"requests": 0}
    # counted statuses: anything but 200 (a 202 is no chat completion)
    counted = wrk_result(status={"200": 90, "202": 10})
    assert scaleout.wrk_errors(counted, count_status=True) == {"statuses": counted["status"]}
    assert scaleout.wrk_errors(wrk_result(status={"200": 100}), count_status=True) == {}


def run_row(name: str, r: int, c: int, cpu: float, rps: float = 100.0) -> dict[str, Any]:
    return {
        "target": name, "round": r, "concurrency": c, "mode": "plain", "rps": rps,
        "p50_us": 25000, "p99_us": 40000, "cpu_ms_per_req": cpu, "cpu_util": 0.5,
        "processes": 1, "busy_processes": 1, "redis_cpu_ms_per_req": None, "loadavg": 1.0,
    }  # fmt: skip


def test_ratios_are_paired_per_round_against_one_worker_local() -> None:
    runs = []
    for c in scaleout.CONCURRENCY:
        runs += [
            run_row("w1-local", 0, c, 1.0, 200.0),
            run_row("w1-local", 1, c, 2.0, 100.0),
            run_row("w2-local", 0, c, 1.0, 300.0),  # 1.0x
            run_row("w2-local", 1, c, 2.2, 150.0),  # 1.1x
            run_row("w1-redis", 0, c, 1.3),  # 1.3x
            run_row("w1-redis", 1, c, 2.6),  # 1.3x
            run_row("w1-cluster", 0, c, 1.5),
            run_row("w1-cluster", 1, c, 3.0),
        ]
    summary = scaleout.summarize(runs, ["w1-local", "w2-local", "w1-redis", "w1-cluster"])
    for c in scaleout.CONCURRENCY:
        assert "cpu_ratio" not in summary["w1-local"][c]
        w2, redis, cluster = (summary[n][c] for n in ("w2-local", "w1-redis", "w1-cluster"))
        assert w2["cpu_ratio"] == pytest.approx(1.05)
        assert w2["cpu_ratio_rounds"] == pytest.approx([1.0, 1.1])
        assert w2["rps_ratio"] == pytest.approx(1.5)
        assert (w2["goal"], w2["met"]) == (1.15, True)
        assert redis["cpu_ratio"] == pytest.approx(1.3)
        assert (redis["goal"], redis["met"]) == (1.20, False)
        assert cluster["cpu_ratio"] == pytest.approx(1.5) and cluster["met"] is None
    report = {
        "meta": {
            "utc": "T", "commit": "abc", "dirty": False, "rounds": 2, "duration_s": 6.0,
            "quick": False, "upstream_latency_ms": 20.0, "redis_version": "7", "hiredis": False,
            "loadavg": "1.00", "cpus": 2,
        },
        "summary": summary,
        "runs": runs,
        "checks": {"w1-local": {"spend_before_usd": 0, "spend_after_usd": 1e-5, "sqlite_bytes": 1}},
    }  # fmt: skip
    table = scaleout.markdown(report)
    assert "| w2-local | 8 |" in table and "≤ 1.15x ✅" in table and "≤ 1.20x ❌" in table
