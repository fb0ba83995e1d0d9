"""Which upstream transport: CPU per upstream request, and the bare pass-through's RPS.

    python -m bench.bench_transport [--rounds 5] [--requests 2000] [--duration 5]

Part 1, the client alone. For each client, in a fresh process pinned to core 0 with
the mock upstream on core 1: warm up, then N POSTs sequentially (c=1) and N at
concurrency 16, timing the process's CPU (time.process_time, cross-checked with
getrusage) and wall clock. Clients:

- ``httpx-default``            httpx's own transport (httpcore + anyio), sniffio installed
- ``httpx-default-nosniffio``  the same with sniffio hidden, as on a machine without it:
                               site-packages is replaced on sys.path by a symlink copy
                               without sniffio, so every ``import sniffio`` really fails
- ``httpx-aiohttp``            httpx over ``httpx_aiohttp.AiohttpTransport``
- ``httpx-aiohttp-tuned``      the same, URL parsed once and no cookie jar
                               (bench.passthrough.tune)
- ``httpx-aiohttp-transport``  an httpx.Request sent straight to the AiohttpTransport,
                               past the client's layers (what gateway/providers does)
- ``aiohttp``                  a plain ``aiohttp.ClientSession``, the floor

A probe also counts how many times httpcore runs ``import sniffio`` per request and
what one such import costs with and without the package.

Part 2, the bare pass-through (bench/passthrough.py) on core 0 per transport, wrk
-t1 -c16 on core 1: RPS and server CPU per request.

Rounds interleave every client and transport (order rotated each round); figures are
medians over rounds. Writes bench/results/transport-<UTC timestamp>.json and prints a
table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.run import (
    DRIVER_CPU,
    REPO,
    RESULTS,
    SERVER_CPU,
    Server,
    cpu_seconds,
    free_port,
    pinned,
    rss_mb,
    run_wrk,
    spawn,
    wait_port,
)

CLIENTS = (
    "httpx-default",
    "httpx-default-nosniffio",
    "httpx-aiohttp",
    "httpx-aiohttp-tuned",
    "httpx-aiohttp-transport",
    "aiohttp",
)
PASSTHROUGH_TRANSPORTS = ("default", "aiohttp", "aiohttp-tuned", "aiohttp-transport", "raw-aiohttp")
CLIENT_CONCURRENCY = (1, 16)
BODY = (
    b'{"model":"bench-model","messages":[{"role":"system","content":"You are a helpful '
    b'assistant."},{"role":"user","content":"Say hello to alice@example.com, then tell me '
    b'a short fact."}],"max_tokens":64,"temperature":0}'
)
HEADERS = {"content-type": "application/json", "authorization": "Bearer bench"}


# --- the worker (one client, one process) -------------------------------------------


def hide_sniffio() -> str:
    """Make ``import sniffio`` fail for real: swap site-packages for a copy without it.

    Must run before anything imports anyio/httpx. Returns the overlay directory.
    """
    import importlib
    import importlib.util

    spec = importlib.util.find_spec("sniffio")
    if spec is None or spec.origin is None:
        return "(sniffio not installed)"
    site = str(Path(spec.origin).parent.parent)
    overlay = tempfile.mkdtemp(prefix="site-nosniffio-")
    for name in os.listdir(site):
        if not name.lower().startswith("sniffio"):
            os.symlink(os.path.join(site, name), os.path.join(overlay, name))
    sys.path[:] = [overlay if p == site else p for p in sys.path]
    sys.modules.pop("sniffio", None)
    importlib.invalidate_caches()
    try:
        import sniffio  # noqa: F401
    except ImportError:
        return overlay
    raise RuntimeError("could not hide sniffio")


def make_client(name: str) -> tuple[Any, Any]:
    """(send coroutine function, close coroutine function) for one client."""
    if name == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=60),
            auto_decompress=False,
        )

        async def send_aiohttp(url: str) -> int:
            async with session.post(url, data=BODY, headers=HEADERS) as resp:
                await resp.read()
                return resp.status

        return send_aiohttp, session.close

    import httpx

    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    if name.startswith("httpx-aiohttp"):
        from httpx_aiohttp import AiohttpTransport

        client = httpx.AsyncClient(transport=AiohttpTransport(limits=limits), limits=limits)
    else:
        client = httpx.AsyncClient(limits=limits)
    tuned = name.endswith("-tuned")
    if tuned:
        from bench.passthrough import tune

        tune(client)
    parsed: dict[str, httpx.URL] = {}
    if name == "httpx-aiohttp-transport":
        # what gateway/providers does: an httpx.Request straight into the transport,
        # past the client's auth/redirect/cookie/URL-merging layers
        transport = client._transport

        async def send_transport(url: str) -> int:
            target = parsed.get(url) or parsed.setdefault(url, httpx.URL(url))
            request = httpx.Request("POST", target, content=BODY, headers=HEADERS)
            resp = await transport.handle_async_request(request)
            try:
                await resp.aread()
            finally:
                await resp.aclose()
            return resp.status_code

        return send_transport, client.aclose

    async def send_httpx(url: str) -> int:
        target: str | httpx.URL = url
        if tuned:  # the URL parsed once
            target = parsed.get(url) or parsed.setdefault(url, httpx.URL(url))
        resp = await client.post(target, content=BODY, headers=HEADERS)
        return resp.status_code

    return send_httpx, client.aclose


async def drive(send: Any, url: str, n: int, concurrency: int) -> int:
    """n requests at ``concurrency``; returns how many were not 200."""
    import asyncio

    remaining, bad = n, 0

    async def worker() -> None:
        nonlocal remaining, bad
        while remaining > 0:
            remaining -= 1
            if await send(url) != 200:
                bad += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return bad


async def probe_sniffio(send: Any, url: str) -> dict[str, Any]:
    """How often httpcore calls current_async_library (→ ``import sniffio``) per request."""
    import timeit

    import httpcore._backends.auto as auto
    import httpcore._synchronization as sync

    original = sync.current_async_library
    calls = 0

    def counting() -> str:
        nonlocal calls
        calls += 1
        return original()

    sync.current_async_library = counting
    auto.current_async_library = counting  # type: ignore[attr-defined]
    try:
        await drive(send, url, 200, 1)
    finally:
        sync.current_async_library = original
        auto.current_async_library = original  # type: ignore[attr-defined]

    def import_once() -> None:
        try:
            import sniffio  # noqa: F401
        except ImportError:
            pass

    number = 2000
    import_us = min(timeit.repeat(import_once, number=number, repeat=5)) / number * 1e6
    call_us = min(timeit.repeat(original, number=number, repeat=5)) / number * 1e6
    return {"calls_per_request": calls / 200, "import_us": import_us, "call_us": call_us}


async def worker_main(name: str, url: str, n: int, concurrency: int, probe: bool) -> dict[str, Any]:
    send, close = make_client(name)
    out: dict[str, Any] = {"client": name, "concurrency": concurrency, "requests": n}
    try:
        await drive(send, url, max(200, concurrency * 20), concurrency)  # warm-up
        if probe:
            out["probe"] = await probe_sniffio(send, url)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        bad = await drive(send, url, n, concurrency)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        await close()
    ru_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    out.update(
        errors=bad,
        cpu_us=cpu / n * 1e6,
        rusage_cpu_us=ru_cpu / n * 1e6,
        wall_us=wall / n * 1e6,
        rps=n / wall,
    )
    return out


def run_worker(args: argparse.Namespace) -> None:
    overlay = hide_sniffio() if args.worker.endswith("-nosniffio") else None
    name = args.worker.removesuffix("-nosniffio")
    import uvloop

    result = uvloop.run(worker_main(name, args.url, args.requests, args.concurrency, args.probe))
    result["client"] = args.worker
    if overlay:
        import shutil

        shutil.rmtree(overlay, ignore_errors=True)
    print(json.dumps(result))


def client_run(
    client: str, url: str, n: int, concurrency: int, probe: bool = False
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "bench.bench_transport", "--worker", client, "--url", url,
        "--requests", str(n), "--concurrency", str(concurrency),
    ] + (["--probe"] if probe else [])  # fmt: skip
    out = subprocess.run(pinned(SERVER_CPU, cmd), capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"worker {client} failed: {out.stderr[-1500:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --- the parent ----------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rotate(items: tuple[str, ...], by: int) -> list[str]:
    by %= len(items)
    return list(items[by:] + items[:by])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="per client measurement")
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds per pass-through wrk run"
    )
    parser.add_argument(
        "--clients",
        default=",".join(CLIENTS),
        help="comma-separated subset of " + ",".join(CLIENTS),
    )
    parser.add_argument(
        "--transports",
        default=",".join(PASSTHROUGH_TRANSPORTS),
        help="pass-through transports, comma-separated subset of "
        + ",".join(PASSTHROUGH_TRANSPORTS),
    )
    parser.add_argument("--worker", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    clients = tuple(c for c in args.clients.split(",") if c)
    transports = tuple(t for t in args.transports.split(",") if t)
    unknown = set(clients) - set(CLIENTS) | set(transports) - set(PASSTHROUGH_TRANSPORTS)
    if unknown:
        parser.error(f"unknown client or transport: {', '.join(sorted(unknown))}")
    # SIGTERM unwinds like Ctrl-C, so the servers started here are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logdir = Path(tempfile.mkdtemp(prefix="tallygate-transport-"))
    mock_port = free_port()
    mock = spawn(
        "mock", [sys.executable, "-m", "bench.mock_upstream", "--port", str(mock_port)],
        DRIVER_CPU, mock_port, logdir,
    )  # fmt: skip
    servers: list[Server] = [mock]
    report: dict[str, Any] = {
        "meta": {
            "utc": stamp, "rounds": args.rounds, "requests": args.requests,
            "duration_s": args.duration, "loadavg": os.getloadavg(),
            "versions": versions(),
        },
    }  # fmt: skip
    try:
        if not wait_port(mock):
            raise RuntimeError(f"mock did not start: {mock.stderr_tail()}")
        url = f"http://127.0.0.1:{mock_port}/v1/chat/completions"

        # the mock's own ceiling: wrk on the other core, the mock's CPU per request
        ceiling: dict[str, Any] = {}
        run_wrk(url, 16, 1, cpu=SERVER_CPU)  # warm-up
        for c in (16, 64):
            cpu0 = cpu_seconds(mock.pid)
            res = run_wrk(url, c, args.duration, cpu=SERVER_CPU)
            cpu = cpu_seconds(mock.pid) - cpu0
            ceiling[str(c)] = {
                "rps": res["rps"],
                "p99_ms": res["p99_us"] / 1000,
                "mock_cpu_util": cpu / (res["duration_us"] / 1e6),
                "mock_cpu_us_per_req": 1e6 * cpu / max(1, res["requests"]),
            }
            log(f"  mock ceiling c={c}: {ceiling[str(c)]}")
        report["mock_ceiling"] = ceiling

        # probes: sniffio imports per request, with and without the package
        report["sniffio_probe"] = {
            c: client_run(c, url, 200, 1, probe=True)["probe"]
            for c in ("httpx-default", "httpx-default-nosniffio")
        }
        log(f"sniffio probe: {report['sniffio_probe']}")

        client_runs: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for client in rotate(clients, r):
                for c in CLIENT_CONCURRENCY:
                    res = client_run(client, url, args.requests, c)
                    res["round"] = r
                    client_runs.append(res)
                    log(
                        f"  r{r} {client:<24} c={c:<2} cpu {res['cpu_us']:7.1f} µs/req "
                        f"(rusage {res['rusage_cpu_us']:7.1f}) wall {res['wall_us']:7.1f} µs "
                        f"{res['rps']:7.0f} req/s errors {res['errors']}"
                    )
        report["clients"] = client_runs

        pts: dict[str, Server] = {}
        for t in transports:
            port = free_port()
            pts[t] = spawn(
                f"pt-{t}",
                [
                    sys.executable, "-m", "bench.passthrough", "--port", str(port),
                    "--upstream", f"http://127.0.0.1:{mock_port}", "--transport", t,
                ],
                SERVER_CPU, port, logdir,
            )  # fmt: skip
            servers.append(pts[t])
        for t, srv in pts.items():
            if not wait_port(srv):
                raise RuntimeError(f"pass-through {t} did not start: {srv.stderr_tail()}")
            run_wrk(f"http://127.0.0.1:{srv.port}/v1/chat/completions", 16, 1)  # warm-up
        passthrough: list[dict[str, Any]] = []
        for r in range(args.rounds):
            for t in rotate(transports, r):
                srv = pts[t]
                cpu0 = cpu_seconds(srv.pid)
                res = run_wrk(f"http://127.0.0.1:{srv.port}/v1/chat/completions", 16, args.duration)
                res.update(
                    round=r, transport=t,
                    cpu_us_per_req=1e6 * (cpu_seconds(srv.pid) - cpu0) / max(1, res["requests"]),
                    rss_mb=rss_mb(srv.pid)[0],
                )  # fmt: skip
                passthrough.append(res)
                log(
                    f"  r{r} pass-through {t:<12} {res['rps']:7.0f} rps p50 "
                    f"{res['p50_us'] / 1000:6.2f} ms p99 {res['p99_us'] / 1000:6.2f} ms "
                    f"cpu {res['cpu_us_per_req']:7.1f} µs/req errors {res['errors']}"
                )
        report["passthrough"] = passthrough
    finally:
        for srv in servers:
            srv.stop()

    report["summary"] = summarize(report)
    table = render(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"transport-{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "transport-latest.md").write_text(table)
    print(table)
    log(f"wrote bench/results/transport-{stamp}.json and bench/results/transport-latest.md")
    return 0


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("httpx", "httpcore", "httpx-aiohttp", "aiohttp", "anyio", "sniffio", "uvloop",
                "starlette", "uvicorn"):  # fmt: skip
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "missing"
    out["python"] = sys.version.split()[0]
    return out


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    clients: dict[str, dict[str, Any]] = {}
    for client in dict.fromkeys(r["client"] for r in report["clients"]):
        for c in CLIENT_CONCURRENCY:
            rs = [r for r in report["clients"] if r["client"] == client and r["concurrency"] == c]
            clients.setdefault(client, {})[c] = {
                "cpu_us": med([r["cpu_us"] for r in rs]),
                "rusage_cpu_us": med([r["rusage_cpu_us"] for r in rs]),
                "rps": med([r["rps"] for r in rs]),
                "errors": sum(r["errors"] for r in rs),
                "spread_us": (min(r["cpu_us"] for r in rs), max(r["cpu_us"] for r in rs)),
            }
    pts: dict[str, dict[str, Any]] = {}
    for t in dict.fromkeys(r["transport"] for r in report["passthrough"]):
        rs = [r for r in report["passthrough"] if r["transport"] == t]
        pts[t] = {
            "rps": med([r["rps"] for r in rs]),
            "p50_ms": med([r["p50_us"] / 1000 for r in rs]),
            "p99_ms": med([r["p99_us"] / 1000 for r in rs]),
            "cpu_us_per_req": med([r["cpu_us_per_req"] for r in rs]),
            "rss_mb": med([r["rss_mb"] for r in rs]),
            "errors": sum(r["errors"] for r in rs),
            "spread_rps": (min(r["rps"] for r in rs), max(r["rps"] for r in rs)),
        }
    return {"clients": clients, "passthrough": pts}


def render(report: dict[str, Any]) -> str:
    s, meta = report["summary"], report["meta"]
    v = meta["versions"]
    lines = [
        f"Upstream transport — {meta['utc']} — medians of {meta['rounds']} interleaved rounds; "
        f"client on core {SERVER_CPU}, mock upstream (and wrk) on core {DRIVER_CPU}; "
        f"httpx {v['httpx']}, httpcore {v['httpcore']}, httpx-aiohttp {v['httpx-aiohttp']}, "
        f"aiohttp {v['aiohttp']}, anyio {v['anyio']}, sniffio {v['sniffio']}.",
        "",
        f"Client CPU per upstream request ({meta['requests']} POSTs per run, uvloop):",
        "",
        "| client | CPU µs/req c=1 | CPU µs/req c=16 | req/s c=1 | req/s c=16 | min-max µs c=16 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for client, rows in s["clients"].items():
        one, many = rows[1], rows[16]
        lo, hi = many["spread_us"]
        lines.append(
            f"| {client} | {one['cpu_us']:.0f} | {many['cpu_us']:.0f} | {one['rps']:,.0f} | "
            f"{many['rps']:,.0f} | {lo:.0f}-{hi:.0f} |"
            + (" errors!" if one["errors"] or many["errors"] else "")
        )
    ceiling = report.get("mock_ceiling", {})
    if ceiling:
        lines += [
            "",
            "The mock upstream's own ceiling (wrk on the other core):",
            "",
            "| c | RPS | p99 ms | mock CPU | mock CPU µs/req | RPS at 100 % of its core |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for c, r in ceiling.items():
            per_core = 1e6 / r["mock_cpu_us_per_req"] if r["mock_cpu_us_per_req"] else 0
            lines.append(
                f"| {c} | {r['rps']:,.0f} | {r['p99_ms']:.2f} | {100 * r['mock_cpu_util']:.0f} % | "
                f"{r['mock_cpu_us_per_req']:.1f} | {per_core:,.0f} |"
            )
    probe = report.get("sniffio_probe", {})
    if probe:
        with_p, without = probe.get("httpx-default", {}), probe.get("httpx-default-nosniffio", {})
        lines += [
            "",
            f"httpcore calls `current_async_library()` (and so runs `import sniffio`) "
            f"{with_p.get('calls_per_request', 0):.1f} times per request on a kept-alive "
            f"connection; one `import sniffio` costs {with_p.get('import_us', 0):.2f} µs with "
            f"sniffio installed and {without.get('import_us', 0):.1f} µs without (a failed "
            f"search of sys.path).",
        ]
    lines += [
        "",
        "Bare pass-through (bench/passthrough.py), wrk -t1 -c16:",
        "",
        "| transport | RPS | p50 ms | p99 ms | server CPU µs/req | RSS MB | min-max RPS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t, r in s["passthrough"].items():
        lo, hi = r["spread_rps"]
        lines.append(
            f"| {t} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['cpu_us_per_req']:.0f} | {r['rss_mb']:.1f} | {lo:,.0f}-{hi:,.0f} |"
            + (f" {r['errors']} errors!" if r["errors"] else "")
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
