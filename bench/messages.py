"""Issue 14's overhead check: /v1/messages native pass-through vs chat completions, same run.

    python -m bench.messages [--duration S] [--rounds R] [--quick]

Starts the mock upstream (it answers both APIs), bench.run's OTLP receiver and one gateway
with every feature on (bench/config.messages.yaml: bench/config.bench.yaml's openai chat
alias plus an ``anthropic`` deployment on the same mock), pinned like bench.run. Checks
once that the gateway's /v1/messages answer is the mock's Message relayed byte for byte
(so the native pass-through is what gets measured, not a translation or an error) and
that it was billed. Then, in interleaved rounds, wrk at c=1 and c=16 against:

- direct chat        wrk → mock /v1/chat/completions             (bench/post.lua)
- gateway chat       wrk → gateway /v1/chat/completions → mock   (openai deployment)
- direct messages    wrk → mock /v1/messages                     (bench/post_messages.lua)
- gateway messages   wrk → gateway /v1/messages → mock           (anthropic deployment,
                     x-api-key and anthropic-version, as the Anthropic SDKs send them)

Any wrk error (a status above 399, a socket error, a timeout) stops the run. Reports
medians over rounds: RPS, p50, p99, added p50/p99 (gateway - direct of the same shape,
paired per round), CPU per request of the server (the gateway; the mock for direct), and
messages/chat for the gateway's added p50 and CPU per request, the figures issue 14 wants
within 10%. Writes bench/results/messages-<UTC timestamp>.json and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from bench import run as bench
from bench.mock_upstream import MESSAGE_BODY

CONFIG = bench.BENCH_DIR / "config.messages.yaml"
MESSAGES_LUA = bench.BENCH_DIR / "post_messages.lua"
CHAT_MODEL = bench.MODEL  # the openai alias, as in bench/config.bench.yaml
CLAUDE_MODEL = "bench-claude"  # the anthropic alias (bench/config.messages.yaml)
ADMIN_KEY = "sk-bench-admin"  # the config's default for $BENCH_ADMIN_KEY
CONCURRENCY = (1, 16)
SHAPES = ("chat", "messages")
PATHS = {"chat": "/v1/chat/completions", "messages": "/v1/messages"}
WRK = {"chat": (bench.LUA, CHAT_MODEL), "messages": (MESSAGES_LUA, CLAUDE_MODEL)}
LIMIT = 1.10  # issue 14: messages' added overhead within 10% of chat's
ANTHROPIC_VERSION = "2023-06-01"
# post_messages.lua's body, for the check before measuring
MESSAGE_REQUEST = {
    "model": CLAUDE_MODEL,
    "max_tokens": 64,
    "temperature": 0,
    "system": "You are a helpful assistant.",
    "messages": [
        {"role": "user", "content": "Say hello to alice@example.com, then tell me a short fact."}
    ],
}


class BenchError(RuntimeError):
    """The run cannot go on: what was measured would not be the pass-through."""


# --- load ----------------------------------------------------------------------------


@contextlib.contextmanager
def wrk_shape(shape: str, count_status: bool) -> Iterator[None]:
    """bench.run.run_wrk with this shape's script and model: it reads both from its module
    at call time (LUA, MODEL), so they are swapped for the call and put back. The scripts
    count every status when $BENCH_COUNT_STATUS is 1 (wrk's run inherits the env)."""
    saved = bench.LUA, bench.MODEL, os.environ.get("BENCH_COUNT_STATUS")
    bench.LUA, bench.MODEL = WRK[shape]
    os.environ["BENCH_COUNT_STATUS"] = "1" if count_status else "0"
    try:
        yield
    finally:
        bench.LUA, bench.MODEL = saved[:2]
        if saved[2] is None:
            os.environ.pop("BENCH_COUNT_STATUS", None)
        else:
            os.environ["BENCH_COUNT_STATUS"] = saved[2]


def wrk(
    url: str, shape: str, concurrency: int, duration: float, count_status: bool = False
) -> dict[str, Any]:
    """One wrk run; raises BenchError on any error, so no failure is timed as a success.

    wrk's own error count covers statuses above 399 and socket errors; with
    ``count_status`` (the warm-up: it costs wrk CPU) every response must be a 200."""
    with wrk_shape(shape, count_status):
        res = bench.run_wrk(url, concurrency, duration)
    errors = {k: v for k, v in res.items() if k.startswith("errors_") and v}
    statuses = res.get("status") or {}
    if count_status and set(statuses) != {"200"}:
        errors["statuses"] = statuses
    if errors or not res["requests"]:
        raise BenchError(
            f"wrk {shape} c={concurrency} {url}: {res['requests']} requests, errors {errors}"
        )
    return res


def targets(setup: bench.Setup) -> dict[tuple[str, str], str]:
    """(shape, target) -> URL, in round order: direct then gateway, per shape."""
    mock = f"http://127.0.0.1:{setup.mock.port}"
    gateway = setup.urls["gateway"].removesuffix(PATHS["chat"])
    return {
        (shape, t): base + PATHS[shape]
        for shape in SHAPES
        for t, base in (("direct", mock), ("gateway", gateway))
    }


def measure(setup: bench.Setup, rounds: int, duration: float, log: Any) -> list[dict[str, Any]]:
    """Every (round, concurrency, shape, target) wrk run. The shapes alternate which goes
    first each round, so neither always runs on a machine the other just warmed."""
    urls = targets(setup)
    for (shape, _), url in urls.items():  # warm-up, not timed: every status must be 200
        wrk(url, shape, 16, 1, count_status=True)
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        order = SHAPES if r % 2 == 0 else SHAPES[::-1]
        for c in CONCURRENCY:
            for shape in order:
                for t in ("direct", "gateway"):
                    runs.append(one_run(setup, urls[shape, t], shape, t, c, duration, r))
                    log(line(runs[-1]))
    return runs


def one_run(
    setup: bench.Setup, url: str, shape: str, target: str, c: int, duration: float, r: int
) -> dict[str, Any]:
    pid = setup.mock.pid if target == "direct" else setup.servers["gateway"].pid
    cpu0 = bench.cpu_seconds(pid)
    res = wrk(url, shape, c, duration)
    cpu = bench.cpu_seconds(pid) - cpu0
    res.update(
        round=r, mode="plain", concurrency=c, shape=shape, target=target,
        loadavg=os.getloadavg()[0], cpu_ms_per_req=1000 * cpu / max(1, res["requests"]),
        cpu_util=cpu / (res["duration_us"] / 1e6),
    )  # fmt: skip
    return res


def line(res: dict[str, Any]) -> str:
    return (
        f"  r{res['round']} c={res['concurrency']:<3} {res['shape']:<8} {res['target']:<8} "
        f"{res['rps']:9.0f} rps p50 {res['p50_us'] / 1000:7.3f} ms "
        f"p99 {res['p99_us'] / 1000:7.3f} ms cpu {res['cpu_ms_per_req']:.3f} ms/req"
    )


# --- the check before measuring --------------------------------------------------------


def request(
    method: str, url: str, headers: dict[str, str], body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One blocking request (the check only, never load)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def team_spend(base: str) -> tuple[float, float]:
    """(spent, reserved) USD of the bench team, from /admin/spend."""
    status, _, body = request(
        "GET", f"{base}/admin/spend?team=bench", {"authorization": f"Bearer {ADMIN_KEY}"}
    )
    if status != 200:
        raise BenchError(f"/admin/spend answered {status}: {body[:300]!r}")
    [row] = [r for r in json.loads(body)["data"] if r["team"] == "bench" and r["key"] is None]
    return float(row["spent_usd"]), float(row["reserved_usd"])


def check_messages(base: str) -> dict[str, Any]:
    """One /v1/messages through the gateway, as wrk sends it: a 200 whose body is the
    mock's Message byte for byte (a translated answer would have another id and shape),
    with its usage, and the team's spend up by its cost once settled."""
    before, _ = team_spend(base)
    headers = {
        "content-type": "application/json",
        "x-api-key": bench.KEY,
        "anthropic-version": ANTHROPIC_VERSION,
    }
    status, resp_headers, body = request(
        "POST", base + PATHS["messages"], headers, json.dumps(MESSAGE_REQUEST).encode()
    )
    if status != 200 or body != MESSAGE_BODY:
        raise BenchError(f"/v1/messages answered {status}, not the mock's Message: {body[:400]!r}")
    message = json.loads(body)
    usage = message["usage"]
    if message["type"] != "message" or not (usage["input_tokens"] and usage["output_tokens"]):
        raise BenchError(f"/v1/messages: not a Message with usage: {message}")
    deadline = time.monotonic() + 5
    while True:
        spent, reserved = team_spend(base)
        if spent > before and reserved == 0:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"/v1/messages was not billed: spent {before} -> {spent}")
        time.sleep(0.05)
    return {
        "status": status,
        "id": message["id"],
        "usage": usage,
        "deployment": resp_headers.get("x-tallygate-deployment"),
        "spend_delta_usd": round(spent - before, 9),
    }


# --- the report ------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per shape, bench.run's medians and per-round added latency; then messages/chat for
    the gateway's added p50 (the ratio of the two medians: one round's can be ~0) and CPU
    per request (paired per round, then the median), and whether each is within LIMIT."""
    out: dict[str, Any] = {}
    for shape in SHAPES:
        shaped = [r for r in runs if r["shape"] == shape]
        out[shape] = bench.summarize(shaped, ["direct", "gateway"])["plain"]
    gateway = [{**r, "target": r["shape"]} for r in runs if r["target"] == "gateway"]
    ratios: dict[int, dict[str, Any]] = {}
    for c in CONCURRENCY:
        chat, msgs = out["chat"]["gateway"][c], out["messages"]["gateway"][c]
        cpu_rounds = bench.paired_ratios(gateway, "plain", c, "cpu_ms_per_req", "messages", "chat")
        added = bench.ratio(msgs["added_p50_ms"], chat["added_p50_ms"])
        cpu = bench.med(cpu_rounds)
        ratios[c] = {
            "added_p50": added,
            "cpu_per_req": cpu,
            "cpu_per_req_rounds": cpu_rounds,
            "within_10pct": added is not None and cpu is not None and max(added, cpu) <= LIMIT,
        }
    return {"shapes": out, "ratios": ratios}


def markdown(report: dict[str, Any]) -> str:
    meta, s = report["meta"], report["summary"]
    fmt = bench.fmt
    lines = [
        f"tallygate /v1/messages vs chat — {meta['utc']} — commit `{meta['commit']}`"
        f"{' + uncommitted changes' if meta['dirty'] else ''} — {meta['rounds']} round(s) x "
        f"{meta['duration_s']} s, medians of interleaved rounds{' (quick)' if meta['quick'] else ''}; "
        f"gateway on core {bench.SERVER_CPU}, mock + wrk on core {bench.DRIVER_CPU}; load "
        f"average (1 min) at start {meta['loadavg']}, highest during the run "
        f"{max((r['loadavg'] for r in report['runs']), default=0.0):.2f} (2 cores).",
        "",
        "| shape | target | c | RPS | p50 ms | p99 ms | added p50 ms | added p99 ms | CPU ms/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, by_target in s["shapes"].items():
        for t, rows in by_target.items():
            for c, r in rows.items():
                lines.append(
                    f"| {shape} | {t} | {c} | {fmt(r['rps'], ',.0f')} | {fmt(r['p50_ms'], '.3f')} | "
                    f"{fmt(r['p99_ms'], '.3f')} | {fmt(r.get('added_p50_ms'), '+.3f')} | "
                    f"{fmt(r.get('added_p99_ms'), '+.3f')} | {fmt(r['cpu_ms_per_req'], '.3f')} |"
                )
    lines += [
        "",
        "Messages/chat, the gateway (issue 14: within 10%, i.e. ≤ 1.10; CPU paired per round):",
        "",
        "| c | added p50 ratio | CPU/req ratio | CPU ratio, each round | within 10% |",
        "|---:|---:|---:|---|---|",
    ]
    for c, r in s["ratios"].items():
        rounds = ", ".join(f"{x:.2f}" for x in r["cpu_per_req_rounds"])
        lines.append(
            f"| {c} | {fmt(r['added_p50'])} | {fmt(r['cpu_per_req'])} | {rounds} | "
            f"{'✅ yes' if r['within_10pct'] else '❌ no'} |"
        )
    check = report["check"]
    otlp = ", ".join(
        f"{k} {v['requests']} requests"
        for k, v in report["checks"].get("otlp_received", {}).items()
    )
    lines += [
        "",
        f"Checked before measuring: /v1/messages answered {check['status']} with the mock's "
        f"Message byte for byte (`{check['id']}`, usage {check['usage']['input_tokens']} in / "
        f"{check['usage']['output_tokens']} out) from deployment `{check['deployment']}`, and "
        f"the team's spend rose ${check['spend_delta_usd']:.6f}. Every wrk run: 0 errors "
        f"(statuses above 399, socket errors, timeouts). OTLP receiver got {otlp or 'nothing'}; "
        f"the gateway wrote {report['checks'].get('stdout_lines', 0):,} access-log lines.",
    ]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------


def run(rounds: int, duration: float, meta: dict[str, Any], log: Any) -> dict[str, Any]:
    build = bench.Build("gateway", bench.REPO, CONFIG)
    modes = {"direct": ("plain",), "gateway": ("plain",)}
    with bench.started("aiohttp-transport", [build], modes) as setup:
        if "gateway" in setup.errors:
            raise BenchError(f"the gateway did not start: {setup.errors['gateway']}")
        base = setup.urls["gateway"].removesuffix(PATHS["chat"])
        check = check_messages(base)
        log(f"checked /v1/messages: {check}")
        log(f"running {rounds} round(s) of {duration:.0f} s per figure")
        runs = measure(setup, rounds, duration, log)
        checks = bench.gateway_checks(setup)
    return {"meta": meta, "summary": summarize(runs), "check": check, "checks": checks,
            "runs": runs}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round (~40 s)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 8, quick 3)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the servers started here are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    duration = args.duration or (3.0 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 3)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tree = bench.git_tree(bench.REPO)
    meta = {
        "utc": stamp, "commit": tree["commit"][:12], "dirty": tree["dirty"], "quick": args.quick,
        "rounds": rounds, "duration_s": duration, "loadavg": f"{os.getloadavg()[0]:.2f}",
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "config": str(CONFIG.relative_to(bench.REPO)),
    }  # fmt: skip
    try:
        report = run(rounds, duration, meta, log)
    except BenchError as exc:
        log(f"FAILED: {exc}")
        return 1
    bench.RESULTS.mkdir(exist_ok=True)
    out = bench.RESULTS / f"messages-{stamp}.json"
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(markdown(report))
    log(f"wrote {out.relative_to(bench.REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
