"""Issue 16's scale-out figures: workers 1 and 2, the local store, Redis and Redis Cluster, same run.

    python -m bench.scaleout [--rounds R] [--duration S] [--quick] [--configs LIST]
    python -m bench.scaleout --render bench/results/scaleout-<stamp>.json

Starts a mock upstream that answers a chat completion 20 ms after it arrives (a loop
timer: bench.mock_upstream's handler behind a delay, ``--upstream-latency-ms``),
bench.run's OTLP receiver, a redis-server and a 3-master Redis Cluster (tests/redis_server.py,
temp dirs, free loopback ports), then measures one gateway per configuration with every
feature on (bench/config.scaleout.yaml: bench/config.bench.yaml with the workers and the
store chosen per configuration; budgets and rate limits never reached):

    w1-local    workers 1, local store (the in-memory ledger, flushed to SQLite)
    w2-local    workers 2, local store (one SQLite file shared by the workers)
    w1-redis    workers 1, store.backend redis
    w2-redis    workers 2, store.backend redis
    w1-cluster  workers 1, store.backend redis_cluster

Only the gateway being measured runs: each (round, configuration) starts its gateway,
checks it uses its store (one request; /admin/spend shows it; for Redis, the store was
flushed before and now holds tallygate keys; for local, the SQLite file exists), warms it
up (every status must be 200), runs wrk (bench/post.lua) at c=8 and c=64, and stops it.
The configurations take turns, the order rotated each round. Any wrk error (a status
above 399, a socket error, a timeout) stops the run.

Pinning: the driver (wrk, the mock, the OTLP receiver and the redis-servers: what stands
for other machines) runs on core 1; the gateway is not pinned, so ``workers: 2`` can use
both cores. The figure compared is CPU ms per request, summed over every process of the
gateway (the supervisor and each worker, from /proc), so RPS is indicative only.

Reports medians over rounds (RPS, p50, p99, CPU ms/req, the cores the gateway kept busy,
and Redis's own CPU ms/req), and each configuration's CPU/req and RPS over w1-local's,
paired per round, then the median, against issue 16's goals (w2-local ≤ 1.15x,
w1-redis ≤ 1.20x). Writes bench/results/scaleout-<UTC timestamp>.json and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import run as bench
from bench.mock_upstream import Handler, HttpProtocol, MockUpstream

CONFIG = bench.BENCH_DIR / "config.scaleout.yaml"
ADMIN_KEY = "sk-bench-admin"  # the config's default for $BENCH_ADMIN_KEY
UPSTREAM_LATENCY_MS = 20.0  # issue 16's table: "a mock upstream answering after 20 ms"
CONCURRENCY = (8, 64)
WARMUP_S = 2.0
WARMUP_C = 16
BASE = "w1-local"
GOALS = {"w2-local": 1.15, "w1-redis": 1.20}  # CPU/req over w1-local's, issue 16's "done when"
# a core number past the last: bench.run.pinned leaves the gateway unpinned
UNPINNED = str(os.cpu_count() or 1)
# --pin-gateway: every gateway process on this core (its workers share it), so a second
# worker does not compete with the driver's core: the per-request cost of workers alone
GATEWAY_CPU = [UNPINNED]
CHAT = "/v1/chat/completions"


class BenchError(RuntimeError):
    """The run cannot go on: what would be measured is not what the table says."""


@dataclass(frozen=True)
class Configuration:
    name: str
    workers: int
    backend: str  # store.backend: local | redis | redis_cluster


CONFIGURATIONS = (
    Configuration("w1-local", 1, "local"),
    Configuration("w2-local", 2, "local"),
    Configuration("w1-redis", 1, "redis"),
    Configuration("w2-redis", 2, "redis"),
    Configuration("w1-cluster", 1, "redis_cluster"),
)


def parse_configs(spec: str | None) -> list[Configuration]:
    """``--configs``: a comma list of configuration names (w1-local always included: the
    ratios are to it); default all. Raises ValueError."""
    if not spec:
        return list(CONFIGURATIONS)
    by_name = {c.name: c for c in CONFIGURATIONS}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}: choose from {', '.join(by_name)}")
    return [c for c in CONFIGURATIONS if c.name in names or c.name == BASE]


def config_env(
    cfg: Configuration, logdir: Path, redis_url: str, upstream_port: int, otlp_port: int
) -> dict[str, str]:
    """The variables bench/config.scaleout.yaml reads, for ``cfg``."""
    return {
        "BENCH_WORKERS": str(cfg.workers),
        "BENCH_STORE": cfg.backend,
        # its own file per configuration: w1-local's flusher and w2-local's workers never meet
        "BENCH_DB": str(logdir / f"tallygate-{cfg.name}.db"),
        "BENCH_REDIS_URL": redis_url,
        "BENCH_UPSTREAM_PORT": str(upstream_port),
        "BENCH_KEY": bench.KEY,
        "BENCH_ADMIN_KEY": ADMIN_KEY,
        "BENCH_OTLP": f"http://127.0.0.1:{otlp_port}",
    }


# --- the slow mock -----------------------------------------------------------------


class SlowMock:
    """bench.mock_upstream's handler, but a chat completion is answered ``latency_ms`` after
    it arrives (a timer on the loop, never a sleep): a model's think time, so a gateway
    holds c requests in flight as it would in production."""

    def __init__(self, latency_ms: float) -> None:
        self.latency = latency_ms / 1000.0
        self.answer: Handler = MockUpstream()

    def __call__(self, conn: HttpProtocol, method: bytes, url: bytes, body: bytes) -> None:
        if url.split(b"?", 1)[0].endswith(b"/chat/completions"):
            conn.call_later(self.latency, lambda: self.answer(conn, method, url, body))
        else:
            self.answer(conn, method, url, body)


def serve_mock(port: int, latency_ms: float) -> None:
    from bench.mock_upstream import run

    run(SlowMock(latency_ms), "127.0.0.1", port, "mock upstream")


# --- the stores --------------------------------------------------------------------


@dataclass
class Stores:
    """The redis-server and the Redis Cluster, when a chosen configuration needs them."""

    redis: Any = None  # tests.redis_server.RedisServer
    cluster: Any = None  # tests.redis_server.RedisCluster
    pids: dict[str, list[int]] = field(default_factory=dict)  # backend -> redis-server pids

    def nodes(self, backend: str) -> list[Any]:
        if backend == "redis":
            return [self.redis]
        if backend == "redis_cluster":
            return list(self.cluster.nodes)
        return []

    def url(self, backend: str) -> str:
        if backend == "redis":
            return str(self.redis.url)
        if backend == "redis_cluster":
            return str(self.cluster.url)
        return "redis://127.0.0.1:6379/0"  # unused by the local store

    def flush(self, backend: str) -> None:
        for node in self.nodes(backend):
            node.flushall()


def redis_pid(node: Any) -> int:
    found = re.search(rb"process_id:(\d+)", node.reply("INFO", "server"))
    if not found:
        raise BenchError(f"redis on port {node.port}: INFO server gave no process_id")
    return int(found.group(1))


def pin_to_driver(pid: int) -> None:
    """The redis-servers stand for other machines: on the driver's core, like wrk."""
    cpu = int(bench.DRIVER_CPU)
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(pid, {cpu})


@contextlib.contextmanager
def stores_for(configs: list[Configuration]) -> Iterator[Stores]:
    from tests.redis_server import RedisCluster, RedisServer

    backends = {c.backend for c in configs}
    stores = Stores()
    try:
        if "redis" in backends:
            stores.redis = RedisServer().start()
        if "redis_cluster" in backends:
            stores.cluster = RedisCluster().start()
        for backend in backends - {"local"}:
            stores.pids[backend] = [redis_pid(n) for n in stores.nodes(backend)]
            for pid in stores.pids[backend]:
                pin_to_driver(pid)
        yield stores
    finally:
        for server in (stores.cluster, stores.redis):
            if server is not None:
                server.stop()


def redis_version(stores: Stores) -> str | None:
    node = stores.redis or (stores.cluster.nodes[0] if stores.cluster else None)
    found = node and re.search(rb"redis_version:(\S+)", node.reply("INFO", "server"))
    return found.group(1).decode() if found else None


def redis_keys(stores: Stores, backend: str, limit: int = 20) -> list[str]:
    """Up to ``limit`` tallygate keys on the backend's nodes (SCAN, each node its own)."""
    import redis

    keys: list[str] = []
    for node in stores.nodes(backend):
        client = redis.Redis.from_url(node.url)
        try:
            keys += [k.decode() for k in client.scan_iter(match="tallygate:*", count=1000)]
        finally:
            client.close()
    return sorted(keys)[:limit]


# --- one gateway ---------------------------------------------------------------------


@dataclass
class Setup:
    logdir: Path
    mock: bench.Server
    receiver: bench.Server
    stores: Stores
    spawned: list[bench.Server] = field(default_factory=list)


def start_gateway(setup: Setup, cfg: Configuration) -> bench.Server:
    """``python -m gateway serve`` for ``cfg``, unpinned; raises BenchError unless it answers."""
    port = bench.free_port()
    env = {
        **config_env(
            cfg, setup.logdir, setup.stores.url(cfg.backend), setup.mock.port, setup.receiver.port
        ),
        **bench.tiktoken_cache(),
    }
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(CONFIG),
           "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    gw = bench.spawn(cfg.name, cmd, GATEWAY_CPU[0], port, setup.logdir, env)
    setup.spawned.append(gw)
    if not bench.wait_port(gw, 60):
        raise BenchError(f"{cfg.name} did not start listening:\n{gw.stderr_tail()}")
    # with workers: 2 the supervisor listens before its workers answer
    deadline = time.monotonic() + 60
    while (status := bench.http("POST", gateway_url(gw), bench.chat_body())[0]) != 200:
        if time.monotonic() > deadline or not gw.alive():
            raise BenchError(
                f"{cfg.name}: a chat completion answered {status}:\n{gw.stderr_tail()}"
            )
        time.sleep(0.2)
    return gw


def stop_tree(gw: bench.Server) -> None:
    """SIGINT to a server (a gateway's supervisor stops its workers); then any of its
    processes still there are killed, so no stray worker eats CPU while the next
    configuration runs."""
    if not gw.alive():
        return
    started = {pid: start_time(pid) for pid in bench.tree_pids(gw.pid)[1:]}
    gw.stop()
    for pid, when in started.items():
        if when is not None and start_time(pid) == when:  # the same process, not a reused pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks after boot, /proc/PID/stat field 22); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except OSError:
        return None


def gateway_url(gw: bench.Server, path: str = CHAT) -> str:
    return f"http://127.0.0.1:{gw.port}{path}"


def team_spend(gw: bench.Server) -> float:
    """The bench team's spent + reserved USD, from /admin/spend (a lease shows as reserved)."""
    status, body = bench.http("GET", gateway_url(gw, "/admin/spend?team=bench"), key=ADMIN_KEY)
    if status != 200:
        raise BenchError(f"/admin/spend answered {status}: {body[:300]!r}")
    [row] = [r for r in json.loads(body)["data"] if r["team"] == "bench" and r["key"] is None]
    return float(row["spent_usd"]) + float(row["reserved_usd"])


def check_store(setup: Setup, cfg: Configuration, gw: bench.Server) -> dict[str, Any]:
    """One request moves the team's spend in /admin/spend, and the store under test holds
    it: tallygate keys in a Redis flushed before the gateway started, or the SQLite file."""
    before = team_spend(gw)
    status, body = bench.http("POST", gateway_url(gw), bench.chat_body())
    if status != 200:
        raise BenchError(f"{cfg.name}: the check request answered {status}: {body[:300]!r}")
    deadline = time.monotonic() + 5
    while (after := team_spend(gw)) <= before:
        if time.monotonic() > deadline:
            raise BenchError(f"{cfg.name}: /admin/spend did not move ({before} -> {after})")
        time.sleep(0.05)
    check: dict[str, Any] = {"spend_before_usd": before, "spend_after_usd": after}
    if cfg.backend == "local":
        db = setup.logdir / f"tallygate-{cfg.name}.db"
        while not db.exists() and time.monotonic() < deadline:  # w1's flusher: ~20 ms
            time.sleep(0.05)
        if not db.exists():
            raise BenchError(f"{cfg.name}: no SQLite file at {db}")
        check["sqlite_bytes"] = db.stat().st_size
    else:
        keys = redis_keys(setup.stores, cfg.backend)
        if not keys:
            raise BenchError(f"{cfg.name}: no tallygate keys in {cfg.backend} after a request")
        check["redis_keys"] = keys
    return check


# --- load ------------------------------------------------------------------------------


@contextlib.contextmanager
def counting_status() -> Iterator[None]:
    """post.lua counts every response's status while $BENCH_COUNT_STATUS is 1 (wrk
    inherits the env); it costs wrk CPU, so the warm-up only."""
    saved = os.environ.get("BENCH_COUNT_STATUS")
    os.environ["BENCH_COUNT_STATUS"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("BENCH_COUNT_STATUS", None)
        else:
            os.environ["BENCH_COUNT_STATUS"] = saved


def wrk_errors(res: dict[str, Any], count_status: bool = False) -> dict[str, Any]:
    """What went wrong in one wrk run: its error counts (statuses above 399, socket
    errors, timeouts), any status but 200 when counted, no request at all."""
    errors: dict[str, Any] = {k: v for k, v in res.items() if k.startswith("errors_") and v}
    statuses = res.get("status") or {}
    if count_status and set(statuses) != {"200"}:
        errors["statuses"] = statuses
    if not res.get("requests"):
        errors["requests"] = 0
    return errors


def wrk(url: str, concurrency: int, duration: float, count_status: bool = False) -> dict[str, Any]:
    """bench.run's wrk on the driver core; raises BenchError on any error, so no failure is
    timed as a success."""
    with counting_status() if count_status else contextlib.nullcontext():
        res = bench.run_wrk(url, concurrency, duration)
    errors = wrk_errors(res, count_status)
    if errors:
        raise BenchError(f"wrk c={concurrency} {url}: {res['requests']} requests, errors {errors}")
    return res


def cpu_by_pid(pids: list[int]) -> dict[int, float]:
    """utime + stime (s) of each pid, from /proc (no descendants: the caller lists them)."""
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / bench.CLK_TCK
    return out


def gateway_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of every process of the gateway ``pid``: the supervisor and each worker."""
    return cpu_by_pid(bench.tree_pids(pid))


def one_run(
    setup: Setup, cfg: Configuration, gw: bench.Server, c: int, duration: float, r: int
) -> dict[str, Any]:
    redis_pids = setup.stores.pids.get(cfg.backend, [])
    cpu0, redis0 = gateway_cpu(gw.pid), cpu_by_pid(redis_pids)
    res = wrk(gateway_url(gw), c, duration)
    cpu1, redis1 = gateway_cpu(gw.pid), cpu_by_pid(redis_pids)
    seconds = res["duration_us"] / 1e6
    per_process = {pid: cpu1[pid] - cpu0.get(pid, 0.0) for pid in cpu1}
    cpu = sum(per_process.values())
    redis_cpu = sum(redis1.get(p, 0.0) - redis0.get(p, 0.0) for p in redis_pids)
    res.update(
        round=r, mode="plain", concurrency=c, target=cfg.name, loadavg=os.getloadavg()[0],
        cpu_ms_per_req=1000 * cpu / res["requests"], cpu_util=cpu / seconds,
        processes=len(per_process),
        # how the connections spread: a worker may accept every one of them
        busy_processes=sum(1 for v in per_process.values() if v > 0.1 * cpu),
        cpu_shares=sorted((round(v / cpu, 3) for v in per_process.values() if cpu), reverse=True),
        redis_cpu_ms_per_req=1000 * redis_cpu / res["requests"] if redis_pids else None,
    )  # fmt: skip
    return res


def measure_slot(
    setup: Setup, cfg: Configuration, r: int, duration: float, log: Callable[[str], None]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One configuration's turn in round ``r``: start, check, warm up, c=8 and c=64, stop."""
    setup.stores.flush(cfg.backend)  # so the check sees this gateway's keys
    gw = start_gateway(setup, cfg)
    try:
        check = check_store(setup, cfg, gw)
        wrk(gateway_url(gw), WARMUP_C, WARMUP_S, count_status=True)
        runs = []
        for c in CONCURRENCY:
            runs.append(one_run(setup, cfg, gw, c, duration, r))
            log(line(runs[-1]))
            if runs[-1]["processes"] < cfg.workers + (cfg.workers > 1):  # + the supervisor
                raise BenchError(f"{cfg.name}: {runs[-1]['processes']} process(es) running")
    finally:
        stop_tree(gw)
    return runs, check


def line(res: dict[str, Any]) -> str:
    redis = res["redis_cpu_ms_per_req"]
    return (
        f"  r{res['round']} c={res['concurrency']:<3} {res['target']:<11} {res['rps']:7.0f} rps "
        f"p50 {res['p50_us'] / 1000:7.2f} ms p99 {res['p99_us'] / 1000:7.2f} ms "
        f"cpu {res['cpu_ms_per_req']:.3f} ms/req on {res['cpu_util']:.2f} cores "
        f"({res['busy_processes']}/{res['processes']} processes busy)"
        + (f" redis {redis:.3f} ms/req" if redis is not None else "")
    )


def measure(
    setup: Setup,
    configs: list[Configuration],
    rounds: int,
    duration: float,
    log: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (round, configuration) slot; the order rotates each round, so no configuration
    always runs first (or right after the same neighbour)."""
    runs: list[dict[str, Any]] = []
    checks: dict[str, Any] = {}
    for r in range(rounds):
        k = r % len(configs)
        for cfg in configs[k:] + configs[:k]:
            slot, check = measure_slot(setup, cfg, r, duration, log)
            runs += slot
            checks.setdefault(cfg.name, check)
    return runs, checks


# --- the report --------------------------------------------------------------------------


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per configuration and concurrency: medians over rounds, and CPU/req and RPS over
    w1-local's (paired per round, then the median), with the goal when issue 16 sets one."""
    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for name in names:
        for c in CONCURRENCY:
            rs = [r for r in runs if r["target"] == name and r["concurrency"] == c]
            if not rs:
                continue
            redis = [r["redis_cpu_ms_per_req"] for r in rs if r["redis_cpu_ms_per_req"] is not None]
            row: dict[str, Any] = {
                "rps": med([r["rps"] for r in rs]),
                "p50_ms": med([r["p50_us"] / 1000 for r in rs]),
                "p99_ms": med([r["p99_us"] / 1000 for r in rs]),
                "cpu_ms_per_req": med([r["cpu_ms_per_req"] for r in rs]),
                "cores": med([r["cpu_util"] for r in rs]),
                "redis_cpu_ms_per_req": med(redis),
                "processes": max(r["processes"] for r in rs),
            }
            if name != BASE:
                row.update(ratios(runs, name, c))
            rows.setdefault(name, {})[c] = row
    return rows


def ratios(runs: list[dict[str, Any]], name: str, c: int) -> dict[str, Any]:
    cpu = bench.paired_ratios(runs, "plain", c, "cpu_ms_per_req", name, BASE)
    rps = bench.paired_ratios(runs, "plain", c, "rps", name, BASE)
    goal = GOALS.get(name)
    ratio = med(cpu)
    return {
        "cpu_ratio": ratio,
        "cpu_ratio_rounds": cpu,
        "rps_ratio": med(rps),
        "goal": goal,
        "met": None if goal is None or ratio is None else ratio <= goal,
    }


def markdown(report: dict[str, Any]) -> str:
    meta, s, fmt = report["meta"], report["summary"], bench.fmt
    lines = [
        f"tallygate scale-out — {meta['utc']} — commit `{meta['commit']}`"
        f"{' + uncommitted changes' if meta['dirty'] else ''} — {meta['rounds']} round(s) x "
        f"{meta['duration_s']} s, medians of interleaved rounds{' (quick)' if meta['quick'] else ''}; "
        f"mock upstream answers after {meta['upstream_latency_ms']:.0f} ms; "
        f"gateway {('on core ' + str(meta['gateway_cpu'])) if meta.get('gateway_cpu') else 'unpinned'}, "
        f"wrk + mock + OTLP receiver + redis-servers on core {bench.DRIVER_CPU}; redis "
        f"{meta.get('redis_version') or '-'}, hiredis {'on' if meta['hiredis'] else 'off'}; load "
        f"average (1 min) at start {meta['loadavg']}, highest during the run "
        f"{max((r['loadavg'] for r in report['runs']), default=0.0):.2f} ({meta['cpus']} cores).",
        "",
        "| configuration | c | RPS | p50 ms | p99 ms | CPU ms/req | cores busy | Redis CPU ms/req "
        f"| CPU/req vs {BASE} | each round | RPS vs {BASE} | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for c in CONCURRENCY:
        for name, by_c in s.items():
            r = by_c.get(c, by_c.get(str(c)))  # str: a report read back from its JSON
            if r is None:
                continue
            rounds = ", ".join(f"{x:.2f}" for x in r.get("cpu_ratio_rounds", []))
            goal = r.get("goal")
            mark = "" if goal is None else f"≤ {goal:.2f}x {'✅' if r['met'] else '❌'}"
            lines.append(
                f"| {name} | {c} | {fmt(r['rps'], ',.0f')} | {fmt(r['p50_ms'], '.1f')} | "
                f"{fmt(r['p99_ms'], '.1f')} | {fmt(r['cpu_ms_per_req'], '.3f')} | "
                f"{fmt(r['cores'], '.2f')} | {fmt(r['redis_cpu_ms_per_req'], '.3f')} | "
                f"{fmt(r.get('cpu_ratio'), '.2f')}{'x' if r.get('cpu_ratio') else ''} | "
                f"{rounds or '-'} | {fmt(r.get('rps_ratio'), '.2f')} | {mark} |"
            )
    lines += ["", check_line(report["checks"])]
    return "\n".join(lines) + "\n"


def check_line(checks: dict[str, Any]) -> str:
    parts = []
    for name, check in checks.items():
        moved = check["spend_after_usd"] - check["spend_before_usd"]
        where = (
            f"{len(check['redis_keys'])} tallygate keys in a Redis flushed before it started"
            if "redis_keys" in check
            else f"its SQLite file ({check['sqlite_bytes']:,} bytes)"
        )
        parts.append(f"{name}: spend +${moved:.6f}, {where}")
    return (
        "Checked before each measurement (first round shown): one request moved the team's "
        "spend in /admin/spend and landed in the store under test — " + "; ".join(parts) + "."
    )


# --- main ------------------------------------------------------------------------------


@contextlib.contextmanager
def started(configs: list[Configuration], latency_ms: float) -> Iterator[Setup]:
    logdir = Path(tempfile.mkdtemp(prefix="tallygate-scaleout-"))
    spawned: list[bench.Server] = []
    try:
        mock_port, otlp_port = bench.distinct_ports(2)
        mock = bench.spawn(
            "mock", [sys.executable, "-m", "bench.scaleout", "--serve-mock", str(mock_port),
                     "--upstream-latency-ms", str(latency_ms)],
            bench.DRIVER_CPU, mock_port, logdir,
        )  # fmt: skip
        receiver = bench.spawn(
            "otlp", [sys.executable, "-m", "bench.run", "--serve-otlp", str(otlp_port)],
            bench.DRIVER_CPU, otlp_port, logdir,
        )  # fmt: skip
        spawned += [mock, receiver]
        for srv in (mock, receiver):
            if not bench.wait_port(srv, 20):
                raise BenchError(f"{srv.name} did not start: {srv.stderr_tail()}")
        with stores_for(configs) as stores:
            setup = Setup(logdir, mock, receiver, stores, spawned)
            yield setup
    finally:
        for srv in reversed(spawned):
            stop_tree(srv)
        shutil.rmtree(logdir, ignore_errors=True)


def run(
    configs: list[Configuration], rounds: int, duration: float, meta: dict[str, Any], log: Any
) -> dict[str, Any]:
    with started(configs, meta["upstream_latency_ms"]) as setup:
        meta["redis_version"] = redis_version(setup.stores)
        log(
            f"running {rounds} round(s) of {duration:.0f} s per figure over {[c.name for c in configs]}"
        )
        runs, checks = measure(setup, configs, rounds, duration, log)
        otlp = bench.http("GET", f"http://127.0.0.1:{setup.receiver.port}/stats")
    names = [c.name for c in configs]
    return {
        "meta": meta,
        "summary": summarize(runs, names),
        "checks": checks,
        "otlp_received": json.loads(otlp[1]) if otlp[0] == 200 else None,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round (~1.5 minutes)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 6, quick 3)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--configs", metavar="LIST",
                        help=f"comma list of {', '.join(c.name for c in CONFIGURATIONS)} "
                             f"(default all; {BASE} always runs)")  # fmt: skip
    parser.add_argument("--upstream-latency-ms", type=float, default=UPSTREAM_LATENCY_MS,
                        help=f"the mock's answer delay (default {UPSTREAM_LATENCY_MS:.0f})")  # fmt: skip
    parser.add_argument("--render", metavar="JSON", help="print a saved report's table again")
    parser.add_argument(
        "--pin-gateway",
        metavar="CORE",
        help="pin every gateway process to this core (default: unpinned)",
    )
    parser.add_argument("--serve-mock", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_mock:
        serve_mock(args.serve_mock, args.upstream_latency_ms)
        return 0
    if args.pin_gateway is not None:
        GATEWAY_CPU[0] = args.pin_gateway
    if args.render:
        print(markdown(json.loads(Path(args.render).read_text())), end="")
        return 0
    try:
        configs = parse_configs(args.configs)
    except ValueError as exc:
        parser.error(str(exc))
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the servers started here are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    duration = args.duration or (3.0 if args.quick else 6.0)
    rounds = args.rounds or (1 if args.quick else 3)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tree = bench.git_tree(bench.REPO)
    meta = {
        "utc": stamp, "commit": tree["commit"][:12], "dirty": tree["dirty"], "quick": args.quick,
        "rounds": rounds, "duration_s": duration, "loadavg": f"{os.getloadavg()[0]:.2f}",
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "config": str(CONFIG.relative_to(bench.REPO)), "upstream_latency_ms": args.upstream_latency_ms,
        "gateway_cpu": args.pin_gateway,
        "hiredis": importlib.util.find_spec("hiredis") is not None,
        "command": " ".join(["python -m bench.scaleout", *(argv if argv is not None else sys.argv[1:])]),
    }  # fmt: skip
    try:
        report = run(configs, rounds, duration, meta, log)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    bench.RESULTS.mkdir(exist_ok=True)
    out = bench.RESULTS / f"scaleout-{stamp}.json"
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(markdown(report))
    log(f"wrote {out.relative_to(bench.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
