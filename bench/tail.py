"""The latency tail under load: the pass-through and the gateway (and a baseline build)
at one concurrency, interleaved, each server under the loop-lag probe (bench/probe.py).

    python -m bench.tail [--rounds 5] [--duration 8] [-c 64] [--baseline DIR]
                         [--passthrough-batch] [--no-probe] [--no-passthrough]
    BENCH_NICE=-10 python -m bench.tail ...   # as root: favour the bench over other work

Same processes and pinning as bench.run (server on core 0; mock, receiver and wrk on core
1). Per run: wrk's p50/p90/p99/max; the server's CPU per request and per thread; the
listening socket's accept queue during the first 1.5 s; the kernel's TCP counters; for a
gateway, its access log's latency_ms (the time inside the app). With the probe: loop lag,
the time the loop waited for a CPU, GC per generation, the gateway's background work
(span export, store flush, access-log flush, metrics collection) and how often it overlaps
a long loop turn, the latency as uvicorn's protocol sees it (head parsed to response
written), the time from a response to the connection's next request, and when each
connection was accepted. `--no-probe` for figures to quote (the probe costs a little CPU).
Ends with medians, p99/p50 per target, and ratios paired per round. Writes
bench/results/tail-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.run import (
    CONFIG,
    DRIVER_CPU,
    KEY,
    RESULTS,
    SERVER_CPU,
    Build,
    Server,
    build_env,
    chat_body,
    cpu_seconds,
    distinct_ports,
    http,
    run_wrk,
    spawn,
    tiktoken_cache,
    wait_port,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread id of ``pid``."""
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def start(
    name: str, cmd: list[str], port: int, logdir: Path, env: dict[str, str], probe: bool, cwd: Path
) -> Server:
    env = {**env, "PROBE_OUT": str(logdir / f"{name}.probe.jsonl")}
    if probe:
        cmd = [sys.executable, "-m", "bench.probe", *cmd[2:]]
    srv = spawn(name, cmd, SERVER_CPU, port, logdir, env, cwd=cwd)
    if not wait_port(srv, 60):
        raise RuntimeError(f"{name} did not start: {srv.stderr_tail()}")
    return srv


def probe_dump(srv: Server, logdir: Path) -> dict[str, Any] | None:
    path = logdir / f"{srv.name}.probe.jsonl"
    size = path.stat().st_size if path.exists() else 0
    srv.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > size:
            time.sleep(0.05)
            with path.open() as f:
                return dict(json.loads(f.readlines()[-1]))
        time.sleep(0.02)
    return None


def access_latencies(srv: Server, offset: int) -> dict[str, float] | None:
    """The gateway's own latency_ms (access log) for the lines written since ``offset``:
    from the app's first look at the request to its end, so without the time the request
    waited in the socket and in uvicorn before the app ran."""
    time.sleep(0.1)  # the access log flushes every 50 ms
    with srv.stdout.open("rb") as f:
        f.seek(offset)
        lats = sorted(json.loads(raw)["latency_ms"] for raw in f if raw.startswith(b'{"timestamp'))
    if not lats:
        return None

    def pct(p: float) -> float:
        return float(lats[min(len(lats) - 1, int(p * len(lats)))])

    return {"n": len(lats), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": lats[-1]}


TCP_COUNTERS = (
    "ListenOverflows", "ListenDrops", "TCPTimeouts", "RetransSegs", "TCPSynRetrans",
    "TCPLostRetransmit", "TCPFastRetrans", "TCPLossProbes", "TCPDelivered",
)  # fmt: skip


def tcp_counters() -> dict[str, int]:
    """The kernel's TCP counters (machine-wide: other work on the machine counts too)."""
    out: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        with open(path) as f:
            rows = f.read().splitlines()
        for names, values in zip(rows[::2], rows[1::2], strict=False):
            for k, v in zip(names.split()[1:], values.split()[1:], strict=False):
                if k in TCP_COUNTERS:
                    out[k] = int(v)
    return out


def accept_queue(port: int, out: list[tuple[float, int]], seconds: float) -> None:
    """Sample the listening socket's accept queue (connections the kernel completed and
    the server has not accepted yet: rx_queue of the LISTEN row in /proc/net/tcp) every
    few ms."""
    local = f":{port:04X}"
    end = time.time() + seconds
    while time.time() < end:
        queued = -1
        with open("/proc/net/tcp") as f:
            for row in f:
                cols = row.split()
                if cols[1].endswith(local) and cols[3] == "0A":  # LISTEN
                    queued = int(cols[4].split(":")[1], 16)
        out.append((time.time(), queued))
        time.sleep(0.005)


def one_run(
    srv: Server, url: str, c: int, duration: float, logdir: Path, probe: bool
) -> dict[str, Any]:
    if probe:
        probe_dump(srv, logdir)  # reset
    log_at = srv.stdout.stat().st_size
    cpu0, threads0, tcp0 = cpu_seconds(srv.pid), thread_cpu(srv.pid), tcp_counters()
    port = int(url.split(":")[2].split("/")[0])
    queue: list[tuple[float, int]] = []
    sampler = threading.Thread(target=accept_queue, args=(port, queue, 1.5), daemon=True)
    launched = time.time()
    sampler.start()
    res = run_wrk(url, c, duration)
    sampler.join()
    res["accept_queue"] = [(round(1000 * (t - launched)), n) for t, n in queue if n]
    res["tcp"] = {k: v - tcp0.get(k, 0) for k, v in tcp_counters().items() if v != tcp0.get(k)}
    cpu, threads1 = cpu_seconds(srv.pid) - cpu0, thread_cpu(srv.pid)
    seconds = res["duration_us"] / 1e6
    res["cpu_ms_per_req"] = 1000 * cpu / max(1, res["requests"])
    res["cpu_util"] = cpu / seconds
    res["loadavg"] = os.getloadavg()[0]
    per_thread = {tid: t - threads0.get(tid, 0.0) for tid, t in threads1.items()}
    res["probe"] = probe_dump(srv, logdir) if probe else None
    res["server_latency"] = access_latencies(srv, log_at)
    names = (res["probe"] or {}).get("threads", {})
    made = (res["probe"] or {}).get("made_wall")
    if made:
        res["accepted_ms"] = [round(1000 * (t - launched), 1) for t in sorted(made)[::8]]
    res["threads_util"] = {
        names.get(str(tid), "main" if tid == srv.pid else str(tid)): round(t / seconds, 3)
        for tid, t in sorted(per_thread.items(), key=lambda kv: -kv[1])
        if t > 0
    }
    return res


def line(target: str, res: dict[str, Any]) -> str:
    """One run, as printed: wrk's figures, then one indented line per finding."""
    ms = {k: res[f"{k}_us"] / 1000 for k in ("p50", "p90", "p99", "max")}
    out = [
        f"{target:<17} {res['rps']:6.0f} rps p50 {ms['p50']:6.2f} p90 {ms['p90']:6.2f} "
        f"p99 {ms['p99']:6.2f} max {ms['max']:6.1f} ms p99/p50 {ms['p99'] / ms['p50']:.2f} "
        f"cpu {res['cpu_ms_per_req']:.3f} ms/req load {res['loadavg']:.2f}"
    ]
    more = [
        f"accept queue (ms after wrk started, queued): {res['accept_queue'][:30]}",
        f"threads (share of a core) {res['threads_util']}; tcp {res['tcp']}",
    ]
    if (s := res.get("server_latency")) is not None:
        more.append(
            f"in-app latency p50 {s['p50']:.2f} p90 {s['p90']:.2f} p99 {s['p99']:.2f} "
            f"max {s['max']:.1f} ms"
        )
    if (p := res["probe"]) is not None:
        lag, gc_, h, g = p["lag_ms"], p["gc"], p["http_ms"], p["gap_ms"]
        more += [
            f"loop lag p50 {lag['p50']:.2f} p99 {lag['p99']:.2f} max {lag['max']:.1f} ms; "
            f"over 5/10/20 ms {p['lags_over_5ms']}/{p['lags_over_10ms']}/{p['lags_over_20ms']}; "
            f"waited for a CPU {p['run_delay_ms']:.0f} ms",
            f"worst lags (t s, lag ms, of it waiting for a CPU ms) {p['worst']}",
            f"gc n {gc_['0']['n']}/{gc_['1']['n']}/{gc_['2']['n']}, longest "
            f"{max(x['max_ms'] for x in gc_.values()):.1f} ms",
            f"in-server latency p50 {h['p50']:.2f} p90 {h['p90']:.2f} p99 {h['p99']:.2f} "
            f"max {h['max']:.1f} ms",
            f"response -> next request p50 {g['p50']:.2f} p99 {g['p99']:.2f} max "
            f"{g['max']:.1f} ms; new connections {p['new_connections']}",
            f"accepted (ms after wrk started, every 8th) {res.get('accepted_ms')}",
            f"first requests: accepted -> head {p['first_wait_ms']}, in-server "
            f"{p['first_http_ms']}",
            f"background work {p['events']}",
        ]
    return "\n".join(out + [f"{'':4}{m}" for m in more])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--baseline", type=Path, metavar="DIR")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--no-probe", action="store_true", help="run the servers as they are")
    parser.add_argument("--no-passthrough", action="store_true")
    parser.add_argument(
        "--passthrough-batch",
        action="store_true",
        help="also the pass-through on the gateway's batch listener (target passthrough-batch)",
    )
    args = parser.parse_args(argv)
    if int(DRIVER_CPU) < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {int(DRIVER_CPU)})  # this script's sampling stays off core 0
    probe = not args.no_probe
    logdir = Path(tempfile.mkdtemp(prefix="tallygate-tail-"))
    spawned: list[Server] = []
    mock_port, otlp_port, pt_port, pt2_port, gw_port, base_port = distinct_ports(6)
    try:
        mock = spawn(
            "mock", [sys.executable, "-m", "bench.mock_upstream", "--port", str(mock_port)],
            DRIVER_CPU, mock_port, logdir,
        )  # fmt: skip
        receiver = spawn(
            "otlp", [sys.executable, "-m", "bench.run", "--serve-otlp", str(otlp_port)],
            DRIVER_CPU, otlp_port, logdir,
        )  # fmt: skip
        spawned += [mock, receiver]
        for srv in (mock, receiver):
            if not wait_port(srv, 20):
                raise RuntimeError(f"{srv.name} did not start")
        targets: dict[str, tuple[Server, str]] = {}
        pt_accepts = [] if args.no_passthrough else ["uvloop"]
        pt_accepts += ["batch"] if args.passthrough_batch else []
        for accept, port in zip(pt_accepts, (pt_port, pt2_port), strict=False):
            name = "passthrough" if accept == "uvloop" else "passthrough-batch"
            pt = start(
                name,
                [sys.executable, "-m", "bench.passthrough", "--port", str(port),
                 "--upstream", f"http://127.0.0.1:{mock_port}",
                 "--transport", "aiohttp-transport", "--accept", accept],
                port, logdir, {}, probe, Path.cwd(),
            )  # fmt: skip
            spawned.append(pt)
            targets[name] = (pt, f"http://127.0.0.1:{port}/v1/chat/completions")
        builds = [Build("gateway", Path.cwd().resolve(), args.config or CONFIG)]
        if args.baseline:
            tree = args.baseline.resolve()
            builds.append(Build("baseline", tree, args.config or tree / "bench/config.bench.yaml"))
        for build, port in zip(builds, (gw_port, base_port), strict=False):
            env = {
                "BENCH_UPSTREAM_PORT": str(mock_port),
                "BENCH_KEY": KEY,
                "BENCH_DB": str(logdir / f"tallygate-{build.name}.db"),
                "BENCH_OTLP": f"http://127.0.0.1:{otlp_port}",
                **tiktoken_cache(),
                **build_env(build),
            }
            cmd = [
                sys.executable, "-m", "gateway", "serve", "--config", str(build.config),
                "--host", "127.0.0.1", "--port", str(port),
            ]  # fmt: skip
            if probe and build.tree != Path.cwd().resolve():
                # bench.probe comes from this checkout; the build's packages from its tree
                env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(Path.cwd())])
            srv = start(build.name, cmd, port, logdir, env, probe, build.tree)
            spawned.append(srv)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            status, body = http("POST", url, chat_body())
            if status != 200:
                raise RuntimeError(f"{build.name} answered {status}: {body[:300]!r}")
            targets[build.name] = (srv, url)
        for _, url in targets.values():
            run_wrk(url, 16, 2)  # warm-up
        runs: list[dict[str, Any]] = []
        for r in range(args.rounds):
            # every other round in reverse order: neither target always runs right after
            # the other (a neighbour's leftover work, or a warm cache, favours no one)
            order = list(targets.items())
            for name, (srv, url) in order if r % 2 == 0 else order[::-1]:
                res = one_run(srv, url, args.concurrency, args.duration, logdir, probe)
                res.update(round=r, target=name)
                runs.append(res)
                print(f"r{r} {line(name, res)}", flush=True)
        summary(runs, list(targets))
        RESULTS.mkdir(exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = RESULTS / f"tail-{stamp}.json"
        out.write_text(
            json.dumps(
                {"args": vars(args) | {"baseline": str(args.baseline)}, "runs": runs},
                indent=1,
                default=str,
            )
        )
        print(f"wrote {out}")
    finally:
        for srv in reversed(spawned):
            srv.stop()
        shutil.rmtree(logdir, ignore_errors=True)  # access logs: tens of MB a run
    return 0


def summary(runs: list[dict[str, Any]], targets: list[str]) -> None:
    """Medians per target, then ratios paired per round."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_round.setdefault(r["round"], {})[r["target"]] = r

    def paired(a: str, b: str, key: str) -> str:
        ratios = [v[a][key] / v[b][key] for v in by_round.values()]
        each = ", ".join(f"{x:.2f}" for x in ratios)
        return f"{each}; median {statistics.median(ratios):.2f}"

    def med(t: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["target"] == t)

    print("\nmedians:")
    for t in targets:
        shape = statistics.median(r["p99_us"] / r["p50_us"] for r in runs if r["target"] == t)
        print(
            f"  {t:<17} rps {med(t, 'rps'):7.0f} p50 {med(t, 'p50_us') / 1000:7.2f} "
            f"p99 {med(t, 'p99_us') / 1000:7.2f} ms p99/p50 {shape:.2f} "
            f"cpu {med(t, 'cpu_ms_per_req'):.3f} ms/req"
        )
    for t in ("gateway", "baseline"):
        for pt in ("passthrough", "passthrough-batch"):
            if t in targets and pt in targets:
                print(f"  {t} p99 / {pt} p99 per round: {paired(t, pt, 'p99_us')}")
                print(f"  {t} p50 / {pt} p50 per round: {paired(t, pt, 'p50_us')}")
    if "baseline" in targets:
        for key in ("p99_us", "p50_us", "cpu_ms_per_req", "rps"):
            print(f"  gateway/baseline {key}: {paired('gateway', 'baseline', key)}")


if __name__ == "__main__":
    sys.exit(main())
