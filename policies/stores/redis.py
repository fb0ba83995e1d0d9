"""RedisStore: budgets and rate windows in Redis, every decision one Lua script (atomic).

Key layout (``{tag}`` is the team: every key one script touches shares one Redis Cluster
slot; the tag is the team name with ``%``, ``{`` and ``}`` percent-encoded)::

    tallygate:{tag}:ledger:<scope_id>:<period_key>  hash   spent, reserved (nano-USD)
    tallygate:{tag}:resv:<scope_id>:<period_key>    zset   "<amount>:<request_id>" by expiry (ms)
    tallygate:{tag}:req:<request_id>                string "r:<call token>" reserved | "s" settled
    tallygate:{tag}:rate:<scope_id>                 hash   at (ms), r, t: GCRA bucket levels
    tallygate:{tag}:once:<key>                      string "<call token>": claim_once's winner
    tallygate:{tag}:call:<call token>               string: a rate call applied (kept 60 s)

Ledger and reservation sets of a dated period expire 35 days after the period ends
(never into the past: a caller whose clock is far behind keeps its keys); "total" ones
never expire. Reservation expiry and rate windows use the server's clock
(``TIME``), so replicas with skewed clocks agree; the period key is the caller's.
Lua numbers are doubles: amounts and limits are exact up to 2**53 nano-USD (~9M USD).
No script can make Redis overflow: one amount is at most MAX_AMOUNT_NANO (refused or
clamped in Python, and again in Lua), and every change of spent or reserved goes through
``bump``, which checks before HINCRBY and saturates within [0, MAX_LEDGER_NANO].

Recovery: redis-py retries a call once on a connection error or timeout (a pooled
connection that died with a Redis restart), on a fresh connection, within the call's
``timeout_s``. A retried script may have run already (its reply was lost): settle is a
no-op the second time (the request is marked settled), reserve recognises its own mark
(a token per call) and answers "reserved" again, the reads change nothing but expired
reservations; the rate scripts mark their call, so a retry changes nothing more either.
``RedisClusterStore`` (policies/stores/redis_cluster.py) runs the same scripts on a cluster.

Over 600 lines on purpose: the Lua scripts (about half of it) sit beside the Python that
calls them, so a script and its caller change together.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from policies.config import StoreConfig
from policies.ratelimit import rate_state
from policies.stores.base import (
    MAX_AMOUNT_NANO,
    MAX_LEDGER_NANO,
    Admitted,
    BudgetRejection,
    BudgetScope,
    RateDecision,
    RateScope,
    RateState,
    Reservation,
    SpendRow,
    StoreError,
    check_reserve_amount,
    clamp_actual,
)

T = TypeVar("T")

PREFIX = "tallygate"
LEDGER_GRACE_S = 35 * 86400  # a dated period's keys expire this long after it ends
_ADMITTED = RateDecision(True, 0.0, None, ())  # no rate scopes: nothing to check
_MAX_CONNECTIONS = 128
_HEALTH_CHECK_S = 30  # a connection idle longer is PINGed before its next command

# bump(): field += delta within [0, MAX_LEDGER]. The sum is checked in doubles before
# HINCRBY (Redis' int64 add errors on overflow); near the bound a double is off by < 1024,
# so from SLACK below it the field is set to the bound itself. Below, HINCRBY adds exactly.
_BUMP_FN = f"""
local MAX_AMOUNT, MAX_LEDGER, SLACK = {MAX_AMOUNT_NANO}, {MAX_LEDGER_NANO}, 4096
local MAX_LEDGER_S = '{MAX_LEDGER_NANO}'
"""
_BUMP_FN += """
local function int(x) return string.format('%d', x) end
local function bump(key, field, delta)
  local new = (tonumber(redis.call('HGET', key, field)) or 0) + delta
  if new > MAX_LEDGER - SLACK then
    redis.call('HSET', key, field, MAX_LEDGER_S)
  elseif new < 0 then
    redis.call('HSET', key, field, '0')
  else
    redis.call('HINCRBY', key, field, int(delta))
  end
end
local function amount_arg(s)
  local x = tonumber(s) or 0
  return math.min(math.max(x, 0), MAX_AMOUNT)
end
"""

# The server's clock: ``now`` in whole ms (reservation expiry), ``gnow`` in fractional ms
# (the rate windows).
_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gnow = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
"""

# Give back what expired reservations of one scope+period hold (crash recovery); and
# append the (spent, reserved) of ``n`` scopes, swept, to ``out`` (KEYS from index 2).
_SWEEP_FN = (
    _BUMP_FN
    + _CLOCK
    + """
local function sweep(ledger, zset, now)
  local gone = redis.call('ZRANGEBYSCORE', zset, '-inf', now)
  if #gone > 0 then
    local total = 0
    for _, member in ipairs(gone) do total = total + tonumber(string.match(member, '^(%d+):')) end
    redis.call('ZREMRANGEBYSCORE', zset, '-inf', now)
    bump(ledger, 'reserved', -total)
  end
end
-- The reservation reserve and admit both make: amount held on the n scopes' ledgers until
-- now + ttl (ARGV[1] the member, ARGV[3] the ttl; scope i's expireat in ARGV[base + 2i]),
-- and the request marked.
local function hold(n, amount, mark, base)
  local ttl = tonumber(ARGV[3])
  for i = 1, n do
    local ledger, zset, expireat = KEYS[2 * i], KEYS[2 * i + 1], tonumber(ARGV[base + 2 * i])
    bump(ledger, 'reserved', amount)
    redis.call('ZADD', zset, int(now + ttl), ARGV[1])
    if expireat > now / 1000 then
      redis.call('EXPIREAT', ledger, expireat)
      redis.call('EXPIREAT', zset, expireat)
    end
  end
  redis.call('SET', KEYS[1], mark, 'PX', int(2 * ttl))
end
local function ledgers(n, out)
  for i = 1, n do
    sweep(KEYS[2 * i], KEYS[2 * i + 1], now)
    local v = redis.call('HMGET', KEYS[2 * i], 'spent', 'reserved')
    out[#out + 1] = v[1] or '0'
    out[#out + 1] = v[2] or '0'
  end
  return out
end
"""
)

# KEYS: req, then (ledger, zset) per scope.
# ARGV: member, amount, ttl_ms, call token, then (limit or '', expireat or 0) per scope.
# Returns {1} reserved | {0, scope index, spent, reserved} refused | {-1} request id in use
# | {-2} amount outside [0, MAX_AMOUNT] (Python refuses it first; this is the last guard).
# The request is marked "r:<call token>": a retry of the same call (its reply was lost)
# finds its own mark and answers {1} again instead of "in use"; another call gets {-1}.
_RESERVE = (
    _SWEEP_FN
    + """
local amount = tonumber(ARGV[2])
if not amount or amount < 0 or amount > MAX_AMOUNT then return {-2} end
local mark = 'r:' .. ARGV[4]
local held = redis.call('GET', KEYS[1])
if held == mark then return {1} end
if held then return {-1} end
local n = (#KEYS - 1) / 2
for i = 1, n do sweep(KEYS[2 * i], KEYS[2 * i + 1], now) end
for i = 1, n do
  local limit = ARGV[3 + 2 * i]
  if limit ~= '' then
    local v = redis.call('HMGET', KEYS[2 * i], 'spent', 'reserved')
    if (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) + amount > tonumber(limit) then
      return {0, i, v[1] or '0', v[2] or '0'}
    end
  end
end
hold(n, amount, mark, 4)
return {1}
"""
)

# KEYS: req, then (ledger, zset) per scope.
# ARGV: member, amount, actual, tombstone_ms, then expireat or 0 per scope.
# Settles unless already settled (then changes nothing); returns (spent, reserved) per
# scope after, like _READ_LEDGERS: the remaining budget without a second round trip.
# Amounts are clamped into [0, MAX_AMOUNT].
_SETTLE = (
    _SWEEP_FN
    + """
local n = (#KEYS - 1) / 2
if redis.call('GET', KEYS[1]) ~= 's' then
  local amount, actual = amount_arg(ARGV[2]), amount_arg(ARGV[3])
  for i = 1, n do
    local ledger, zset, expireat = KEYS[2 * i], KEYS[2 * i + 1], tonumber(ARGV[4 + i])
    if redis.call('ZREM', zset, ARGV[1]) == 1 then
      bump(ledger, 'reserved', -amount)
    end
    bump(ledger, 'spent', actual)
    if expireat > now / 1000 then redis.call('EXPIREAT', ledger, expireat) end
  end
  redis.call('SET', KEYS[1], 's', 'PX', ARGV[4])
end
return ledgers(n, {})
"""
)

# KEYS: (ledger, zset) per scope.
# Returns (spent, reserved) per scope, after releasing expired reservations.
_READ_LEDGERS = (
    _SWEEP_FN
    + """
local out = {}
for i = 1, #KEYS / 2 do
  sweep(KEYS[2 * i - 1], KEYS[2 * i], now)
  local v = redis.call('HMGET', KEYS[2 * i - 1], 'spent', 'reserved')
  out[#out + 1] = v[1] or '0'
  out[#out + 1] = v[2] or '0'
end
return out
"""
)

# GCRA as a leaky bucket, the arithmetic of policies/ratelimit.py with times in ms.
# rate_check(kb, n, ab, tokens, requests): the decision for ``requests`` requests costing
# ``tokens`` against the buckets KEYS[kb + i] with (rpm or 0, tpm or 0) at ARGV[ab + 2i - 1],
# ARGV[ab + 2i], i = 1..n; rate_commit stores it, rate_levels appends the levels to ``out``.
_CALL_MARK_MS = 60_000
_GCRA_DEFS = f"""
local CALL_MARK_MS = {_CALL_MARK_MS}
"""
_GCRA_DEFS += """
local W, EPS = 60000, 1e-6
local function fmt(x) return string.format('%.17g', x) end
local function drain(key, rpm, tpm)
  local v = redis.call('HMGET', key, 'at', 'r', 't')
  local at = tonumber(v[1]) or gnow
  local elapsed = math.max(0, gnow - at)
  local r, tk = tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if rpm > 0 then r = math.max(0, r - elapsed * rpm / W) end
  if tpm > 0 then tk = math.max(0, tk - elapsed * tpm / W) end
  return math.max(gnow, at), r, tk
end
local function wait_for(level, limit)
  local over = level - limit
  if over > EPS then return over * W / limit end
  return 0
end
local function store(key, at, r, tk, rpm, tpm)
  local empty = 0
  if rpm > 0 then empty = r * W / rpm end
  if tpm > 0 then empty = math.max(empty, tk * W / tpm) end
  redis.call('HSET', key, 'at', fmt(at), 'r', fmt(r), 't', fmt(tk))
  redis.call('PEXPIREAT', key, string.format('%d', math.ceil(at + empty)))
end
local function rate_check(kb, n, ab, tokens, requests)
  local c = {at = {}, lr = {}, lt = {}, nr = {}, nt = {}, retry = 0, limited = '', n = n}
  for i = 1, n do
    local rpm, tpm = tonumber(ARGV[ab + 2 * i - 1]), tonumber(ARGV[ab + 2 * i])
    c.at[i], c.lr[i], c.lt[i] = drain(KEYS[kb + i], rpm, tpm)
    c.nr[i], c.nt[i] = c.lr[i], c.lt[i]
    if rpm > 0 then
      c.nr[i] = c.lr[i] + requests
      local wait = wait_for(c.nr[i], rpm)
      if requests > rpm then wait = W end
      if wait > c.retry then c.retry, c.limited = wait, 'requests' end
    end
    if tpm > 0 and tokens > 0 then
      c.nt[i] = c.lt[i] + tokens
      local wait = wait_for(c.nt[i], tpm)
      if tokens > tpm then wait = W end
      if wait > c.retry then c.retry, c.limited = wait, 'tokens' end
    end
  end
  return c
end
local function rate_commit(c, kb, ab)
  for i = 1, c.n do
    local rpm, tpm = tonumber(ARGV[ab + 2 * i - 1]), tonumber(ARGV[ab + 2 * i])
    store(KEYS[kb + i], c.at[i], c.nr[i], c.nt[i], rpm, tpm)
  end
end
local function rate_levels(c, committed, out)
  for i = 1, c.n do
    if committed then
      out[#out + 1] = fmt(c.nr[i])
      out[#out + 1] = fmt(c.nt[i])
    else
      out[#out + 1] = fmt(c.lr[i])
      out[#out + 1] = fmt(c.lt[i])
    end
  end
  return out
end
"""
_GCRA_FN = _CLOCK + _GCRA_DEFS

# The rate scripts mark the call (KEYS' last: "call:<token>", kept CALL_MARK_MS) when they
# change the windows: a retry of the same call (its reply was lost) changes nothing more.

# KEYS: rate hash per scope, then the call mark. ARGV: tokens, requests, then (rpm or 0,
# tpm or 0) per scope. Returns {allowed 1|0, retry_ms, limited_by or '', then (level_r,
# level_t) per scope}.
_RATE_ACQUIRE = (
    _GCRA_FN
    + """
local mark = KEYS[#KEYS]
local c = rate_check(0, #KEYS - 1, 2, tonumber(ARGV[1]), tonumber(ARGV[2]))
if redis.call('EXISTS', mark) == 1 then return rate_levels(c, false, {1, '0', ''}) end
local allowed = c.limited == ''
if allowed then
  rate_commit(c, 0, 2)
  redis.call('SET', mark, '1', 'PX', CALL_MARK_MS)
end
return rate_levels(c, allowed, {allowed and 1 or 0, fmt(c.retry), c.limited})
"""
)

# KEYS: rate hash per scope, then the call mark. ARGV: requests, tokens (signed), then
# (rpm or 0, tpm or 0) per scope. Adds them to the drained levels (never below 0): giving
# capacity back twice would let more through than the limit, hence the mark. Returns
# (level_r, level_t) per scope after.
_RATE_ADJUST = (
    _GCRA_FN
    + """
local dr, dt = tonumber(ARGV[1]), tonumber(ARGV[2])
local first = redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', CALL_MARK_MS)
local out = {}
for i = 1, #KEYS - 1 do
  local rpm, tpm = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local at, r, tk = drain(KEYS[i], rpm, tpm)
  if first then
    if rpm > 0 then r = math.max(0, r + dr) end
    if tpm > 0 then tk = math.max(0, tk + dt) end
    store(KEYS[i], at, r, tk, rpm, tpm)
  end
  out[#out + 1] = fmt(r)
  out[#out + 1] = fmt(tk)
end
return out
"""
)

# A request's whole admission: the rate windows, then the budget, all or nothing.
# KEYS: req, (ledger, zset) per budget scope, then a rate hash per rate scope.
# ARGV: member, amount, ttl_ms, call token, budget scopes nb, rate scopes nr, tokens,
# requests, then (limit or '', expireat or 0) per budget scope, (rpm or 0, tpm or 0) per
# rate scope. Returns {rate allowed 1|0, retry_ms, limited_by or '', budget, index, then
# (spent, reserved) per budget scope unless budget is 2, then (level_r, level_t) per rate
# scope}; budget: 1 reserved | 0 refused by scope ``index`` | 2 not tried (the rate
# windows refused) | -1 request id in use | -2 amount outside [0, MAX_AMOUNT]. A retry of
# the same call (its reply was lost) finds its own mark and changes nothing more.
_ADMIT = (
    _SWEEP_FN
    + _GCRA_DEFS
    + """
local amount = tonumber(ARGV[2])
if not amount or amount < 0 or amount > MAX_AMOUNT then return {1, '0', '', -2, 0} end
local nb, nr = tonumber(ARGV[5]), tonumber(ARGV[6])
local rb, ab = 1 + 2 * nb, 8 + 2 * nb
local mark = 'r:' .. ARGV[4]
local held = redis.call('GET', KEYS[1])
if held and held ~= mark then return {1, '0', '', -1, 0} end
local c = rate_check(rb, nr, ab, tonumber(ARGV[7]), tonumber(ARGV[8]))
if held == mark then
  return rate_levels(c, false, ledgers(nb, {1, '0', '', 1, 0}))
end
if c.limited ~= '' then
  return rate_levels(c, false, {0, fmt(c.retry), c.limited, 2, 0})
end
for i = 1, nb do sweep(KEYS[2 * i], KEYS[2 * i + 1], now) end
local refused = 0
for i = 1, nb do
  local limit = ARGV[7 + 2 * i]
  if limit ~= '' then
    local v = redis.call('HMGET', KEYS[2 * i], 'spent', 'reserved')
    if (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) + amount > tonumber(limit) then
      refused = i
      break
    end
  end
end
if refused == 0 then
  hold(nb, amount, mark, 8)
  rate_commit(c, rb, ab)
end
local out = ledgers(nb, {1, '0', '', refused == 0 and 1 or 0, refused})
return rate_levels(c, refused == 0, out)
"""
)


# KEYS: the claim. ARGV: call token, ttl_ms (0: none). Returns 1 won | 0 claimed before.
# A retry of the winning call (its reply was lost) finds its own token and wins again.
_CLAIM_ONCE = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return 1 end
if held then return 0 end
if ARGV[2] == '0' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""


def hash_tag(group: str) -> str:
    """The Redis Cluster hash tag of a team: its name, with % { } percent-encoded."""
    return group.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def ledger_key(group: str, scope_id: str, period_key: str) -> str:
    return f"{PREFIX}:{{{hash_tag(group)}}}:ledger:{scope_id}:{period_key}"


def reservations_key(group: str, scope_id: str, period_key: str) -> str:
    return f"{PREFIX}:{{{hash_tag(group)}}}:resv:{scope_id}:{period_key}"


def request_key(group: str, request_id: str) -> str:
    return f"{PREFIX}:{{{hash_tag(group)}}}:req:{request_id}"


def rate_key(group: str, scope_id: str) -> str:
    return f"{PREFIX}:{{{hash_tag(group)}}}:rate:{scope_id}"


def claim_key(group: str, key: str) -> str:
    return f"{PREFIX}:{{{hash_tag(group)}}}:once:{key}"


def _call_key(group: str) -> str:
    """A fresh mark for one rate call: its retry finds it and changes nothing more."""
    return f"{PREFIX}:{{{hash_tag(group)}}}:call:{os.urandom(8).hex()}"


class RedisStore:
    """The shared store: any number of gateway processes and replicas on one Redis.

    ``start`` opens no connection (a Redis that is down at start makes calls raise
    StoreError, which the gateway handles per on_error, and /readyz reports it).
    ``clock`` is accepted for symmetry with LocalStore; no decision uses it, since
    expiry and windows run on the server's clock and periods come with the scopes.
    """

    def __init__(self, config: StoreConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._ttl_ms = max(1, round(config.reservation_ttl_s * 1000))
        self._client: Redis | RedisCluster | None = None
        self._scripts: dict[str, Any] = {}
        # At most as many calls in flight as connections: the cluster client raises rather
        # than waits when a node's connections are all in use (the plain pool would wait).
        self._slots = asyncio.Semaphore(_MAX_CONNECTIONS)

    # lifecycle

    def _connect(self) -> Redis | RedisCluster:
        """The client (no connection opened yet); RedisClusterStore builds a cluster client."""
        timeout = self._config.timeout_s
        pool = BlockingConnectionPool.from_url(
            self._config.redis_url,
            max_connections=_MAX_CONNECTIONS,
            timeout=timeout,  # waiting for a free connection
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            socket_keepalive=True,  # a peer gone without a FIN is noticed while idle
            health_check_interval=_HEALTH_CHECK_S,
            retry=recovery_retry(),
        )
        return Redis.from_pool(pool)

    async def start(self) -> None:
        if self._client is not None:
            return
        client = self._connect()
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("reserve", _RESERVE),
                ("settle", _SETTLE),
                ("read_ledgers", _READ_LEDGERS),
                ("rate_acquire", _RATE_ACQUIRE),
                ("rate_adjust", _RATE_ADJUST),
                ("admit", _ADMIT),
                ("claim_once", _CLAIM_ONCE),
            )
        }
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._call("PING", lambda c: c.ping()))
        except StoreError:
            return False

    # budgets

    async def reserve(
        self, request_id: str, scopes: tuple[BudgetScope, ...], amount_nano: int
    ) -> Reservation | BudgetRejection:
        check_reserve_amount(amount_nano)
        if not scopes:
            return Reservation(request_id, scopes, amount_nano)
        _distinct(scopes)
        group = _one_group(scopes)
        keys = [request_key(group, request_id), *_budget_keys(group, scopes)]
        token = os.urandom(8).hex()  # this call's mark: a retry of it is not "in use"
        args: list[Any] = [_member(request_id, amount_nano), amount_nano, self._ttl_ms, token]
        for s in scopes:
            args += ["" if s.limit_nano is None else s.limit_nano, _expire_at(s)]
        result = await self._script("reserve", keys, args)
        if result[0] == 1:
            return Reservation(request_id, scopes, amount_nano)
        if result[0] == -1:
            raise ValueError(f"request id {request_id!r} was already reserved")
        if result[0] == -2:
            raise ValueError(f"amount_nano {amount_nano} refused by the store's bound")
        return BudgetRejection(scopes[result[1] - 1], int(result[2]), int(result[3]), amount_nano)

    async def settle(self, reservation: Reservation, actual_nano: int) -> list[SpendRow]:
        actual_nano = clamp_actual(reservation.request_id, actual_nano)
        scopes = reservation.scopes
        if not scopes:
            return []
        group = _one_group(scopes)
        request_id, amount = reservation.request_id, reservation.amount_nano
        keys = [request_key(group, request_id), *_budget_keys(group, scopes)]
        args = [_member(request_id, amount), amount, actual_nano, self._ttl_ms]
        args += [_expire_at(s) for s in scopes]
        return _rows(scopes, await self._script("settle", keys, args), 0)

    async def admit(
        self,
        request_id: str,
        scopes: tuple[BudgetScope, ...],
        amount_nano: int,
        rate_scopes: tuple[RateScope, ...] = (),
        tokens: int = 0,
        requests: int = 1,
    ) -> Admitted:
        check_reserve_amount(amount_nano)
        _distinct(scopes)
        _distinct(rate_scopes)
        if not scopes and not rate_scopes:
            return Admitted(_ADMITTED, Reservation(request_id, scopes, amount_nano))
        group = _one_group((*scopes, *rate_scopes))
        keys = [request_key(group, request_id), *_budget_keys(group, scopes)]
        keys += [rate_key(group, s.scope_id) for s in rate_scopes]
        token = os.urandom(8).hex()  # this call's mark: a retry of it is not "in use"
        args: list[Any] = [_member(request_id, amount_nano), amount_nano, self._ttl_ms, token]
        args += [len(scopes), len(rate_scopes), tokens, requests]
        for s in scopes:
            args += ["" if s.limit_nano is None else s.limit_nano, _expire_at(s)]
        for r in rate_scopes:
            args += [r.rpm or 0, r.tpm or 0]
        out = await self._script("admit", keys, args)
        status = out[3]
        if status == -1:
            raise ValueError(f"request id {request_id!r} was already reserved")
        if status == -2:
            raise ValueError(f"amount_nano {amount_nano} refused by the store's bound")
        levels = 5 if status == 2 else 5 + 2 * len(scopes)
        decision = RateDecision(
            out[0] == 1,
            float(out[1]) / 1000,
            out[2].decode() if out[2] else None,
            _states(rate_scopes, out, levels),
        )
        if status == 2:
            return Admitted(decision, None)
        rows = tuple(_rows(scopes, out, 5))
        if status == 1:
            return Admitted(decision, Reservation(request_id, scopes, amount_nano), rows)
        refused = rows[out[4] - 1]
        rejection = BudgetRejection(
            scopes[out[4] - 1], refused.spent_nano, refused.reserved_nano, amount_nano
        )
        return Admitted(decision, rejection, rows)

    async def spend(self, scope_ids: tuple[str, ...] | None = None) -> list[SpendRow]:
        """Scans the ledger keys (an admin call, O(keyspace)); releases expired reservations
        of every ledger it reports so ``reserved`` is current."""
        wanted = None if scope_ids is None else set(scope_ids)
        pattern = f"{PREFIX}:*:ledger:*"
        keys: list[str] = await self._call("SCAN", lambda c: _scan(c, pattern))
        rows = []
        for key in keys:
            parsed = _parse_ledger_key(key)
            if parsed is None or (wanted is not None and parsed[1] not in wanted):
                continue
            tag, scope_id, period_key = parsed
            zset = f"{PREFIX}:{{{tag}}}:resv:{scope_id}:{period_key}"
            spent, reserved = await self._script("read_ledgers", [key, zset], [])
            rows.append(SpendRow(scope_id, period_key, int(spent), int(reserved)))
        rows.sort(key=lambda r: (r.scope_id, r.period_key))
        return rows

    async def balances(
        self, scopes: tuple[BudgetScope, ...], *, fresh: bool = False
    ) -> list[SpendRow]:
        if not scopes:
            return []
        out = await self._script("read_ledgers", _budget_keys(_one_group(scopes), scopes), [])
        return _rows(scopes, out, 0)

    # rate windows

    async def rate_acquire(
        self, scopes: tuple[RateScope, ...], tokens: int, requests: int = 1
    ) -> RateDecision:
        if not scopes:
            return _ADMITTED
        _distinct(scopes)
        group = _one_group(scopes)
        args: list[Any] = [tokens, requests]
        for s in scopes:
            args += [s.rpm or 0, s.tpm or 0]
        keys = [rate_key(group, s.scope_id) for s in scopes] + [_call_key(group)]
        out = await self._script("rate_acquire", keys, args)
        limited_by = out[2].decode() if out[2] else None
        return RateDecision(out[0] == 1, float(out[1]) / 1000, limited_by, _states(scopes, out, 3))

    async def rate_add_tokens(self, scopes: tuple[RateScope, ...], tokens: int) -> None:
        scopes = tuple(s for s in scopes if s.tpm is not None)
        if scopes and tokens > 0:
            await self.rate_adjust(scopes, 0, tokens)

    async def rate_adjust(
        self, scopes: tuple[RateScope, ...], requests: int, tokens: int
    ) -> tuple[RateState, ...]:
        if not scopes:
            return ()
        group = _one_group(scopes)
        args: list[Any] = [requests, tokens]
        for s in scopes:
            args += [s.rpm or 0, s.tpm or 0]
        keys = [rate_key(group, s.scope_id) for s in scopes] + [_call_key(group)]
        out = await self._script("rate_adjust", keys, args)
        return _states(scopes, out, 0)

    async def claim_once(self, key: str, group: str, ttl_s: float | None) -> bool:
        ttl_ms = 0 if ttl_s is None else max(1, round(ttl_s * 1000))
        token = os.urandom(8).hex()  # this call's mark: a retry of it still wins
        won = await self._script("claim_once", [claim_key(group, key)], [token, ttl_ms])
        return bool(won == 1)

    # the one place redis errors become StoreError

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self._scripts.get(name)
        if script is None:
            raise StoreError("redis store is not started")
        return await self._call(name, lambda c: script(keys=keys, args=args, client=c))

    async def _call(self, what: str, op: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``op`` within timeout_s, redis-py's one retry included: an outage fails fast."""
        client = self._client
        if client is None:
            raise StoreError("redis store is not started")
        try:
            async with asyncio.timeout(self._config.timeout_s), self._slots:
                return await op(client)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreError(f"redis {what} failed: {type(exc).__name__}: {exc}") from exc


def recovery_retry() -> Retry:
    """One retry, on a fresh connection, after a connection error or a timeout.

    What it recovers from: pooled connections that died with a Redis restart or failover
    (every one of them fails its next command or health-check PING once). Why once is
    safe: every script is idempotent against its own retry (see the module docstring).
    The short jittered backoff spreads the reconnects of a whole pool.
    """
    return Retry(
        ExponentialWithJitterBackoff(cap=0.05, base=0.01),
        1,
        supported_errors=(RedisConnectionError, RedisTimeoutError),
    )


def _rows(scopes: tuple[BudgetScope, ...], out: list[Any], at: int) -> list[SpendRow]:
    """(spent, reserved) pairs of a script's reply from index ``at``, as rows of ``scopes``."""
    return [
        SpendRow(s.scope_id, s.period_key, int(out[at + 2 * i]), int(out[at + 2 * i + 1]))
        for i, s in enumerate(scopes)
    ]


def _states(scopes: tuple[RateScope, ...], out: list[Any], at: int) -> tuple[RateState, ...]:
    """(level_r, level_t) pairs of a script's reply from index ``at``, as rate states."""
    return tuple(
        rate_state(s, float(out[at + 2 * i]), float(out[at + 2 * i + 1]))
        for i, s in enumerate(scopes)
    )


def _one_group(scopes: tuple[BudgetScope | RateScope, ...]) -> str:
    group = scopes[0].group
    if any(s.group != group for s in scopes):
        raise ValueError("every scope of one request must share its group (one hash tag)")
    return group


def _distinct(scopes: tuple[BudgetScope | RateScope, ...]) -> None:
    if len({s.scope_id for s in scopes}) != len(scopes):
        raise ValueError("a request's scopes must have distinct scope ids")


def _budget_keys(group: str, scopes: tuple[BudgetScope, ...]) -> list[str]:
    """(ledger, reservation set) per scope, flattened: the KEYS layout of the budget scripts."""
    keys = []
    for s in scopes:
        keys += [
            ledger_key(group, s.scope_id, s.period_key),
            reservations_key(group, s.scope_id, s.period_key),
        ]
    return keys


def _member(request_id: str, amount_nano: int) -> str:
    return f"{amount_nano}:{request_id}"


def _expire_at(scope: BudgetScope) -> int:
    return 0 if scope.period_end is None else int(scope.period_end) + LEDGER_GRACE_S


async def _scan(client: Redis | RedisCluster, pattern: str) -> list[str]:
    return [k.decode() async for k in client.scan_iter(match=pattern, count=1000)]


def _parse_ledger_key(key: str) -> tuple[str, str, str] | None:
    """``tallygate:{tag}:ledger:<scope_id>:<period_key>`` → (tag, scope_id, period_key)."""
    head = f"{PREFIX}:{{"
    if not key.startswith(head):
        return None
    tag, sep, rest = key[len(head) :].partition("}:ledger:")
    scope_id, colon, period_key = rest.rpartition(":")
    if not sep or not colon or "}" in tag:
        return None
    return tag, scope_id, period_key
