"""The stores: budgets and rate windows shared by every worker and replica.

`base` is the protocol and its types, `local`, `redis` and `redis_cluster` the backends,
`leases` the slices a process admits from in memory (docs/STORES.md). `open_store` builds
the configured one; a backend module is imported only when a config uses it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policies.config import StoreConfig
    from policies.stores.base import Store


def open_store(config: StoreConfig, *, processes: int | None = None) -> Store:
    """Build (not start) the configured store; the backend module is imported only here.

    ``processes`` is how many gateway worker processes share the store (server.workers).
    A gateway passes it, and then gets budget and rate leases (``policies.stores.leases``)
    whenever its budgets are shared with other processes: on the local store with
    ``processes > 1`` (whose rate windows then live in the SQLite file too), always on
    Redis and Redis Cluster (replicas). One local worker keeps the in-memory ledger, exact
    and cheap without leases. None (a tool reading the store, e.g. ``tallygate spend``):
    the bare backend, as one process.
    """
    inner: Store
    if config.backend == "redis":
        from policies.stores.redis import RedisStore

        inner = RedisStore(config)
    elif config.backend == "redis_cluster":
        from policies.stores.redis_cluster import RedisClusterStore

        inner = RedisClusterStore(config)
    else:
        from policies.stores.local import LocalStore

        inner = LocalStore(config, processes=processes or 1)
        if (processes or 1) == 1:
            return inner
    if processes is None:
        return inner
    from policies.stores.leases import LeasedStore

    return LeasedStore(inner, config)
