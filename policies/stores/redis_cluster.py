"""RedisClusterStore: RedisStore's scripts and keys on a Redis Cluster (``store.backend: redis_cluster``).

Every key one script touches carries the team's hash tag (``tallygate:{team}:...``), so a
call runs on the one node that owns the team's slot: budgets stay atomic per team, and
teams spread over the masters. ``store.redis_url`` names any node; the client learns the
others (``CLUSTER SLOTS``) on its first call and again after a connection error, which it
retries once (``recovery_retry``), so a failover or a restarted node costs no request.
``spend()`` scans every master.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster

from policies.stores import redis as store_redis
from policies.stores.redis import RedisStore, recovery_retry

T = TypeVar("T")


class RedisClusterStore(RedisStore):
    """RedisStore with redis-py's cluster client; same scripts, same contract."""

    async def _call(self, what: str, op: Callable[[Any], Awaitable[T]]) -> T:
        async def routed(client: RedisCluster) -> T:
            # redis-py 8.1 sends a command issued while it knows no node (before its first
            # call, or after it dropped its slot map) to a random node: MOVED replies, and
            # every 5th makes it close all connections, in-flight calls' included. Learning
            # the map first keeps every call on its slot. (Once known, the client refreshes
            # the map itself after an error, avoiding the node that failed.)
            if client.get_default_node() is None:
                await client.initialize()
            return await op(client)

        return await super()._call(what, routed)

    def _connect(self) -> RedisCluster:
        timeout = self._config.timeout_s
        return RedisCluster.from_url(
            self._config.redis_url,
            max_connections=store_redis._MAX_CONNECTIONS,  # per node
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,
            health_check_interval=store_redis._HEALTH_CHECK_S,
            # the cluster client retries at its level, after refreshing the slot map;
            # its per-node connections do not retry on their own
            retry=recovery_retry(),
        )
