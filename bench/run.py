"""The benchmark, one command: direct vs bare pass-through vs tallygate, interleaved.

    python -m bench.run [--quick] [--duration S] [--rounds R] [--profile]
    python -m bench.run --baseline DIR [--targets direct,gateway,baseline]

Starts the mock upstream, a cheap OTLP/HTTP receiver, the bare pass-through and
tallygate (every feature on: bench/config.bench.yaml), pins the server under test to
core 0 and everything else (mock, receiver, wrk, stream client) to core 1, then runs
in rounds, each target in turn: wrk (non-stream) at concurrency 1, 16, 64 and the
stream client (20 chunks 5 ms apart) at concurrency 1 and 16. Reports medians over
rounds and the gateway's ratios to the pass-through and to direct; writes
bench/results/<UTC timestamp>.json and bench/results/latest.md and prints the table.
A full run (not --quick) also refreshes the table in bench/README.md.

``--baseline DIR`` adds a target "baseline": the gateway from another source tree (a
git worktree of another commit), same venv, measured in every round beside "gateway",
and an A/B section in the report (gateway/baseline ratios).

The process helpers here (ports, pinned spawns, /proc CPU and RSS, wrk) are shared
with bench.bench_transport.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
LUA = BENCH_DIR / "post.lua"
CONFIG = BENCH_DIR / "config.bench.yaml"
README = BENCH_DIR / "README.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_CPU = "0"  # the server under test: pass-through or gateway
DRIVER_CPU = "1"  # mock upstream, OTLP receiver, wrk, stream client
KEY = "sk-bench"
MODEL = "bench-model"
CONCURRENCY = (1, 16, 64)
STREAM_CONCURRENCY = (1, 16)
TARGETS = ("direct", "passthrough", "gateway")  # the default, without --baseline
ALL_TARGETS = (*TARGETS, "baseline")  # also the order within a round
MODES = ("plain", "stream")
BUILD_PACKAGES = ("gateway", "policies", "pricing")  # what a source tree must supply

# Where each target stands against issue 7 (one worker, one core, every feature on).
GOALS = {
    "rps_ratio_c16": 0.70,
    "rps": 1000.0,
    "added_p50_c1_ms": 1.0,
    "added_p99_c1_ms": 3.0,
    "added_ttft_ms": 1.0,
    "rss_load_mb": 150.0,
}


# --- processes -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cpu: str, cmd: list[str]) -> list[str]:
    """``cmd`` under ``taskset -c cpu`` when taskset exists and the CPU does.

    $BENCH_NICE (e.g. -5, as root) also runs it under ``nice``, to favour the bench over
    other work sharing the cores; off by default.
    """
    niceness = os.environ.get("BENCH_NICE")
    if niceness:
        cmd = ["nice", "-n", niceness, *cmd]
    if shutil.which("taskset") and int(cpu) < (os.cpu_count() or 1):
        return ["taskset", "-c", cpu, *cmd]
    return cmd


@dataclass
class Server:
    """A spawned server process, its port and its log files."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path
    error: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def spawn(
    name: str,
    cmd: list[str],
    cpu: str,
    port: int,
    logdir: Path,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> Server:
    stdout, stderr = logdir / f"{name}.out", logdir / f"{name}.err"
    proc = subprocess.Popen(
        pinned(cpu, cmd),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=stdout.open("wb"),
        stderr=stderr.open("wb"),
    )
    return Server(name, proc, port, stdout, stderr)


def wait_port(server: Server, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            return False
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", server.port), 0.2),
        ):
            return True
        time.sleep(0.05)
    return False


def http(
    method: str, url: str, body: bytes | None = None, key: str = KEY, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One blocking request (setup checks only, never load)."""
    req = urllib.request.Request(url, data=body, method=method)
    req.add_header("content-type", "application/json")
    req.add_header("authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError) as exc:
        return 0, repr(exc).encode()


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (taskset execs, so the spawned pid is the server)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants, from /proc/PID/stat."""
    total = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB, summed over ``pid`` and its descendants."""
    rss = hwm = 0
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, hwm / 1024


class RssSampler:
    """Samples the summed VmRSS of some pids every ``interval`` s; keeps the max."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid)[0])

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- load drivers ----------------------------------------------------------------


def run_wrk(
    url: str, concurrency: int, duration: float, key: str = KEY, cpu: str = DRIVER_CPU
) -> dict[str, Any]:
    """wrk -t1 -cC -dS --latency with post.lua, on the driver core; figures in µs."""
    cmd = pinned(
        cpu,
        [
            "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--latency",
            "--timeout", "10s", "-s", str(LUA), url, "--", key, MODEL,
        ],
    )  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            res: dict[str, Any] = json.loads(line[len("BENCH_JSON ") :])
            res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
            res["errors"] = sum(v for k, v in res.items() if k.startswith("errors_"))
            return res
    raise RuntimeError(f"wrk gave no figures: {out.stdout[-500:]} {out.stderr[-500:]}")


def run_streams(url: str, concurrency: int, n: int, key: str = KEY) -> dict[str, Any]:
    cmd = pinned(
        DRIVER_CPU,
        [
            sys.executable, "-m", "bench.stream_client", "--url", url, "--key", key,
            "--model", MODEL, "-n", str(n), "-c", str(concurrency), "--json",
        ],
    )  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"stream client failed: {out.stderr[-800:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --- the OTLP receiver -----------------------------------------------------------


class OtlpReceiver:
    """Handler for mock_upstream.HttpProtocol: 200 to POST /v1/{traces,metrics,logs}.

    It counts requests and bytes per signal and serves them at GET /stats; it never
    decodes a body (a zero-length body is a valid empty Export*ServiceResponse).
    """

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        from bench.mock_upstream import response_bytes

        self.ok = response_bytes(200, b"", b"application/x-protobuf")
        self.not_found = response_bytes(404, b"{}")
        self.response_bytes = response_bytes

    def __call__(self, conn: Any, method: bytes, url: bytes, body: bytes) -> None:
        path = url.split(b"?", 1)[0].decode()
        if method == b"POST" and path in ("/v1/traces", "/v1/metrics", "/v1/logs"):
            count = self.counts.setdefault(path[4:], [0, 0])
            count[0] += 1
            count[1] += len(body)
            conn.respond(self.ok)
        elif method == b"GET" and path == "/stats":
            stats = {k: {"requests": v[0], "bytes": v[1]} for k, v in self.counts.items()}
            conn.respond(self.response_bytes(200, json.dumps(stats).encode()))
        else:
            conn.respond(self.not_found)


def serve_otlp(port: int) -> None:
    from bench.mock_upstream import run

    run(OtlpReceiver(), "127.0.0.1", port, "otlp receiver")


# --- the run ---------------------------------------------------------------------


@dataclass
class Build:
    """A gateway source tree to run: this checkout ("gateway") or --baseline DIR."""

    name: str
    tree: Path
    config: Path


@dataclass
class Setup:
    logdir: Path
    mock: Server
    receiver: Server
    modes: dict[str, tuple[str, ...]]  # target -> the modes it is measured in
    servers: dict[str, Server] = field(default_factory=dict)  # passthrough, gateway, baseline
    urls: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # build name -> why it did not run
    rss_idle: dict[str, float] = field(default_factory=dict)


def chat_body(stream: bool = False) -> bytes:
    from bench.stream_client import stream_body

    if stream:
        return stream_body(MODEL)
    return json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    ).encode()


def tiktoken_cache() -> dict[str, str]:
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return {}
    cache = REPO.parent / "shared" / "tiktoken-cache"
    return {"TIKTOKEN_CACHE_DIR": str(cache)} if cache.is_dir() else {}


def build_env(build: Build) -> dict[str, str]:
    """Another tree's packages must win over this checkout's editable install: its
    directory first on PYTHONPATH (and the cwd, which ``-m`` puts first anyway)."""
    if build.tree == REPO:
        return {}
    path = [str(build.tree), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}


def build_imports(build: Build) -> dict[str, str]:
    """Where ``gateway``, ``policies`` and ``pricing`` come from in ``build``'s environment;
    raises RuntimeError when one is missing or comes from another tree."""
    code = (
        "import importlib, json, sys; "
        "print(json.dumps({n: importlib.import_module(n).__file__ for n in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *BUILD_PACKAGES],
        capture_output=True, text=True, cwd=build.tree, timeout=60,
        env={**os.environ, **build_env(build)},
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"importing {build.name}'s packages failed: {out.stderr[-800:]}")
    files: dict[str, str] = json.loads(out.stdout.strip().splitlines()[-1])
    for name, file in files.items():
        if not file or not Path(file).resolve().is_relative_to(build.tree):
            raise RuntimeError(f"{build.name}: {name} imports from {file}, not from {build.tree}")
    return files


def git_tree(tree: Path) -> dict[str, Any]:
    """The tree's commit (full hash) and whether tracked files differ from it."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=tree)
        return out.stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    return {"commit": head, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def start_gateway(
    setup: Setup, build: Build, port: int, mock_port: int, otlp_port: int, spawned: list[Server]
) -> None:
    """``python -m gateway serve`` from ``build.tree``; on failure the run goes on without
    it and ``setup.errors`` says why."""
    env = {
        "BENCH_UPSTREAM_PORT": str(mock_port),
        "BENCH_KEY": KEY,
        # one store per build: two processes on one SQLite file would contend for its lock
        "BENCH_DB": str(setup.logdir / f"tallygate-{build.name}.db"),
        "BENCH_OTLP": f"http://127.0.0.1:{otlp_port}",
        **tiktoken_cache(),
        **build_env(build),
    }
    cmd = [
        sys.executable, "-m", "gateway", "serve", "--config", str(build.config),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    gw = spawn(build.name, cmd, SERVER_CPU, port, setup.logdir, env, cwd=build.tree)
    spawned.append(gw)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    if not wait_port(gw, 60):
        gw.error = "did not start listening" if gw.alive() else f"exited with {gw.proc.returncode}"
    else:
        status, body = http("POST", url, chat_body())
        if status != 200:
            gw.error = f"check request answered {status}: {body[:400]!r}"
        else:
            status, body = http("POST", url, chat_body(stream=True))
            if status != 200 or b"[DONE]" not in body:
                gw.error = f"check stream answered {status}: {body[-400:]!r}"
    if gw.error:
        setup.errors[build.name] = f"{gw.error}\n--- stderr tail ---\n{gw.stderr_tail()}"
        gw.stop()
        return
    setup.servers[build.name] = gw
    setup.urls[build.name] = url


def distinct_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return list(ports)


def start_all(
    logdir: Path,
    transport: str,
    builds: list[Build],
    modes: dict[str, tuple[str, ...]],
    spawned: list[Server],
) -> Setup:
    """Start the mock, the receiver and each target in ``modes``; every process started is
    appended to ``spawned`` at once, so the caller can stop them even when a later one
    fails to start."""
    mock_port, otlp_port, pt_port, *gw_ports = distinct_ports(3 + len(builds))
    mock = spawn(
        "mock", [sys.executable, "-m", "bench.mock_upstream", "--port", str(mock_port)],
        DRIVER_CPU, mock_port, logdir,
    )  # fmt: skip
    receiver = spawn(
        "otlp", [sys.executable, "-m", "bench.run", "--serve-otlp", str(otlp_port)],
        DRIVER_CPU, otlp_port, logdir,
    )  # fmt: skip
    spawned += [mock, receiver]
    setup = Setup(logdir, mock, receiver, modes)
    for srv in (mock, receiver):
        if not wait_port(srv, 20):
            raise RuntimeError(f"{srv.name} did not start: {srv.stderr_tail()}")
    setup.urls["direct"] = f"http://127.0.0.1:{mock_port}/v1/chat/completions"
    if "passthrough" in modes:
        start_passthrough(setup, pt_port, transport, spawned)
    for build, port in zip(builds, gw_ports, strict=True):
        if build.name in modes:
            start_gateway(setup, build, port, mock_port, otlp_port, spawned)
    time.sleep(1.0)  # let lazy start-up work settle before the idle reading
    for name, srv in setup.servers.items():
        setup.rss_idle[name] = round(rss_mb(srv.pid)[0], 1)
    return setup


def start_passthrough(setup: Setup, port: int, transport: str, spawned: list[Server]) -> None:
    mock_url = setup.urls["direct"].removesuffix("/v1/chat/completions")
    pt = spawn(
        "passthrough",
        [
            sys.executable, "-m", "bench.passthrough", "--port", str(port),
            "--upstream", mock_url, "--transport", transport,
        ],
        SERVER_CPU, port, setup.logdir,
    )  # fmt: skip
    spawned.append(pt)
    setup.servers["passthrough"] = pt
    if not wait_port(pt, 30):
        raise RuntimeError(f"passthrough did not start: {pt.stderr_tail()}")
    setup.urls["passthrough"] = f"http://127.0.0.1:{port}/v1/chat/completions"
    status, body = http("POST", setup.urls["passthrough"], chat_body())
    if status != 200:
        raise RuntimeError(f"passthrough answered {status}: {body[:300]!r}")


def server_pid(setup: Setup, target: str) -> int:
    return setup.mock.pid if target == "direct" else setup.servers[target].pid


def measure_rounds(
    setup: Setup, rounds: int, duration: float, log: Any
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every (round, mode, concurrency, target) run, in interleaved order."""
    targets = [t for t in ALL_TARGETS if t in setup.urls and t in setup.modes]
    plain = [t for t in targets if "plain" in setup.modes[t]]
    stream = [t for t in targets if "stream" in setup.modes[t]]
    runs: list[dict[str, Any]] = []
    pids = {t: server_pid(setup, t) for t in targets if t != "direct"}
    with RssSampler(pids) as sampler:
        for t in targets:  # warm-up, uncounted: connections, caches, lazy imports
            run_wrk(setup.urls[t], 16, 1)
        for r in range(rounds):
            for c in CONCURRENCY:
                for t in plain:
                    pid = server_pid(setup, t)
                    cpu0 = cpu_seconds(pid)
                    res = run_wrk(setup.urls[t], c, duration)
                    cpu = cpu_seconds(pid) - cpu0
                    res.update(
                        round=r, mode="plain", concurrency=c, target=t, loadavg=os.getloadavg()[0],
                        cpu_ms_per_req=1000 * cpu / max(1, res["requests"]),
                        cpu_util=cpu / (res["duration_us"] / 1e6),
                    )  # fmt: skip
                    runs.append(res)
                    log(
                        f"  r{r} plain  c={c:<3} {t:<12} {res['rps']:9.0f} rps "
                        f"p50 {res['p50_us'] / 1000:7.3f} ms p99 {res['p99_us'] / 1000:7.3f} ms "
                        f"cpu {res['cpu_ms_per_req']:.3f} ms/req errors {res['errors']}"
                    )
            for c in STREAM_CONCURRENCY:
                # enough streams to fill about `duration` seconds (each lasts ~100 ms)
                n = max(c * 4, int(c * duration / 0.1))
                for t in stream:
                    pid = server_pid(setup, t)
                    cpu0 = cpu_seconds(pid)
                    res = run_streams(setup.urls[t], c, n)
                    cpu = cpu_seconds(pid) - cpu0
                    res.update(
                        round=r, mode="stream", target=t, loadavg=os.getloadavg()[0],
                        cpu_ms_per_req=1000 * cpu / max(1, res["requests"] + c),
                    )  # fmt: skip
                    runs.append(res)
                    log(
                        f"  r{r} stream c={c:<3} {t:<12} TTFT p50 {res['ttft_p50_ms']:7.3f} ms "
                        f"p99 {res['ttft_p99_ms']:7.3f} ms total p50 {res['total_p50_ms']:.1f} ms "
                        f"errors {res['errors']}"
                    )
    return runs, {k: round(v, 1) for k, v in sampler.peak.items()}


# --- the report ------------------------------------------------------------------


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(runs: list[dict[str, Any]], targets: list[str]) -> dict[str, Any]:
    """Medians over rounds; added latency and ratios are per-round pairs, then medians."""

    def pick(mode: str, t: str, c: int) -> dict[int, dict[str, Any]]:
        return {
            r["round"]: r
            for r in runs
            if r["mode"] == mode and r["target"] == t and r["concurrency"] == c
        }

    out: dict[str, Any] = {"plain": {}, "stream": {}}
    for t in targets:
        for c in CONCURRENCY:
            rs = pick("plain", t, c)
            if not rs:
                continue
            row: dict[str, Any] = {
                "rps": med([r["rps"] for r in rs.values()]),
                "p50_ms": med([r["p50_us"] / 1000 for r in rs.values()]),
                "p99_ms": med([r["p99_us"] / 1000 for r in rs.values()]),
                "cpu_ms_per_req": med([r["cpu_ms_per_req"] for r in rs.values()]),
                "errors": sum(r["errors"] for r in rs.values()),
            }
            if t != "direct":
                direct = pick("plain", "direct", c)
                pairs = [(rs[k], direct[k]) for k in rs if k in direct]
                row["added_p50_ms"] = med([(a["p50_us"] - b["p50_us"]) / 1000 for a, b in pairs])
                row["added_p99_ms"] = med([(a["p99_us"] - b["p99_us"]) / 1000 for a, b in pairs])
                row["ratio_to_direct"] = med([a["rps"] / b["rps"] for a, b in pairs])
            if t in ("gateway", "baseline"):
                pt = pick("plain", "passthrough", c)
                pairs = [(rs[k], pt[k]) for k in rs if k in pt]
                row["ratio_to_passthrough"] = med([a["rps"] / b["rps"] for a, b in pairs])
            out["plain"].setdefault(t, {})[c] = row
        for c in STREAM_CONCURRENCY:
            rs = pick("stream", t, c)
            if not rs:
                continue
            row = {
                "ttft_p50_ms": med([r["ttft_p50_ms"] for r in rs.values()]),
                "ttft_p99_ms": med([r["ttft_p99_ms"] for r in rs.values()]),
                "total_p50_ms": med([r["total_p50_ms"] for r in rs.values()]),
                "streams_per_s": med([r["streams_per_s"] for r in rs.values()]),
                "cpu_ms_per_req": med([r["cpu_ms_per_req"] for r in rs.values()]),
                "errors": sum(r["errors"] for r in rs.values()),
            }
            if t != "direct":
                direct = pick("stream", "direct", c)
                pairs = [(rs[k], direct[k]) for k in rs if k in direct]
                row["added_ttft_p50_ms"] = med(
                    [a["ttft_p50_ms"] - b["ttft_p50_ms"] for a, b in pairs]
                )
                row["added_ttft_p99_ms"] = med(
                    [a["ttft_p99_ms"] - b["ttft_p99_ms"] for a, b in pairs]
                )
            out["stream"].setdefault(t, {})[c] = row
    return out


def paired_ratios(
    runs: list[dict[str, Any]], mode: str, c: int, key: str, a: str = "gateway", b: str = "baseline"
) -> list[float]:
    """``a``'s figure over ``b``'s, one ratio per round (the two ran seconds apart)."""
    by_round: dict[str, dict[int, float]] = {a: {}, b: {}}
    for r in runs:
        if r["mode"] == mode and r["concurrency"] == c and r["target"] in by_round:
            by_round[r["target"]][r["round"]] = r[key]
    return [v / by_round[b][k] for k, v in sorted(by_round[a].items()) if by_round[b].get(k, 0) > 0]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def ab_summary(runs: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any] | None:
    """gateway vs baseline per concurrency: each figure of both, and gateway/baseline.

    RPS, CPU per request and TTFT are ratios paired per round, then the median (like
    "vs pass-through"); added latencies can be ~0 or negative in one round, so theirs is
    the ratio of the two medians, given only when the baseline's is positive.
    """
    out: dict[str, Any] = {"plain": {}, "stream": {}}
    paired = {
        "plain": ("rps", "cpu_ms_per_req"),
        "stream": ("ttft_p50_ms", "ttft_p99_ms", "cpu_ms_per_req"),
    }
    of_medians = {"plain": ("added_p50_ms", "added_p99_ms"), "stream": ("added_ttft_p50_ms",)}
    for mode in ("plain", "stream"):
        gw_rows = summary[mode].get("gateway", {})
        bl_rows = summary[mode].get("baseline", {})
        for c in sorted(set(gw_rows) & set(bl_rows)):
            g, b = gw_rows[c], bl_rows[c]
            row: dict[str, Any] = {}
            for key in paired[mode]:
                rounds = paired_ratios(runs, mode, c, key)
                row[key] = {
                    "gateway": g.get(key),
                    "baseline": b.get(key),
                    "ratio": med(rounds),
                    "ratio_rounds": rounds,
                }
            for key in of_medians[mode]:
                row[key] = {
                    "gateway": g.get(key),
                    "baseline": b.get(key),
                    "ratio": ratio(g.get(key), b.get(key)),
                }
            out[mode][c] = row
    return out if out["plain"] or out["stream"] else None


def ab_cell(fig: dict[str, Any] | None, spec: str) -> str:
    """ "0.720 vs 0.700 (1.03x)": gateway vs baseline (gateway/baseline)."""
    if not fig or (fig["gateway"] is None and fig["baseline"] is None):
        return "-"
    r = fig.get("ratio")
    tail = f" ({r:.2f}x)" if r is not None else ""
    return f"{fmt(fig['gateway'], spec)} vs {fmt(fig['baseline'], spec)}{tail}"


def ab_markdown(report: dict[str, Any]) -> list[str]:
    """The A/B section: gateway (this checkout) against the baseline tree, same run."""
    ab, meta = report["ab"], report["meta"]
    gw, bl = meta["gateway_tree"], meta["baseline"]
    lines = [
        f"A/B, gateway = this checkout `{gw['commit'][:12]}`"
        f"{' + uncommitted changes' if gw['dirty'] else ''} (config `{meta['config']}`) vs "
        f"baseline = `{bl['dir']}` at `{bl['commit'][:12]}`"
        f"{' + uncommitted changes' if bl['dirty'] else ''} (config `{bl['config']}`), "
        "both measured in every round. Each cell: gateway vs baseline (gateway/baseline; "
        "below 1 is better except for RPS); RPS, CPU and TTFT ratios are paired per round, "
        "then the median.",
        "",
        "| c | RPS | CPU ms/req | added p50 ms | added p99 ms | CPU ratio, each round |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c, r in ab["plain"].items():
        rounds = ", ".join(f"{x:.2f}" for x in r["cpu_ms_per_req"]["ratio_rounds"])
        lines.append(
            f"| {c} | {ab_cell(r['rps'], ',.0f')} | {ab_cell(r['cpu_ms_per_req'], '.3f')} | "
            f"{ab_cell(r['added_p50_ms'], '+.3f')} | {ab_cell(r['added_p99_ms'], '+.3f')} | "
            f"{rounds or '-'} |"
        )
    if ab["stream"]:
        lines += [
            "",
            "| c | TTFT p50 ms | added TTFT p50 ms | TTFT p99 ms | CPU ms/stream |",
            "|---:|---:|---:|---:|---:|",
        ]
        for c, r in ab["stream"].items():
            lines.append(
                f"| {c} | {ab_cell(r['ttft_p50_ms'], '.3f')} | "
                f"{ab_cell(r['added_ttft_p50_ms'], '+.3f')} | {ab_cell(r['ttft_p99_ms'], '.3f')} | "
                f"{ab_cell(r['cpu_ms_per_req'], '.3f')} |"
            )
    return [*lines, ""]


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def goals(summary: dict[str, Any], rss_load: dict[str, float]) -> list[dict[str, Any]]:
    """Each target of issue 7: the gateway's figure, met or not, and the bare pass-through's
    same figure beside it (the floor our libraries set on this machine)."""

    def figures(t: str) -> dict[str, float | None]:
        plain, stream = summary["plain"].get(t, {}), summary["stream"].get(t, {})
        c1, c16, s1 = plain.get(1, {}), plain.get(16, {}), stream.get(1, {})
        ratio = c16.get("ratio_to_passthrough", 1.0 if c16 else None)
        return {
            "ratio": None if ratio is None else 100 * ratio,
            "rps": c16.get("rps"),
            "a50": c1.get("added_p50_ms"),
            "a99": c1.get("added_p99_ms"),
            "ttft": s1.get("added_ttft_p50_ms"),
            "rss": rss_load.get(t),
        }

    gw, pt, g = figures("gateway"), figures("passthrough"), GOALS
    spec = [  # key, figure, target text, limit, higher is better, format
        ("ratio", "RPS vs pass-through, c=16 (%)", f"≥ {100 * g['rps_ratio_c16']:.0f}",
         100 * g["rps_ratio_c16"], True, ".0f"),
        ("rps", "RPS per worker, c=16", f"≥ {g['rps']:,.0f}", g["rps"], True, ",.0f"),
        ("a50", "added p50 latency, c=1 (ms)", f"≤ {g['added_p50_c1_ms']}",
         g["added_p50_c1_ms"], False, ".3f"),
        ("a99", "added p99 latency, c=1 (ms)", f"≤ {g['added_p99_c1_ms']:.0f}",
         g["added_p99_c1_ms"], False, ".3f"),
        ("ttft", "added time to first chunk p50, c=1 (ms)", f"≤ {g['added_ttft_ms']:.0f}",
         g["added_ttft_ms"], False, ".3f"),
        ("rss", "RSS under load (MB)", f"≤ {g['rss_load_mb']:.0f}", g["rss_load_mb"], False, ".1f"),
    ]  # fmt: skip
    rows = []
    for key, name, target, limit, higher, fspec in spec:
        value = gw[key]
        met = None if value is None else (value >= limit if higher else value <= limit)
        rows.append(
            {
                "figure": name,
                "target": target,
                "gateway": fmt(value, fspec),
                "passthrough": fmt(pt[key], fspec),
                "met": met,
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    s, meta = report["summary"], report["meta"]
    lines = [
        f"tallygate benchmark — {meta['utc']} — commit `{meta['commit']}` — "
        f"{meta['rounds']} round(s) x {meta['duration_s']} s, medians of interleaved rounds"
        f"{' (quick)' if meta['quick'] else ''}; pass-through on {meta['transport']} transport; "
        f"server under test on core {SERVER_CPU}, mock + load on core {DRIVER_CPU}; "
        f"load average (1 min) at start {meta['loadavg'].split()[0]}, highest during the run "
        f"{max((r.get('loadavg', 0.0) for r in report['runs']), default=0.0):.2f} (2 cores).",
        "",
        *(ab_markdown(report) if report.get("ab") else []),
        "Non-stream (wrk -t1, POST chat completion):",
        "",
        "| target | c | RPS | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU ms/req | vs pass-through | vs direct |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, rows in s["plain"].items():
        for c, r in rows.items():
            lines.append(
                f"| {t} | {c} | {fmt(r['rps'], ',.0f')} | {fmt(r['p50_ms'], '.3f')} | "
                f"{fmt(r['p99_ms'], '.3f')} | {fmt(r.get('added_p50_ms'), '+.3f')} | "
                f"{fmt(r.get('added_p99_ms'), '+.3f')} | {fmt(r['cpu_ms_per_req'], '.3f')} | "
                f"{fmt(r.get('ratio_to_passthrough'), '.2f')} | {fmt(r.get('ratio_to_direct'), '.2f')} |"
                + (f" ⚠ {r['errors']} errors" if r["errors"] else "")
            )
    lines += [
        "",
        f"Stream ({meta['chunks']} chunks {meta['chunk_delay_ms']} ms apart, include_usage):",
        "",
        "| target | c | TTFT p50 ms | TTFT p99 ms | added TTFT p50 ms | added TTFT p99 ms | total p50 ms | CPU ms/stream |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t, rows in s["stream"].items():
        for c, r in rows.items():
            lines.append(
                f"| {t} | {c} | {fmt(r['ttft_p50_ms'], '.3f')} | {fmt(r['ttft_p99_ms'], '.3f')} | "
                f"{fmt(r.get('added_ttft_p50_ms'), '+.3f')} | {fmt(r.get('added_ttft_p99_ms'), '+.3f')} | "
                f"{fmt(r['total_p50_ms'], '.1f')} | {fmt(r['cpu_ms_per_req'], '.3f')} |"
                + (f" ⚠ {r['errors']} errors" if r["errors"] else "")
            )
    lines += ["", "| server | RSS idle MB | RSS under load MB (peak VmRSS) |", "|---|---:|---:|"]
    for name, idle in report["rss_idle_mb"].items():
        lines.append(f"| {name} | {idle:.1f} | {fmt(report['rss_load_mb'].get(name), '.1f')} |")
    lines += [
        "",
        "Targets (issue 7), the gateway with every feature on; the bare pass-through's same "
        "figure for reference (the floor of our libraries on this machine):",
        "",
        "| figure | target | gateway | | bare pass-through |",
        "|---|---|---:|---|---:|",
    ]
    for row in report["goals"]:
        ok = row["met"]
        mark = "n/a" if ok is None else ("✅ met" if ok else "❌ not met")
        lines.append(
            f"| {row['figure']} | {row['target']} | {row['gateway']} | {mark} | {row['passthrough']} |"
        )
    if report.get("gateway_error"):
        tail = report["gateway_error"].strip().replace("```", "'''")
        lines += [
            "",
            "**The gateway did not run**; direct and pass-through only:",
            "",
            "```",
            tail,
            "```",
        ]
    if report.get("baseline_error"):
        tail = report["baseline_error"].strip().replace("```", "'''")
        lines += ["", "**The baseline did not run**:", "", "```", tail, "```"]
    checks = report.get("gateway_checks") or {}
    if checks:
        otlp = ", ".join(
            f"{k} {v['requests']} requests / {v['bytes'] / 1e6:.1f} MB"
            for k, v in checks.get("otlp_received", {}).items()
        )
        lines += [
            "",
            f"Features were live: OTLP receiver got {otlp or 'nothing'}; the gateway wrote "
            f"{checks.get('stdout_lines', 0):,} stdout and {checks.get('stderr_lines', 0):,} "
            "stderr lines (access log).",
        ]
    bl = report.get("baseline_checks")
    if bl:
        lines += [
            "",
            f"The baseline wrote {bl.get('stdout_lines', 0):,} stdout and "
            f"{bl.get('stderr_lines', 0):,} stderr lines (the OTLP counts above are both builds').",
        ]
    return "\n".join(lines) + "\n"


def render_saved(path: Path) -> str:
    """latest.md again from a saved report (JSON turned the concurrency keys to strings)."""
    report = json.loads(path.read_text())
    for mode in ("plain", "stream"):
        for t, rows in report["summary"][mode].items():
            report["summary"][mode][t] = {int(c): row for c, row in rows.items()}
    report["goals"] = goals(report["summary"], report["rss_load_mb"])
    if report.get("ab"):
        report["ab"] = ab_summary(report["runs"], report["summary"])
    table = markdown(report)
    (RESULTS / "latest.md").write_text(table)
    return table


def update_readme(table: str) -> None:
    start, end = "<!-- bench:latest:start -->", "<!-- bench:latest:end -->"
    try:
        text = README.read_text()
    except OSError:
        return
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        README.write_text(f"{head}{start}\n{table}{end}{tail}")


def git_commit() -> str:
    out = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    )
    return out.stdout.strip() or "unknown"


def gateway_checks(setup: Setup) -> dict[str, Any]:
    """Evidence the features were on: OTLP exports received, access-log lines written."""
    checks: dict[str, Any] = {}
    status, body = http("GET", f"http://127.0.0.1:{setup.receiver.port}/stats")
    if status == 200:
        checks["otlp_received"] = json.loads(body)
    gw = setup.servers.get("gateway")
    if gw is not None:
        checks.update(log_lines(gw))
    return checks


def log_lines(srv: Server) -> dict[str, Any]:
    """How many lines the server wrote to stdout (the access log) and stderr, and the last."""
    out: dict[str, Any] = {}
    for stream in ("stdout", "stderr"):
        path: Path = getattr(srv, stream)
        with contextlib.suppress(OSError), path.open("rb") as f:
            count, last = 0, b""
            for line in f:
                count += 1
                last = line
            out[f"{stream}_lines"] = count
            if last:
                out[f"{stream}_last_line"] = last[:600].decode(errors="replace").strip()
    return out


def profile_gateway(setup: Setup, duration: float, stamp: str, log: Any) -> str | None:
    """py-spy record of the gateway under wrk c=16; returns the SVG path."""
    gw = setup.servers.get("gateway")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if gw is None or not Path(spy).exists():
        return None
    out = RESULTS / f"profile-gateway-{stamp}.svg"
    cmd = pinned(
        DRIVER_CPU,
        [spy, "record", "--pid", str(gw.pid), "--duration", str(max(2, round(duration))),
         "--rate", "250", "--nonblocking", "--output", str(out)],
    )  # fmt: skip
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    run_wrk(setup.urls["gateway"], 16, duration)
    _, err = spy_proc.communicate(timeout=duration + 60)
    if spy_proc.returncode != 0:
        log(f"py-spy failed: {err.decode(errors='replace')[-300:]}")
        return None
    return str(out.relative_to(REPO))


@contextlib.contextmanager
def started(
    transport: str, builds: list[Build], modes: dict[str, tuple[str, ...]]
) -> Iterator[Setup]:
    logdir = Path(tempfile.mkdtemp(prefix="tallygate-bench-"))
    spawned: list[Server] = []
    try:
        yield start_all(logdir, transport, builds, modes, spawned)
    finally:
        for srv in reversed(spawned):
            srv.stop()
        shutil.rmtree(logdir, ignore_errors=True)


def parse_targets(spec: str | None, baseline: bool) -> dict[str, tuple[str, ...]]:
    """``--targets``: a comma list of targets, each optionally ``:plain`` or ``:stream`` to
    measure it in that mode only; default every target in both. Raises ValueError."""
    names = ALL_TARGETS if baseline else TARGETS
    if not spec:
        return dict.fromkeys(names, MODES)
    chosen: dict[str, set[str]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, mode = item.partition(":")
        if name == "baseline" and not baseline:
            raise ValueError("target baseline needs --baseline DIR")
        if name not in names:
            raise ValueError(f"unknown target {name!r}: one of {', '.join(names)}")
        if mode and mode not in MODES:
            raise ValueError(f"unknown mode in {item!r}: :plain or :stream")
        chosen.setdefault(name, set()).update([mode] if mode else MODES)
    if not chosen:
        raise ValueError("--targets names no target")
    return {t: tuple(m for m in MODES if m in chosen[t]) for t in ALL_TARGETS if t in chosen}


def baseline_build(tree: Path, config: Path | None) -> tuple[Build, dict[str, Any]]:
    """The --baseline tree as a Build, and what the report records of it. Its own
    bench/config.bench.yaml unless --config names one for both (keys may differ between
    builds). Raises RuntimeError when the tree cannot be the baseline."""
    tree = tree.resolve()
    if not (tree / "gateway").is_dir():
        raise RuntimeError(f"{tree} has no gateway/ package")
    config = (config or tree / "bench" / "config.bench.yaml").resolve()
    if not config.is_file():
        raise RuntimeError(f"no config {config}: give --config")
    build = Build("baseline", tree, config)
    imports = build_imports(build)
    return build, {"dir": str(tree), **git_tree(tree), "config": str(config), "imports": imports}


def run_bench(
    args: argparse.Namespace,
    builds: list[Build],
    modes: dict[str, tuple[str, ...]],
    meta: dict[str, Any],
    log: Any,
) -> dict[str, Any]:
    """Start everything, measure the rounds, and return the report (JSON-ready)."""
    rounds, duration, baseline = meta["rounds"], meta["duration_s"], "baseline" in meta
    with started(args.transport, builds, modes) as setup:
        for name, error in setup.errors.items():
            log(f"{name} failed: {error}")
        targets = [t for t in ALL_TARGETS if t in setup.urls and t in modes]
        log(f"running {rounds} round(s) of {duration:.0f} s per figure over {targets}")
        runs, rss_load = measure_rounds(setup, rounds, duration, log)
        for name, srv in setup.servers.items():
            rss_load[name] = max(rss_load.get(name, 0.0), round(rss_mb(srv.pid)[0], 1))
        hwm = {name: round(rss_mb(srv.pid)[1], 1) for name, srv in setup.servers.items()}
        checks = gateway_checks(setup) if "gateway" in setup.urls else {}
        profile = profile_gateway(setup, duration, meta["utc"], log) if args.profile else None
        summary = summarize(runs, targets)
        skipped = "skipped (--no-gateway)" if args.no_gateway else "skipped (not in --targets)"
        report: dict[str, Any] = {
            "meta": meta,
            "summary": summary,
            "rss_idle_mb": setup.rss_idle,
            "rss_load_mb": rss_load,
            "rss_hwm_mb": hwm,
            "goals": goals(summary, rss_load),
            "gateway_error": setup.errors.get("gateway", None if "gateway" in modes else skipped),
            "gateway_checks": checks,
            "profile": profile,
            "runs": runs,
        }
        if baseline:
            bl = setup.servers.get("baseline")
            report["ab"] = ab_summary(runs, summary)
            report["baseline_error"] = setup.errors.get("baseline")
            report["baseline_checks"] = log_lines(bl) if bl is not None else {}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round (~1 minute)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 8, quick 3)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--transport", default="aiohttp-transport",
                        choices=("default", "aiohttp", "aiohttp-tuned", "aiohttp-transport", "raw-aiohttp"),
                        help="the pass-through's upstream client (default: the gateway's, "
                             "httpx.Request straight into httpx-aiohttp's transport)")  # fmt: skip
    parser.add_argument("--no-gateway", action="store_true", help="direct and pass-through only")
    parser.add_argument("--config", type=Path,
                        help="the gateway's config (default bench/config.bench.yaml; "
                             "with --baseline, both builds use it)")  # fmt: skip
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also run the gateway from source tree DIR (e.g. a git worktree "
                             "of another commit) in every round; adds an A/B section")  # fmt: skip
    parser.add_argument("--targets", metavar="LIST",
                        help="comma list of direct, passthrough, gateway, baseline, each "
                             "optionally :plain or :stream (default: all, both modes)")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="then py-spy the gateway at c=16")
    parser.add_argument("--no-readme", action="store_true", help="leave bench/README.md alone")
    parser.add_argument("--nice", type=int, help="run every bench process under nice -n N (root)")
    parser.add_argument("--render", metavar="JSON", help="re-write latest.md from a results JSON")
    parser.add_argument("--serve-otlp", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_otlp:
        serve_otlp(args.serve_otlp)
        return 0
    if args.render:
        print(render_saved(Path(args.render)), end="")
        return 0
    try:
        modes = parse_targets(args.targets, args.baseline is not None)
    except ValueError as exc:
        parser.error(str(exc))
    if args.no_gateway:
        modes.pop("gateway", None)
    if args.nice is not None:
        os.environ["BENCH_NICE"] = str(args.nice)
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    config = args.config or CONFIG
    builds = [Build("gateway", REPO, config.resolve())]
    baseline_meta: dict[str, Any] = {}
    if "baseline" in modes:
        try:
            build, baseline_meta = baseline_build(args.baseline, args.config)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"--baseline: {exc}", file=sys.stderr)
            return 2
        builds.append(build)
    # SIGTERM unwinds like Ctrl-C, so the servers started here are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    duration = args.duration or (3.0 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 3)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    meta = {
        "utc": stamp, "commit": git_commit(), "quick": args.quick, "rounds": rounds,
        "duration_s": duration, "transport": args.transport, "chunks": 20, "chunk_delay_ms": 5,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()), "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "nice": os.environ.get("BENCH_NICE"),
        "config": str(config),
    }  # fmt: skip
    if args.targets:
        meta["targets"] = {t: list(m) for t, m in modes.items()}
    if baseline_meta:
        meta["gateway_tree"] = {"dir": str(REPO), **git_tree(REPO)}
        meta["baseline"] = baseline_meta
        log(
            f"baseline: {baseline_meta['dir']} at {baseline_meta['commit']}, imports {baseline_meta['imports']}"
        )
    report = run_bench(args, builds, modes, meta, log)
    RESULTS.mkdir(exist_ok=True)
    table = markdown(report)
    (RESULTS / f"{stamp}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (RESULTS / "latest.md").write_text(table)
    # the README keeps the reference figures: an A/B or a subset of targets is not one
    if not (args.quick or args.no_readme or baseline_meta or args.targets):
        update_readme(table)
    print(table)
    log(f"wrote bench/results/{stamp}.json and bench/results/latest.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
