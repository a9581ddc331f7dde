"""Token buckets kept in Redis, so that a user's rate limits count across nodes.

``RedisLimiter.take`` has ``chatd.ratelimit.Limiter.take``'s semantics: a
request passes only when every bucket has a token, then spends one from each;
a refused request spends nothing and gets the whole seconds to wait (>= 1).
The check and the spend are one Lua script call (one round trip, atomic), and
the time is Redis's own (``TIME``), so the nodes' clocks do not matter. The
takes of one pass of the node's scheduler share one call (``take``).

Layout: one hash per limited key, ``{prefix}:rl:{name}:{key}``, with two
fields per bucket, named after the bucket's limit (``"10/60.0:t"`` its
tokens, ``"10/60.0:s"`` when they were counted, in Redis seconds). The key
expires (``PEXPIRE``) when every bucket would be full again: an idle user
costs Redis nothing. Naming the fields after the limits means that a limit
changed by a reload starts afresh while the unchanged ones keep counting,
and that nodes briefly running different limits do not mix their buckets.

When Redis cannot be reached, ``take`` does not fail the chat: it counts in
a local ``LimiterTable`` with the same limits, so limits hold *per node*
until Redis is back (a user spread over N nodes may then get N times the
rate). It logs one warning per outage, and tries Redis again at most every
``retry_interval`` seconds meanwhile (so that messages do not each wait for
a failed connection attempt).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import coredis
import trio
from coredis.commands.script import Script
from coredis.exceptions import RedisError

from chatd.ratelimit import LimiterTable

log = logging.getLogger("chatd.cluster")

# KEYS: the hashes, one per take (a key may come twice: taken in turn).
# ARGV: capacity, period (seconds) of each bucket, in pairs. Returns, per
# key, 0 when allowed (a token spent from each bucket), else the whole
# seconds to wait (>= 1), having written nothing for that key.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local n = #ARGV / 2
local caps, rates, fields = {}, {}, {}
for i = 1, n do
  local cap = tonumber(ARGV[2 * i - 1])
  local name = ARGV[2 * i - 1] .. '/' .. ARGV[2 * i]
  caps[i] = cap
  rates[i] = cap / tonumber(ARGV[2 * i])
  fields[2 * i - 1] = name .. ':t'
  fields[2 * i] = name .. ':s'
end
local function take(key)
  local stored = redis.call('HMGET', key, unpack(fields))
  local tokens, stamps = {}, {}
  local wait = 0
  for i = 1, n do
    local tok = tonumber(stored[2 * i - 1])
    local stamp = tonumber(stored[2 * i])
    if tok == nil or stamp == nil then
      tok, stamp = caps[i], now
    elseif now > stamp then
      tok = math.min(caps[i], tok + (now - stamp) * rates[i])
      stamp = now
    end
    tokens[i], stamps[i] = tok, stamp
    if tok < 1 then
      wait = math.max(wait, (1 - tok) / rates[i])
    end
  end
  if wait > 0 then
    return math.max(1, math.ceil(wait))
  end
  local values, ttl = {}, 0
  for i = 1, n do
    local tok = tokens[i] - 1
    values[4 * i - 3] = fields[2 * i - 1]
    values[4 * i - 2] = string.format('%.17g', tok)
    values[4 * i - 1] = fields[2 * i]
    values[4 * i] = string.format('%.17g', stamps[i])
    ttl = math.max(ttl, (caps[i] - tok) / rates[i])
  end
  redis.call('HSET', key, unpack(values))
  redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
  return 0
end
local results = {}
for k = 1, #KEYS do
  results[k] = take(KEYS[k])
end
return results
"""

#: Most takes answered by one script call.
MAX_BATCH = 512


class _Batch:
    """The takes of one script call: their keys, then their answers (None:
    Redis did not answer; count locally)."""

    __slots__ = ("done", "keys", "results")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.results: list[int] | None = None
        self.done = trio.Event()


def _check(limits: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    checked = [(int(capacity), float(period)) for capacity, period in limits]
    if not checked:
        raise ValueError("at least one limit is needed")
    for capacity, period in checked:
        if capacity < 1 or not period > 0 or math.isinf(period):
            raise ValueError("capacity must be >= 1 and period > 0")
    return checked


class RedisLimiter:
    """A ``LimiterTable`` whose buckets live in Redis, shared by every node.

    ``client`` is an entered ``coredis.Redis``; ``prefix`` the cluster's key
    prefix; ``name`` tells this limiter's keys from other limiters' (say
    ``"messages"`` and ``"reads"``). ``take`` waits at most ``timeout``
    seconds for Redis before counting locally.
    """

    def __init__(
        self,
        client: coredis.Redis[Any],
        prefix: str,
        limits: Sequence[tuple[int, float]],
        name: str,
        *,
        timeout: float = 1.0,
        retry_interval: float = 1.0,
    ) -> None:
        self._script: Script[Any] = client.register_script(_TAKE)
        self._prefix = f"{prefix}:rl:{name}:"
        self._name = name
        self._timeout = timeout
        self._retry_interval = retry_interval
        #: While Redis is down: when to try it again (trio time).
        self._retry_at: float | None = None
        checked = _check(limits)
        self._args = [str(x) for pair in checked for x in (pair[0], repr(pair[1]))]
        self._local = LimiterTable(checked)
        #: The takes waiting for the next script call (None: none).
        self._batch: _Batch | None = None

    @property
    def redis_down(self) -> bool:
        """True while counting locally because Redis could not be reached."""
        return self._retry_at is not None

    async def take(self, key: int) -> float:
        """0.0 when allowed (a token spent from each bucket), else the whole
        seconds to wait (>= 1), nothing spent. Never raises for Redis trouble:
        counts in this node's own table instead (see the module docstring).

        The takes that arrive in one pass of the scheduler go to Redis in
        one script call: the first of them waits for that pass to end, then
        calls for all (measured: a call per take cost a node about 80 µs
        of CPU, and a cluster's commit rate a tenth of a node's)."""
        if self._retry_at is not None and trio.current_time() < self._retry_at:
            return self._local.take(key, trio.current_time())
        batch = self._batch
        leader = batch is None or len(batch.keys) >= MAX_BATCH
        if leader:
            batch = self._batch = _Batch()
        assert batch is not None
        index = len(batch.keys)
        batch.keys.append(f"{self._prefix}{key}")
        if leader:
            with trio.CancelScope(shield=True):  # the others wait for this call
                await trio.lowlevel.cancel_shielded_checkpoint()  # this pass's takes join
                if self._batch is batch:
                    self._batch = None
                await self._call(batch)
        else:
            await batch.done.wait()
        if batch.results is None:  # Redis did not answer: counted here
            return self._local.take(key, trio.current_time())
        return float(batch.results[index])

    async def _call(self, batch: _Batch) -> None:
        try:
            with trio.fail_after(self._timeout):
                reply: object = await self._script(keys=batch.keys, args=self._args)
        except (RedisError, OSError, trio.TooSlowError) as exc:
            self._went_down(exc)
        else:
            if self._retry_at is not None:
                self._retry_at = None
                log.info("rate limits (%s): Redis is back; counting cluster-wide", self._name)
            if not isinstance(reply, list) or len(reply) != len(batch.keys):
                batch.done.set()
                raise TypeError(f"unexpected reply from the rate limit script: {reply!r}")
            batch.results = [int(r) for r in reply]
        batch.done.set()

    def _went_down(self, exc: BaseException) -> None:
        if self._retry_at is None:
            reason = "no answer in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            log.warning(
                "rate limits (%s): Redis unreachable (%s); counting per node until it is back",
                self._name,
                reason or type(exc).__name__,
            )
        self._retry_at = trio.current_time() + self._retry_interval
