"""The stores' cost per request: reserve+settle and rate_acquire, local SQLite vs Redis on loopback.

    python -m bench.bench_store [--requests 2000] [--rounds 5] [--concurrency 1,16,64]
                                [--backends local,local-shared,redis] [--loop uvloop|asyncio]

``local`` is LocalStore for one worker (rate windows in memory), ``local-shared`` is
LocalStore for several workers (rate windows in the SQLite file too), ``redis`` is
RedisStore against a redis-server this script starts on a free loopback port. Each
cell is wall time / requests (µs), the median of the rounds: with concurrency 1 it is
the latency of one call, with more it is the inverse of throughput. One process, so it
measures the event-loop side plus the store; the gateway's own work is not included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime

from policies.config import StoreConfig
from policies.store import BudgetScope, RateScope, Reservation, Store
from policies.store_local import LocalStore
from policies.store_redis import RedisStore
from tests.redis_server import RedisServer

END = datetime(2100, 1, 1, tzinfo=UTC).timestamp()
BUDGET = (
    BudgetScope("team:bench", "bench", "2099-12", END, 10**18),
    BudgetScope("key:bench/load", "bench", "2099-12-31", END, 10**18),
)
RATE = (
    RateScope("team:bench", "bench", 10**9, 10**12),
    RateScope("key:bench/load", "bench", 10**9, None),
)


async def run_round(op: Callable[[int], Awaitable[None]], requests: int, concurrency: int) -> float:
    """Run ``requests`` ops with at most ``concurrency`` in flight; µs of wall time per op."""
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            await op(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - started) / requests * 1e6


def operations(store: Store, tag: str) -> dict[str, Callable[[int], Awaitable[None]]]:
    async def reserve_settle(i: int) -> None:
        res = await store.reserve(f"{tag}-{i}", BUDGET, 1000)
        assert isinstance(res, Reservation)
        await store.settle(res, 700)

    async def rate_acquire(i: int) -> None:
        decision = await store.rate_acquire(RATE, 100)
        assert decision.allowed

    return {"reserve+settle": reserve_settle, "rate_acquire": rate_acquire}


@contextlib.contextmanager
def backend_config(backend: str) -> Iterator[tuple[StoreConfig, int]]:
    if backend == "redis":
        with RedisServer() as server:
            yield StoreConfig(backend="redis", redis_url=server.url), 1
        return
    with tempfile.TemporaryDirectory(prefix="tallygate-bench-") as tmp:
        processes = 2 if backend == "local-shared" else 1
        yield StoreConfig(path=f"{tmp}/ledger.db"), processes


async def bench_backend(
    backend: str, requests: int, rounds: int, concurrencies: list[int]
) -> dict[tuple[str, int], float]:
    results: dict[tuple[str, int], float] = {}
    with backend_config(backend) as (config, processes):
        store: Store = (
            RedisStore(config) if backend == "redis" else LocalStore(config, processes=processes)
        )
        await store.start()
        try:
            for name in ("reserve+settle", "rate_acquire"):
                for concurrency in concurrencies:
                    samples = []
                    for r in range(rounds + 1):  # round 0 warms up (connections, scripts, cache)
                        tag = f"{name}-{concurrency}-{r}"
                        us = await run_round(operations(store, tag)[name], requests, concurrency)
                        if r:
                            samples.append(us)
                    results[(name, concurrency)] = statistics.median(samples)
        finally:
            await store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--backends", default="local,local-shared,redis")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    backends = args.backends.split(",")

    runner: Callable[..., object] = asyncio.run
    if args.loop == "uvloop":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            args.loop = "asyncio (uvloop not installed)"
    print(
        f"store cost per request, µs (median of {args.rounds} rounds of {args.requests}; loop: {args.loop})"
    )
    header = f"{'backend':<14}{'operation':<16}" + "".join(f"{f'c={c}':>10}" for c in concurrencies)
    print(header)
    print("-" * len(header))
    for backend in backends:
        results = runner(bench_backend(backend, args.requests, args.rounds, concurrencies))
        assert isinstance(results, dict)
        for name in ("reserve+settle", "rate_acquire"):
            cells = "".join(f"{results[(name, c)]:>10.1f}" for c in concurrencies)
            print(f"{backend:<14}{name:<16}{cells}")


if __name__ == "__main__":
    main()
