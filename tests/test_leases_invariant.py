"""The budget invariant with leases, property-based (hypothesis): several LeasedStores (as
worker processes or replicas) on one shared store, an SQLite file or a real Redis, admit
any mix of requests at once, with any lease sizing.

- At every moment, what was admitted and not settled plus what was settled never passes a
  limit (the team's, shared by every key and process; and a key's own).
- Once every request settled and every lease went back, nothing is reserved and the
  store's spend is exactly what the requests cost.
- Rate windows: leased capacity never admits more than the limit, and what a process did
  not use comes back.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.config import StoreConfig
from policies.stores.base import BudgetScope, RateScope, Reservation, Store
from policies.stores.leases import LeasedStore, LeaseTuning
from policies.stores.local import LocalStore
from policies.stores.redis import RedisStore
from tests.redis_server import RedisServer, require_redis_server
from tests.redis_server import redis_server as redis_server  # the session fixture

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC).timestamp()
END = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
KEYS = ("a", "b", "c")


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Req:
    process: int
    key: str
    amount: int
    percent: int  # of the amount it actually costs (honest: at most 100)
    yields: int  # event-loop turns between admission and settlement
    gap: int  # event-loop turns after the previous request started (a lease call takes some)
    advance: float  # seconds the clock moves before it starts


requests = st.builds(
    Req,
    process=st.integers(0, 2),
    key=st.sampled_from(KEYS),
    # a few amounts, so that sums land on the limits
    amount=st.one_of(st.sampled_from([0, 1, 30, 50, 100, 250]), st.integers(0, 400)),
    percent=st.integers(0, 100),
    yields=st.integers(0, 40),
    gap=st.sampled_from([0, 1, 5, 20]),
    advance=st.sampled_from([0.0, 0.0, 0.0, 0.2, 0.6, 1.1]),
)
# bursts: one request shape repeated, as a busy key sends them; sums then land on limits
bursts = st.lists(st.tuples(requests, st.integers(1, 12)), min_size=1, max_size=8).map(
    lambda parts: [req for req, times in parts for _ in range(times)][:60]
)
tunings = st.builds(
    LeaseTuning,
    share=st.sampled_from([1, 2, 4]),
    min_slice_requests=st.sampled_from([1, 3, 10]),
)


class Backend:
    """Opens bare stores that share one ledger: LocalStores on one file (processes=2, as
    workers) or RedisStores on one server, each ``team`` a fresh ledger."""

    def __init__(self, kind: str, server: RedisServer | None) -> None:
        self.kind, self.server = kind, server
        self.teams = itertools.count()
        self.dir = tempfile.TemporaryDirectory(prefix="tallygate-leases-")

    def bare(self, clock: Clock, n: int) -> Store:
        if self.server is not None:
            return RedisStore(StoreConfig(backend="redis", redis_url=self.server.url))
        path = Path(self.dir.name) / f"ledger-{n}.db"
        return LocalStore(StoreConfig(path=str(path)), processes=2, clock=clock)


@pytest.fixture(params=["local", "redis"])
def backend(request: pytest.FixtureRequest) -> Any:
    server = None
    if request.param == "redis":
        require_redis_server()
        server = request.getfixturevalue("redis_server")
        server.flushall()
    kit = Backend(request.param, server)
    try:
        yield kit
    finally:
        kit.dir.cleanup()


def budget(team: str, key: str, team_limit: int, key_limit: int | None) -> tuple[BudgetScope, ...]:
    return (
        BudgetScope(f"team:{team}", team, "2026-11", END, team_limit),
        BudgetScope(f"key:{team}/{key}", team, "2026-11", END, key_limit if key == "a" else None),
    )


async def run_budget(
    backend: Backend,
    reqs: list[Req],
    tuning: LeaseTuning,
    processes: int,
    team_limit: int,
    key_limit: int | None,
) -> None:
    n = next(backend.teams)
    team, clock = f"t{n}", Clock()
    stores = [
        LeasedStore(backend.bare(clock, n), StoreConfig(), tuning=tuning, clock=clock)
        for _ in range(processes)
    ]
    for store in stores:
        await store.start()
    committed = {"team": 0, "a": 0}  # admitted and unsettled + settled, as the requests know
    costs: list[int] = []

    def charge(key: str, delta: int) -> None:
        committed["team"] += delta
        if key == "a":
            committed["a"] += delta
        assert committed["team"] <= team_limit
        if key_limit is not None:
            assert committed["a"] <= key_limit

    async def one(i: int, req: Req) -> None:
        clock.now += req.advance
        store = stores[req.process % processes]
        scopes = budget(team, req.key, team_limit, key_limit)
        res = await store.reserve(f"r{i}", scopes, req.amount)
        if not isinstance(res, Reservation):
            return
        charge(req.key, req.amount)
        for _ in range(req.yields):
            await asyncio.sleep(0)
        cost = req.amount * req.percent // 100
        charge(req.key, cost - req.amount)
        costs.append(cost)
        await store.settle(res, cost)

    try:
        tasks = []
        for i, req in enumerate(reqs):
            for _ in range(req.gap):
                await asyncio.sleep(0)
            tasks.append(asyncio.create_task(one(i, req)))
        await asyncio.gather(*tasks)
        clock.now += 2.0  # every lease is old
        for store in stores:
            await store.reap()
        (row,) = await stores[0].inner.balances(budget(team, "a", team_limit, key_limit)[:1])
        assert row.reserved_nano == 0  # every lease went back
        assert row.spent_nano == sum(costs) <= team_limit
    finally:
        for store in stores:
            await store.close()


@pytest.mark.parametrize("processes", [2, 3])
def test_leased_budgets_never_pass_their_limits(backend: Backend, processes: int) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        bursts,
        tunings,
        st.one_of(st.sampled_from([0, 100, 300, 500, 1000, 2000]), st.integers(0, 4000)),
        st.one_of(st.none(), st.sampled_from([0, 100, 250, 500]), st.integers(0, 2000)),
    )
    def example(
        reqs: list[Req], tuning: LeaseTuning, team_limit: int, key_limit: int | None
    ) -> None:
        asyncio.run(run_budget(backend, reqs, tuning, processes, team_limit, key_limit))

    example()


async def run_rate(
    backend: Backend, order: list[int], tuning: LeaseTuning, rpm: int, processes: int
) -> None:
    n = next(backend.teams)
    clock = Clock()  # stands still while they ask: the local windows do not drain
    scopes = (RateScope(f"team:r{n}", f"r{n}", rpm, None),)
    stores = [
        LeasedStore(backend.bare(clock, n), StoreConfig(), tuning=tuning, clock=clock)
        for _ in range(processes)
    ]
    for store in stores:
        await store.start()
    try:
        decisions = await asyncio.gather(
            *(stores[p % processes].rate_acquire(scopes, 0) for p in order)
        )
        admitted = sum(d.allowed for d in decisions)
        assert admitted <= rpm
        clock.now += 2.0
        for store in stores:
            await store.reap()  # what a process did not use goes back
        (state,) = await stores[0].inner.rate_adjust(scopes, 0, 0)
        assert state.remaining_requests is not None
        if backend.server is None:  # the store's clock: 2 s drained 2 x rpm / 60 requests
            assert rpm - admitted <= state.remaining_requests <= rpm - admitted + rpm / 30 + 1
        else:  # Redis drains on its own clock: at least nothing is held back
            assert state.remaining_requests >= rpm - admitted
    finally:
        for store in stores:
            await store.close()


def test_leased_rate_windows_never_pass_their_limit(backend: Backend) -> None:
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(st.integers(0, 2), min_size=1, max_size=80),
        tunings,
        st.integers(1, 60),
        st.integers(2, 3),
    )
    def example(order: list[int], tuning: LeaseTuning, rpm: int, processes: int) -> None:
        asyncio.run(run_rate(backend, order, tuning, rpm, processes))

    example()
