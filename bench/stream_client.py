"""Streaming load client: K streamed chat completions at concurrency C, time to first chunk.

    python -m bench.stream_client --url http://127.0.0.1:4000/v1/chat/completions \
        [--key sk-bench] [--model bench-model] [-n 200] [-c 16] [--json]

Each request is timed from just before it is sent to the first body bytes (time to
first chunk, "TTFT") and to the end of the stream; the stream must end with
``data: [DONE]`` or it counts as an error. C warm-up requests run first, uncounted.
Prints a line of figures, or with ``--json`` one JSON object (read by bench.run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import aiohttp


def stream_body(model: str) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {
                    "role": "user",
                    "content": "Say hello to alice@example.com, then tell me a short fact.",
                },
            ],
            "max_tokens": 64,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        separators=(",", ":"),
    ).encode()


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, round(pct / 100.0 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, float, int]:
    """(seconds to first chunk, seconds to end, SSE events); raises on a bad stream."""
    start = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"status {resp.status}: {(await resp.read())[:200]!r}")
        first = await resp.content.readany()
        ttft = time.perf_counter() - start
        parts = [first]
        async for chunk in resp.content.iter_any():
            parts.append(chunk)
    total = time.perf_counter() - start
    data = b"".join(parts)
    if not data.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"stream did not end with [DONE]: {data[-80:]!r}")
    return ttft, total, data.count(b"data:")


async def run(url: str, key: str, model: str, n: int, concurrency: int) -> dict[str, object]:
    body = stream_body(model)
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    ttfts: list[float] = []
    totals: list[float] = []
    events: list[int] = []
    errors: list[str] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # warm-up: open the C connections, uncounted
        warm = await asyncio.gather(
            *(one_stream(session, url, body, headers) for _ in range(concurrency)),
            return_exceptions=True,
        )
        errors.extend(repr(w) for w in warm if isinstance(w, BaseException))
        remaining = n

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                try:
                    ttft, total, count = await one_stream(session, url, body, headers)
                except Exception as exc:
                    errors.append(repr(exc))
                    continue
                ttfts.append(ttft)
                totals.append(total)
                events.append(count)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "url": url,
        "concurrency": concurrency,
        "requests": len(ttfts),
        "errors": len(errors),
        "error_sample": errors[:3],
        "wall_s": round(wall, 4),
        "streams_per_s": round(len(ttfts) / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 3),
        "ttft_p99_ms": round(percentile(ttfts, 99) * 1000, 3),
        "total_p50_ms": round(percentile(totals, 50) * 1000, 3),
        "total_p99_ms": round(percentile(totals, 99) * 1000, 3),
        "events_per_stream": round(sum(events) / len(events), 2) if events else 0,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:4000/v1/chat/completions")
    parser.add_argument("--key", default=os.environ.get("BENCH_KEY", "sk-bench"))
    parser.add_argument("--model", default=os.environ.get("BENCH_MODEL", "bench-model"))
    parser.add_argument("-n", "--requests", type=int, default=200)
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        import uvloop

        result = uvloop.run(run(args.url, args.key, args.model, args.requests, args.concurrency))
    except ImportError:  # pragma: no cover
        result = asyncio.run(run(args.url, args.key, args.model, args.requests, args.concurrency))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['requests']} streams at c={args.concurrency}: "
            f"TTFT p50 {result['ttft_p50_ms']} ms p99 {result['ttft_p99_ms']} ms; "
            f"total p50 {result['total_p50_ms']} ms p99 {result['total_p99_ms']} ms; "
            f"{result['streams_per_s']} streams/s; {result['errors']} errors"
        )


if __name__ == "__main__":
    main()
