"""The stores' cost per request: reserve+settle and rate_acquire, local SQLite vs Redis on loopback.

    python -m bench.bench_store [--requests 2000] [--rounds 5] [--concurrency 1,16,64]
                                [--backends local,local-shared,redis] [--loop uvloop|asyncio]

``local`` is LocalStore for one worker (``processes=1``: the ledger and the rate windows
in memory, spend written to the SQLite file by a flusher every ~20 ms), ``local-shared``
is LocalStore for several workers (``processes=2``: every budget operation and rate
window is a transaction on the file), ``redis`` is RedisStore against a redis-server this
script starts on a free loopback port.

Operations: ``reserve+settle`` (one request's budget), ``reserve+settle+balances`` (plus the
balances read the gateway makes after settling, i.e. a request's whole budget cost) and
``rate_acquire``. Each cell is the median over the rounds of time / requests (µs): *wall*
with concurrency 1 is the latency of one call, with more the inverse of throughput; *cpu*
is this process's CPU time (every thread, so the local store's worker thread and its
flushes count) per request, what a gateway on one core pays. Redis's own CPU (another
process) is not in it. One process: the event-loop side plus the store, without the
gateway's own work.
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
from policies.stores.base import BudgetScope, RateScope, Reservation, Store
from policies.stores.local import LocalStore
from policies.stores.redis import RedisStore
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


OPERATIONS = ("reserve+settle", "reserve+settle+balances", "rate_acquire")


async def run_round(
    op: Callable[[int], Awaitable[None]], requests: int, concurrency: int
) -> tuple[float, float]:
    """Run ``requests`` ops with at most ``concurrency`` in flight; µs of wall and CPU time per op."""
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            await op(i)

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = (time.perf_counter() - started) / requests * 1e6
    return wall, (time.process_time() - cpu) / requests * 1e6


def operations(store: Store, tag: str) -> dict[str, Callable[[int], Awaitable[None]]]:
    async def reserve_settle(i: int) -> None:
        res = await store.reserve(f"{tag}-{i}", BUDGET, 1000)
        assert isinstance(res, Reservation)
        await store.settle(res, 700)

    async def with_balances(i: int) -> None:
        await reserve_settle(i)
        await store.balances(BUDGET)

    async def rate_acquire(i: int) -> None:
        decision = await store.rate_acquire(RATE, 100)
        assert decision.allowed

    return {
        "reserve+settle": reserve_settle,
        "reserve+settle+balances": with_balances,
        "rate_acquire": rate_acquire,
    }


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
) -> dict[tuple[str, int], tuple[float, float]]:
    results: dict[tuple[str, int], tuple[float, float]] = {}
    with backend_config(backend) as (config, processes):
        store: Store = (
            RedisStore(config) if backend == "redis" else LocalStore(config, processes=processes)
        )
        await store.start()
        try:
            for name in OPERATIONS:
                for concurrency in concurrencies:
                    walls, cpus = [], []
                    for r in range(rounds + 1):  # round 0 warms up (connections, scripts, cache)
                        tag = f"{name}-{concurrency}-{r}"
                        op = operations(store, tag)[name]
                        wall, cpu = await run_round(op, requests, concurrency)
                        if r:
                            walls.append(wall)
                            cpus.append(cpu)
                    results[(name, concurrency)] = (
                        statistics.median(walls),
                        statistics.median(cpus),
                    )
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
    header = f"{'backend':<14}{'operation':<25}" + "".join(
        f"{f'wall c={c}':>12}{f'cpu c={c}':>12}" for c in concurrencies
    )
    print(header)
    print("-" * len(header))
    for backend in backends:
        results = runner(bench_backend(backend, args.requests, args.rounds, concurrencies))
        assert isinstance(results, dict)
        for name in OPERATIONS:
            cells = "".join(
                f"{results[(name, c)][0]:>12.1f}{results[(name, c)][1]:>12.1f}"
                for c in concurrencies
            )
            print(f"{backend:<14}{name:<25}{cells}")


if __name__ == "__main__":
    main()
