"""Soak: minutes of mixed traffic against one gateway, watching its RSS and open fds.

    python -m bench.soak [--minutes 10] [--every 30] [--concurrency 16] [--config PATH]

Starts the bench mock upstream, the OTLP receiver and `python -m gateway serve` with
bench/config.bench.yaml (every feature on), as bench.run does, then keeps `--concurrency`
clients busy with a mix: 40% whole responses, 40% streams read to the end, 20% streams
left after their first chunk (the client disconnects). Every `--every` seconds it prints
the gateway's RSS (VmRSS), its open file descriptors, and the requests done so far by kind.

The criterion: after a warm-up (the first sample), RSS and fds stay flat within 10%
(the last sample against the warm-up one, and no sample above it by more than 10%).
Exit status 0 when they do, 1 when not, 2 when the gateway failed. The figures of a run
go in bench/README.md ("Soak").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import run as bench
from bench.stream_client import stream_body

MIX = (("whole", 0.4), ("stream", 0.4), ("leave", 0.2))
TOLERANCE = 0.10


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def drive(url: str, seconds: float, every: float, concurrency: int, pid: int) -> list[dict]:
    headers = {"authorization": f"Bearer {bench.KEY}", "content-type": "application/json"}
    whole = bench.chat_body()
    stream = stream_body(bench.MODEL)
    done = {"whole": 0, "stream": 0, "leave": 0, "errors": 0}
    samples: list[dict] = []
    deadline = time.monotonic() + seconds
    rng = random.Random(7)

    async def one(session: aiohttp.ClientSession) -> None:
        kind = rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
        body = whole if kind == "whole" else stream
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                if resp.status != 200:
                    done["errors"] += 1
                    await resp.read()
                    return
                if kind == "leave":
                    await resp.content.readany()
                    resp.close()  # drops the connection mid-stream
                else:
                    data = await resp.read()
                    if kind == "stream" and b"[DONE]" not in data:
                        done["errors"] += 1
                        return
            done[kind] += 1
        except (TimeoutError, aiohttp.ClientError):
            done["errors"] += 1

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            await one(session)

    async def sampler(started: float) -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(every)
            rss, _ = bench.rss_mb(pid)
            sample = {"t_s": round(time.monotonic() - started), "rss_mb": round(rss, 1),
                      "fds": fds(pid), **done}  # fmt: skip
            samples.append(sample)
            print(json.dumps(sample), flush=True)

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(sampler(started), *(worker(session) for _ in range(concurrency)))
    return samples


def verdict(samples: list[dict]) -> dict:
    if len(samples) < 2:
        return {"flat": False, "why": "fewer than two samples"}
    base, last = samples[0], samples[-1]
    out: dict = {"warmup": base, "last": last}
    flat = True
    for key in ("rss_mb", "fds"):
        peak = max(s[key] for s in samples)
        # fds can be a handful at rest: allow the 10% or 5 descriptors, whichever is larger
        slack = max(base[key] * TOLERANCE, 5 if key == "fds" else 0)
        growth = last[key] - base[key]
        out[key] = {
            "warmup": base[key],
            "last": last[key],
            "peak": peak,
            "growth": round(growth, 1),
        }
        flat = flat and growth <= slack and peak - base[key] <= slack
    out["flat"] = flat
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--config", type=Path, default=bench.CONFIG)
    args = parser.parse_args(argv)
    builds = [bench.Build("gateway", bench.REPO, args.config.resolve())]
    modes = {"gateway": bench.MODES}  # no pass-through: only the gateway is soaked
    with bench.started("aiohttp-transport", builds, modes) as setup:
        gw = setup.servers.get("gateway")
        if gw is None:
            print(f"gateway failed: {setup.errors.get('gateway')}", file=sys.stderr)
            return 2
        print(f"soak: {args.minutes} min, c={args.concurrency}, sample every {args.every}s; "
              f"mix {dict(MIX)}", file=sys.stderr)  # fmt: skip
        samples = asyncio.run(
            drive(setup.urls["gateway"], args.minutes * 60, args.every, args.concurrency, gw.pid)
        )
        alive = gw.alive()
    result = verdict(samples)
    result["gateway_alive"] = alive
    out = Path(tempfile.gettempdir()) / f"tallygate-soak-{int(time.time())}.json"
    out.write_text(json.dumps({"samples": samples, "verdict": result}, indent=1) + "\n")
    print(json.dumps(result))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if result["flat"] and alive else 1


if __name__ == "__main__":
    sys.exit(main())
