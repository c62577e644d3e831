"""One replica's admission budget shared by every worker process, kept in Redis.

`Admission` is shared by the sessions of one process; N processes each with their own would
admit up to N times the limit. `SharedAdmission` keeps the budget in Redis instead, under
one key prefix per replica, and is an `Admission` to the router and the transport.

The model, all in Redis and changed only by Lua scripts (atomic, on Redis's clock):
    leases       sorted set, slot -> expiry. A held slot is a lease renewed by its worker's
                 background loop every `lease_ttl_s / 3`; every script first reclaims
                 expired leases, so a killed worker's slots come back within the TTL.
    waiting      sorted set, ticket -> rank. FIFO: a global arrival counter. LAS: the
                 session's attained service at enqueue plus `aging_rate` x enqueue time
                 (attained - aging x waited, less the term common to all waiters), read
                 from a per-session hash shared by all replicas; a waiter older than
                 `max_wait_s` goes first. A rank is fixed at enqueue: a session's later
                 service does not re-rank its waiting tickets (the in-process order does).
    dispatch     after every enqueue, release, cancel and tick: while leases < limit, the
                 head of `waiting` becomes a lease. Grants to other workers' tickets are
                 published on a channel, which wakes them at once; each worker with waiters
                 also polls with back-off (20 ms to 0.5 s), which covers a message lost
                 while its subscriber reconnects and leases reclaimed by expiry, which no
                 one publishes.
    limit        one worker holds a leader lock (TTL, renewed by its loop), runs the limit
                 algorithm and writes the value; the others read it. Non-leaders push their
                 completed calls' samples to a list the leader drains. Each ticket names its
                 call's stage and output cap, and a lease keeps its grant time, so the
                 leader's tick reads every worker's calls in flight and its limit projects
                 them (KV bound, output-cap prior) as a single process's would.
    workers      sorted set of live workers (heartbeat with the lease TTL).

Prefix hold and sibling-first, as `Admission` has them (LAS): a session's calls all come
from the worker that runs it, so the hold behind a prefix leader without a first token is
kept in that worker, before the calls join the shared queue; once the prefix is hot, the
session's calls enqueue with a rank ahead of every ranked waiter (`HOT_BAND`), while it
holds fewer than half the slots. A waiter past `max_wait_s` still goes first.

One round trip per batch, not per call: a worker's enqueues, releases and cancels wait in an
outbox that its senders drain, at most `BATCHES_IN_FLIGHT` batches at a time, so under load
the calls that arrive during a round trip share the next one and the client's cost per
call falls as the load rises. A cancel is held back while its enqueue is in flight (two
batches may land in either order). An enqueue that finds nobody waiting and a slot free is
granted in the batch's reply, with no second round trip; a release is sent off the
caller's path.

Redis unreachable at `start`: `AdmissionStoreUnavailable` naming the URL (credentials
redacted). Redis lost mid-run: calls continue under a local `Admission` with a fixed limit
of the last shared limit // the last worker count (at least 1); the event is logged once,
counted in `fallbacks` (and `stats()`), and passed to `on_degraded`. The shared slots this
worker still holds count against that limit: a local call waits while they and the local
slots fill it, and is admitted when either kind is given back. The loop keeps probing;
when Redis answers, new calls use the shared budget again, while slots taken locally drain
through the local admission (its waiters no longer counting the shared slots, which the
shared budget counts again).

The scripts name keys outside KEYS (the per-session service hashes): one Redis, no cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from routing.admission import _HOT, _WARMING, Admission, AdmissionObserver, Outcome, Slot
from routing.calls import current_call
from routing.endpoints import redact_url
from routing.limits import (
    FixedLimit,
    InFlightWatcher,
    Limit,
    OutputCapped,
    Sample,
    ServerWatcher,
)
from routing.orders import SHARED_ORDERS, ServiceLedger, WaitOrder, make_order
from routing.vllm_metrics import ServerSnapshot

logger = logging.getLogger(__name__)

SERVICE_TTL_S: Final = 86_400  # a session's attained service is forgotten a day after its last call
MAX_SAMPLES: Final = 1_000  # samples kept for the leader; older ones are dropped
# A hot ticket's rank is its enqueue time less this: ahead of every LAS rank (attained
# service + aging x Redis time, which is positive) and of every FIFO counter.
HOT_BAND: Final = 10**12
POLL_MIN_S: Final = 0.02
POLL_MAX_S: Final = 0.5
# Batches a worker has in flight at once: a call that arrives during one round trip goes
# out at once in a second, rather than waiting for the first to land; calls that arrive
# while both are in flight share the next.
BATCHES_IN_FLIGHT = 2

# Redis failures plus the socket errors a dropped connection can surface as.
_STORE_ERRORS: Final = (RedisError, OSError)

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local service_prefix = ARGV[1]
local channel = ARGV[2]
local ttl = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local default_limit = tonumber(ARGV[5])
local caller = ARGV[6]

local function stamp(x) return string.format('%.6f', x) end

local function begin_service(sid, at)
  local k = service_prefix .. sid
  redis.call('HINCRBY', k, 'active', 1)
  redis.call('HINCRBYFLOAT', k, 'start_sum', stamp(at))
  redis.call('EXPIRE', k, __SERVICE_TTL__)
end

local function end_service(sid, started, at)
  local k = service_prefix .. sid
  redis.call('HINCRBY', k, 'active', -1)
  redis.call('HINCRBYFLOAT', k, 'start_sum', stamp(-started))
  redis.call('HINCRBYFLOAT', k, 'done', stamp(math.max(0, at - started)))
  redis.call('EXPIRE', k, __SERVICE_TTL__)
end

local function attained(sid)
  local v = redis.call('HMGET', service_prefix .. sid, 'active', 'start_sum', 'done')
  return (tonumber(v[3]) or 0) + (tonumber(v[1]) or 0) * now - (tonumber(v[2]) or 0)
end

local function drop_lease(lease, at)
  local info = redis.call('HGET', KEYS[2], lease)
  redis.call('ZREM', KEYS[1], lease)
  redis.call('HDEL', KEYS[2], lease)
  if info then
    local tab = string.find(info, '\\t', 1, true)
    end_service(string.sub(info, 1, tab - 1), tonumber(string.sub(info, tab + 1)), at)
    return 1
  end
  return 0
end

local function drop_ticket(ticket)
  redis.call('ZREM', KEYS[3], ticket)
  redis.call('ZREM', KEYS[4], ticket)
  redis.call('ZREM', KEYS[5], ticket)
  redis.call('HDEL', KEYS[6], ticket)
end

local function reclaim()
  local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES')
  for i = 1, #expired, 2 do
    drop_lease(expired[i], tonumber(expired[i + 1]))
  end
  local stale = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
  for _, ticket in ipairs(stale) do drop_ticket(ticket) end
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now)
end

local function current_limit()
  return tonumber(redis.call('GET', KEYS[7])) or default_limit
end

local function grant(ticket, sid)
  redis.call('ZADD', KEYS[1], now + ttl, ticket)
  redis.call('HSET', KEYS[2], ticket, sid .. '\\t' .. stamp(now))
  begin_service(sid, now)
end

-- Grants are published, except to `answered` (a set): the tickets whose batch gets this
-- reply, which are returned instead.
local function dispatch(answered)
  local limit = current_limit()
  local others = {}
  local mine = {}
  while redis.call('ZCARD', KEYS[1]) < limit do
    local oldest = redis.call('ZRANGE', KEYS[5], 0, 0, 'WITHSCORES')
    if #oldest == 0 then break end
    local ticket = oldest[1]
    if now - tonumber(oldest[2]) < max_wait then
      ticket = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    end
    local sid = redis.call('HGET', KEYS[6], ticket)
    drop_ticket(ticket)
    grant(ticket, sid)
    if answered and answered[ticket] then
      mine[#mine + 1] = ticket
    else
      others[#others + 1] = ticket
    end
  end
  if #others > 0 then redis.call('PUBLISH', channel, table.concat(others, ' ')) end
  return mine
end

local function state()
  return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[3]), current_limit(),
          redis.call('ZCOUNT', KEYS[8], now, '+inf')}
end
""".replace("__SERVICE_TTL__", str(SERVICE_TTL_S))

# One round trip for everything a worker's calls did since its last one, in this order:
# ARGV[7] aging rate (negative: FIFO); [8] number of releases, then (lease, sample JSON or '')
# pairs; then the number of cancels, then the cancelled tickets (each leaves the queue, or
# gives its slot back if it was granted meanwhile); then (ticket, session, hot) triples to
# enqueue, hot '1' where the session's prefix is computed on the replica (it goes ahead of
# every ranked waiter, in arrival order; see `Admission._pick`). Returns state and the
# enqueued tickets granted. An enqueue that finds nobody waiting and a free slot is granted
# at once, which is what the dispatch would do, without the queue's keys.
_BATCH = (
    _PRELUDE
    + """
reclaim()
local aging = tonumber(ARGV[7])
local i = 9
local sampled = false
for _ = 1, tonumber(ARGV[8]) do
  drop_lease(ARGV[i], now)
  if ARGV[i + 1] ~= '' then
    redis.call('RPUSH', KEYS[11], ARGV[i + 1])
    sampled = true
  end
  i = i + 2
end
if sampled then redis.call('LTRIM', KEYS[11], -__MAX_SAMPLES__, -1) end
local cancels = tonumber(ARGV[i])
i = i + 1
for _ = 1, cancels do
  if redis.call('ZSCORE', KEYS[3], ARGV[i]) then
    drop_ticket(ARGV[i])
  else
    drop_lease(ARGV[i], now)
  end
  i = i + 1
end
local answered = {}
local granted = {}
if i <= #ARGV then
  redis.call('ZADD', KEYS[8], now + ttl, caller)
  local free = current_limit() - redis.call('ZCARD', KEYS[1])
  local queued = redis.call('ZCARD', KEYS[3])
  for j = i, #ARGV, 3 do
    local ticket, sid, hot = ARGV[j], ARGV[j + 1], ARGV[j + 2]
    if queued == 0 and free > 0 then
      grant(ticket, sid)
      granted[#granted + 1] = ticket
      free = free - 1
    else
      local rank
      if hot == '1' then
        rank = now - __HOT_BAND__
      elseif aging < 0 then
        rank = redis.call('INCR', KEYS[9])
      else
        rank = attained(sid) + aging * now
      end
      redis.call('ZADD', KEYS[3], rank, ticket)
      redis.call('ZADD', KEYS[4], now + ttl, ticket)
      redis.call('ZADD', KEYS[5], now, ticket)
      redis.call('HSET', KEYS[6], ticket, sid)
      answered[ticket] = true
      queued = queued + 1
    end
  end
end
for _, ticket in ipairs(dispatch(answered)) do granted[#granted + 1] = ticket end
local s = state()
s[#s + 1] = granted
return s
""".replace("__MAX_SAMPLES__", str(MAX_SAMPLES)).replace("__HOT_BAND__", str(HOT_BAND))
)

# ARGV[7] local limit (written when leader), [8] '1' to read the calls in flight, [9] number
# of held leases, then the leases, then the waiting tickets. Returns state, leader flag, lost
# leases, granted tickets, samples, and, to a leader that asked, every lease's info (lease,
# "session<TAB>granted at" pairs) and Redis's now.
_TICK = (
    _PRELUDE
    + """
reclaim()
redis.call('ZADD', KEYS[8], now + ttl, caller)
local ttl_ms = math.floor(ttl * 1000)
local leader = 0
if redis.call('SET', KEYS[10], caller, 'NX', 'PX', ttl_ms) then
  leader = 1
elseif redis.call('GET', KEYS[10]) == caller then
  redis.call('PEXPIRE', KEYS[10], ttl_ms)
  leader = 1
end
local samples = {}
if leader == 1 then
  redis.call('SET', KEYS[7], ARGV[7])
  samples = redis.call('LPOP', KEYS[11], __MAX_SAMPLES__) or {}
end
local held = tonumber(ARGV[9])
local lost = {}
for i = 10, 9 + held do
  if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[i]) == 0 then
    lost[#lost + 1] = ARGV[i]
  end
end
dispatch()
local granted = {}
for i = 10 + held, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    granted[#granted + 1] = ARGV[i]
  else
    redis.call('ZADD', KEYS[4], 'XX', now + ttl, ARGV[i])
  end
end
local s = state()
s[#s + 1] = leader
s[#s + 1] = lost
s[#s + 1] = granted
s[#s + 1] = samples
if leader == 1 and ARGV[8] == '1' then
  s[#s + 1] = redis.call('HGETALL', KEYS[2])
  s[#s + 1] = stamp(now)
end
return s
""".replace("__MAX_SAMPLES__", str(MAX_SAMPLES))
)

_FALLBACK: Final = object()  # a waiter's future result: Redis went away, admit locally


class AdmissionStoreUnavailable(RuntimeError):
    """Redis could not be reached when a shared admission started."""


@dataclass(frozen=True)
class SharedState:
    """The replica's shared counters as the last script saw them."""

    in_flight: int
    queued: int
    limit: int
    workers: int


@dataclass
class _Waiter:
    session_id: str
    enqueued_at: float
    future: asyncio.Future[object]


@dataclass
class _PrefixGate:
    """A session's calls held behind its prefix leader: open at the leader's first token or
    its end, or at `deadline` (loop time)."""

    opened: asyncio.Event
    deadline: float
    waiting: int = 0


@dataclass
class _Lease:
    lease_id: str
    in_flight_at_admit: int


# A ticket (and the lease it becomes) names its call's stage and output cap, so that the
# leader's limit can project every worker's calls in flight: "worker:seq:stage:max_tokens".
_STAGE_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _ticket_call(ticket: str) -> tuple[str, int]:
    """(stage, output cap or 0) of a ticket; ("-", 0) for a ticket that names neither."""
    parts = ticket.split(":")
    if len(parts) != 4:
        return "-", 0
    try:
        return parts[2] or "-", max(0, int(parts[3]))
    except ValueError:
        return parts[2] or "-", 0


def _calls_in_flight(lease_info: list[str], redis_now: float) -> list[tuple[float, str, int]]:
    """(age, stage, output cap) of every lease, from the flat HGETALL of lease_info."""
    calls = []
    for lease, info in zip(lease_info[::2], lease_info[1::2], strict=True):
        _, _, granted = info.partition("\t")
        try:
            age = max(0.0, redis_now - float(granted))
        except ValueError:
            continue
        stage, cap = _ticket_call(lease)
        calls.append((age, stage, cap))
    return calls


@dataclass
class _Outbox:
    """What this worker's calls did since the last batch was sent."""

    # ticket -> (session, hot: its prefix is computed here, see `_pick`), in order
    enqueues: dict[str, tuple[str, bool]] = field(default_factory=dict)
    releases: list[tuple[str, str]] = field(default_factory=list)  # (lease, sample JSON)
    cancels: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.enqueues or self.releases or self.cancels)


class _LocalFallback(Admission):
    """The local admission while Redis is away: a fixed limit that this worker's shared
    slots, still held, count against.

    `Admission` grants while its own in-flight is under `limit`, so `limit` here is the room
    left for local slots (0 when the shared ones fill it); `fallback_limit` is the limit.
    """

    def __init__(
        self,
        name: str,
        fallback_limit: int,
        held_shared: Callable[[], int],
        order: WaitOrder,
        ledger: ServiceLedger,
        observer: AdmissionObserver | None,
    ) -> None:
        super().__init__(name, FixedLimit(fallback_limit), order, ledger, observer)
        self.fallback_limit = fallback_limit
        self._held_shared = held_shared

    @property
    def limit(self) -> int:
        """Slots local calls may hold now: the fallback limit less the shared slots held."""
        return max(0, self.fallback_limit - self._held_shared())

    def room_changed(self) -> None:
        """A shared slot was given back: admit the waiters that now fit."""
        self._dispatch()
        self._notify()

    def stop_counting_shared(self) -> None:
        """The shared budget counts the shared slots again: local waiters stop waiting on them."""
        self._held_shared = lambda: 0
        self.room_changed()


class _WholeView:
    """The fallback's observer: admits and releases pass through; its state is reported as
    the shared admission's (the fallback limit, shared slots held included), not its own."""

    def __init__(self, owner: SharedAdmission, observer: AdmissionObserver) -> None:
        self._owner = owner
        self._observer = observer

    def on_state(self, limit: int, in_flight: int, queued: int) -> None:
        self._owner._notify()

    def on_admit(self, waited_s: float) -> None:
        self._observer.on_admit(waited_s)

    def on_release(self, outcome: Outcome) -> None:
        self._observer.on_release(outcome)


class SharedAdmission(Admission):
    """An `Admission` whose slots, queue and limit live in Redis, shared by all workers.

    Call `start()` before the first `acquire` and `aclose()` at the end (or use
    `async with`). Everything else is the `Admission` surface: `acquire`, `Slot.release`,
    `limit`, `in_flight`, `queued` and `outstanding` (replica-wide, as last seen),
    `on_snapshot`, `stats()`.

    Args:
        name: Replica name; with `key_prefix` it names the replica's Redis keys, so every
            worker must use the same name for the same replica.
        limit: The limit algorithm (run by the leader; the others read its value).
        url: `redis://` or `rediss://` URL.
        order: "fifo" or "las" ("oldest" is refused: ValueError).
        ledger: In-process service accounts, used by the local fallback's order.
        observer: Metrics sink (replica-wide in-flight and queue).
        key_prefix: Prefix of every key; the service hashes are shared by all replicas
            under one prefix.
        lease_ttl_s: A slot not renewed for this long is reclaimed.
        aging_rate: LAS: slot-seconds of attained service forgiven per second waited.
        max_wait_s: LAS: a waiter older than this goes first.
        on_degraded: Called with True when Redis is lost (fallback starts) and False when
            the shared budget resumes.
        max_connections: Connections to Redis this admission may open (one is the
            subscriber's); calls beyond wait for a free one.
        prefix_hold_s: As `Admission`'s: a session's calls wait in this worker while its
            prefix leader on this replica has no first token, at most this long, before
            they join the shared queue (None: no hold). A session's calls all come from
            the worker that runs it, so the hold needs no shared state.
    """

    def __init__(
        self,
        name: str,
        limit: Limit,
        *,
        url: str,
        order: str = "fifo",
        ledger: ServiceLedger | None = None,
        observer: AdmissionObserver | None = None,
        key_prefix: str = "tandem:admission",
        lease_ttl_s: float = 10.0,
        aging_rate: float = 1.0,
        max_wait_s: float = 60.0,
        on_degraded: Callable[[bool], None] | None = None,
        max_connections: int = 32,
        prefix_hold_s: float | None = None,
    ) -> None:
        if order not in SHARED_ORDERS:
            # The in-Redis rank knows FIFO and LAS; a session's arrival is per process.
            raise ValueError(
                f"order {order!r} is not available with a shared admission budget "
                f"(TANDEM_ADMISSION_URL): use one of {', '.join(SHARED_ORDERS)}"
            )
        ledger = ledger or ServiceLedger()
        super().__init__(
            name, limit, make_order(order, ledger), ledger, observer, prefix_hold_s=prefix_hold_s
        )
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be > 0, not {lease_ttl_s}")
        self.url = url
        self.order_name = order
        self.lease_ttl_s = lease_ttl_s
        self.on_degraded = on_degraded
        if max_connections < 2:
            raise ValueError(
                f"max_connections must be >= 2 (one subscribes), not {max_connections}"
            )
        self.max_connections = max_connections
        self.worker_id = f"{os.getpid():x}-{secrets.token_hex(4)}"
        self.fallbacks = 0
        self.rejoins = 0
        self.leader = False
        self._aging = aging_rate if order == "las" else -1.0
        self._max_wait_s = max_wait_s if order == "las" else 1e18
        base = f"{key_prefix}:{name}"
        self._keys = [
            f"{base}:{part}"
            for part in (
                "leases",
                "lease_info",
                "waiting",
                "wait_expiry",
                "wait_since",
                "wait_session",
                "limit",
                "workers",
                "seq",
                "leader",
                "samples",
            )
        ]
        self._channel = f"{base}:granted"
        self._service_prefix = f"{key_prefix}:service:"
        self._redis: aioredis.Redis | None = None
        self._subscriber_redis: aioredis.Redis | None = None
        self._call_timeout_s = max(1.0, lease_ttl_s / 3)
        self._scripts: dict[str, Any] = {}
        self._shared = SharedState(0, 0, max(1, limit.limit), 1)
        self._tickets = itertools.count()
        # Leader only: (loop time of the last tick, (age then, stage) of every call in flight).
        self._shared_calls: tuple[float, list[tuple[float, str]]] | None = None
        self._waiters: dict[str, _Waiter] = {}
        self._leases: dict[Slot, _Lease] = {}
        self._fallback: _LocalFallback | None = None
        self._draining: list[Admission] = []
        self._loop_task: asyncio.Task[None] | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._outbox = _Outbox()
        self._senders: set[asyncio.Task[None]] = set()
        self._sending: set[str] = set()  # tickets whose enqueue is in a batch in flight
        self._wake = asyncio.Event()
        self._published_limit: int | None = None
        self._prefix_gates: dict[str, _PrefixGate] = {}
        self._queued_here: dict[str, int] = {}  # session -> its calls in the shared queue

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, register this worker and start renewing; fails fast when Redis is away.

        Raises:
            AdmissionStoreUnavailable: Redis did not answer at `url` (password redacted).
        """
        if self._loop_task is not None:
            return
        # A bounded pool: a thousand sessions must not open a thousand connections (Redis
        # caps clients at its open-file limit); a call waits for a free one instead. No
        # socket timeout on it: redis-py (on Python 3.11) then sends every command through
        # `asyncio.wait_for`, a task of its own and three more loop turns per call; `_call`
        # bounds the whole call with `asyncio.timeout` instead.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections - 1,
            timeout=self.lease_ttl_s,
            decode_responses=True,
            socket_timeout=None,  # redis-py's default is 5 s
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 1),
        )
        self._redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        # The subscriber's own connection keeps a read timeout: a silent one is replaced.
        self._subscriber_redis = aioredis.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=self._call_timeout_s,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 1),
        )
        for label, source in (("batch", _BATCH), ("tick", _TICK)):
            self._scripts[label] = self._redis.register_script(source)
        try:
            await self._tick()
        except _STORE_ERRORS as exc:
            await self._redis.aclose()
            await self._subscriber_redis.aclose()
            self._redis = self._subscriber_redis = None
            raise AdmissionStoreUnavailable(
                f"admission store {redact_url(self.url)} is unreachable: {exc}"
            ) from None
        self._subscriber = asyncio.create_task(self._listen(), name=f"admission {self.name} sub")
        self._loop_task = asyncio.create_task(self._run(), name=f"admission {self.name}")

    async def aclose(self) -> None:
        """Stop renewing, send the pending releases, close the connection."""
        for task in (self._loop_task, self._subscriber):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._subscriber = None
        while self._senders:
            await asyncio.gather(*self._senders)
        for client in (self._redis, self._subscriber_redis):
            if client is not None:
                await client.aclose()
        self._redis = self._subscriber_redis = None

    async def __aenter__(self) -> SharedAdmission:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the Admission surface -------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while Redis is away and calls are admitted by the local fallback."""
        return self._fallback is not None

    @property
    def limit(self) -> int:
        """The replica's shared limit (the fallback's while degraded)."""
        if self._fallback is not None:
            return self._fallback.fallback_limit
        return self._shared.limit

    @property
    def in_flight(self) -> int:
        """Slots held on the replica by all workers, as last seen, plus local fallback ones."""
        local = sum(a.in_flight for a in self._local_admissions())
        if self._fallback is not None:
            return local + len(self._leases)
        return self._shared.in_flight + local

    @property
    def queued(self) -> int:
        """Calls waiting on the replica (all workers), as last seen, plus local waiters."""
        local = sum(a.queued for a in self._local_admissions()) + self._held_count
        if self._fallback is not None:
            return local
        return self._shared.queued + local

    @property
    def outstanding(self) -> int:
        """In flight plus queued."""
        return self.in_flight + self.queued

    @property
    def shared(self) -> SharedState:
        """The shared counters as the last script saw them."""
        return self._shared

    async def acquire(self, session_id: str = "-", max_tokens: int | None = None) -> Slot:
        """Wait for a shared slot (a local one while Redis is away).

        A caller cancelled while queued leaves the shared queue, and a slot granted in the
        same instant is given back. The call's stage and `max_tokens` travel in its ticket,
        so that the leader's limit can project the calls of every worker.
        """
        if self._redis is None:
            raise RuntimeError(f"admission {self.name}: start() was not called")
        if self._holds(session_id):
            await self._behind_prefix_leader(session_id)
        if self._fallback is not None:
            return await self._fallback.acquire(session_id, max_tokens)
        loop = asyncio.get_running_loop()
        ticket = self._ticket(max_tokens)
        waiter = _Waiter(session_id, loop.time(), loop.create_future())
        # Registered before the batch is sent, so a grant published at once is not missed.
        self._waiters[ticket] = waiter
        self._outbox.enqueues[ticket] = (session_id, self._hot(session_id))
        self._send_soon()
        self._queued_here[session_id] = self._queued_here.get(session_id, 0) + 1
        try:
            result = await waiter.future
            if result is not _FALLBACK:
                return self._granted(ticket, waiter)  # warming before it stops queueing
        except asyncio.CancelledError:
            self._withdraw(ticket, waiter)
            raise
        finally:
            self._queued_here[session_id] -= 1
            if not self._queued_here[session_id]:
                del self._queued_here[session_id]
                if not self._holds(session_id):
                    self._unhold(session_id)  # it left the queue without a slot
        return await self._local_acquire(session_id, max_tokens)

    def on_snapshot(self, snapshot: ServerSnapshot) -> None:
        """Feed a scrape to a limit that reads the server; the leader publishes the new limit.

        The leader's limit is told every worker's calls in flight (their ages and stages, as
        the last tick read them from Redis, aged since), as `Admission` tells its own."""
        now = asyncio.get_running_loop().time()
        if self.leader and self._shared_calls is not None:
            at, calls = self._shared_calls
            if isinstance(self.limit_algorithm, InFlightWatcher):
                self.limit_algorithm.set_in_flight([(age + now - at, kind) for age, kind in calls])
        if isinstance(self.limit_algorithm, ServerWatcher):
            self.limit_algorithm.on_snapshot(snapshot, now)
        if self._fallback is not None:
            self._fallback.on_snapshot(snapshot)
        elif self.leader and self.limit_algorithm.limit != self._published_limit:
            self._wake.set()  # the loop's next tick writes it
        self._notify()

    def stats(self) -> dict[str, int]:
        """`Admission.stats()` plus workers, leader, degraded, fallbacks and rejoins."""
        out = super().stats()
        out.update(
            limit=self.limit,
            in_flight=self.in_flight,
            queued=self.queued,
            workers=self._shared.workers,
            leader=int(self.leader),
            degraded=int(self.degraded),
            fallbacks=self.fallbacks,
            rejoins=self.rejoins,
        )
        return out

    # -- slots -----------------------------------------------------------------------

    async def _behind_prefix_leader(self, session_id: str) -> None:
        """Wait until the session's prefix leader here has its first token or has ended, at
        most `prefix_hold_s` from the first of its calls held (a cancelled caller just
        leaves: nothing of it was sent)."""
        assert self.prefix_hold_s is not None  # `_holds` is False without a hold
        loop = asyncio.get_running_loop()
        gate = self._prefix_gates.get(session_id)
        if gate is None:
            gate = _PrefixGate(asyncio.Event(), loop.time() + self.prefix_hold_s)
            self._prefix_gates[session_id] = gate
        gate.waiting += 1
        self.prefix_held += 1
        self._held_count += 1
        self._notify()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(gate.deadline):
                    await gate.opened.wait()
        finally:
            gate.waiting -= 1
            self._held_count -= 1
            if gate.waiting == 0 and self._prefix_gates.get(session_id) is gate:
                del self._prefix_gates[session_id]  # expired: a later leader holds anew

    def _holds(self, session_id: str) -> bool:
        """`Admission._holds`, where a call of the session still in the shared queue leads
        too: its siblings (a plan's coders, sent together) arrive during the round trip
        that grants it, and would each compute the prefix."""
        if self.prefix_hold_s is None or session_id in self._prefix[_HOT]:
            return False
        return session_id in self._prefix[_WARMING] or session_id in self._queued_here

    def _hot(self, session_id: str) -> bool:
        """Whether a call of `session_id` joins the front of the shared queue (the rule of
        `Admission._pick`)."""
        return self.prefix_hold_s is not None and self._goes_first(
            session_id, max(1, self.limit // 2)
        )

    def _unhold(self, session_id: str) -> None:
        """Let the session's held calls go on to the shared queue."""
        gate = self._prefix_gates.pop(session_id, None)
        if gate is not None:
            gate.opened.set()

    def _first_token(self, slot: Slot) -> None:
        """The prefix is computed on the server: the session's held calls join the queue."""
        super()._first_token(slot)  # its own calls are held here, not in `Admission._held`
        self._unhold(slot.session_id)

    def _granted(self, ticket: str, waiter: _Waiter) -> Slot:
        now = asyncio.get_running_loop().time()
        slot = Slot(self, waiter.session_id, now, now - waiter.enqueued_at)
        self._lead_prefix(slot)
        self._leases[slot] = _Lease(ticket, self._shared.in_flight)
        self.admitted += 1
        self.peak_in_flight = max(self.peak_in_flight, self._shared.in_flight)
        self.ledger.begin(waiter.session_id, now, waiter.enqueued_at)
        if self.observer is not None:
            self.observer.on_admit(slot.waited_s)
        return slot

    def _release(self, slot: Slot, outcome: Outcome) -> None:
        lease = self._leases.pop(slot, None)
        if lease is None:
            return
        now = asyncio.get_running_loop().time()
        self.ledger.end(slot.session_id, slot.admitted_at, now)
        self._prefix_ended(slot)
        if outcome.kind in ("error", "dropped"):
            self.failed += 1
        elif outcome.kind == "cancelled":
            self.cancelled += 1
        sample_json = ""
        if outcome.kind in ("ok", "dropped"):
            sample = Sample(
                at=now,
                in_flight=(lease.in_flight_at_admit + self._shared.in_flight) / 2,
                ok=outcome.kind == "ok",
                dropped=outcome.kind == "dropped",
                ttft_s=outcome.ttft_s,
                itl_s=outcome.itl_s,
                tpot_s=outcome.tpot_s,
            )
            if self.leader:
                self.limit_algorithm.on_sample(sample)
            else:
                sample_json = json.dumps(sample.__dict__)
        if self.observer is not None:
            self.observer.on_release(outcome)
        if self._fallback is None:
            self._outbox.releases.append((lease.lease_id, sample_json))
            self._send_soon()
        else:
            self._fallback.room_changed()  # a shared slot counted against it is back

    def _withdraw(self, ticket: str, waiter: _Waiter) -> None:
        """A caller cancelled while waiting: leave the queue, or give back a slot granted
        in the same instant."""
        if self._waiters.pop(ticket, None) is None:
            future = waiter.future
            if future.cancelled() or future.result() is _FALLBACK:
                return  # `_grant_waiter` gave the slot back, or Redis went away
        elif self._outbox.enqueues.pop(ticket, None) is not None:
            return  # never sent
        if self._fallback is None:
            self._outbox.cancels.append(ticket)
            self._send_soon()

    async def _local_acquire(self, session_id: str, max_tokens: int | None) -> Slot:
        # The loop may have rejoined Redis meanwhile: then this call waits on the shared budget.
        if self._fallback is None:
            return await self.acquire(session_id, max_tokens)
        return await self._fallback.acquire(session_id, max_tokens)

    # -- Redis -----------------------------------------------------------------------

    async def _call(self, script: str, *args: str) -> list[Any]:
        if self._redis is None:
            raise RedisError("admission store connection closed")
        argv = [
            self._service_prefix,
            self._channel,
            repr(self.lease_ttl_s),
            repr(self._max_wait_s),
            str(max(1, self.limit_algorithm.limit)),
            self.worker_id,
            *args,
        ]
        async with asyncio.timeout(self._call_timeout_s):  # TimeoutError is an OSError
            return list(await self._scripts[script](keys=self._keys, args=argv))

    def _send_soon(self) -> None:
        """Start a sender if fewer than `BATCHES_IN_FLIGHT` run: what calls add meanwhile
        goes in a running sender's next batch."""
        if len(self._senders) < BATCHES_IN_FLIGHT and self._redis is not None:
            task = asyncio.get_running_loop().create_task(
                self._send(), name=f"admission {self.name} send"
            )
            self._senders.add(task)

    def _take_batch(self) -> _Outbox:
        """The outbox to send now, less the cancels whose enqueue is still in flight (the
        cancel must land after it: two batches in flight may land in either order)."""
        batch, self._outbox = self._outbox, _Outbox()
        if self._sending and batch.cancels:
            held_back = [ticket for ticket in batch.cancels if ticket in self._sending]
            if held_back:
                self._outbox.cancels = held_back
                batch.cancels = [t for t in batch.cancels if t not in self._sending]
        return batch

    async def _send(self) -> None:
        """Send the outbox in batches until it is empty (or holds only cancels that wait
        for a batch in flight, whose sender sends them when it lands)."""
        try:
            await self._send_batches()
        finally:
            # At once, not in a done callback: a call in the same loop turn must see this
            # sender gone and start another, or its enqueue waits for the next call's.
            task = asyncio.current_task()
            if task is not None:
                self._senders.discard(task)

    async def _send_batches(self) -> None:
        while self._outbox and self._fallback is None:
            batch = self._take_batch()
            if not batch:
                return
            args = [repr(self._aging), str(len(batch.releases))]
            for lease_id, sample_json in batch.releases:
                args += (lease_id, sample_json)
            args += (str(len(batch.cancels)), *batch.cancels)
            for ticket, (session_id, hot) in batch.enqueues.items():
                args += (ticket, session_id, "1" if hot else "0")
            self._sending.update(batch.enqueues)
            try:
                reply = await self._call("batch", *args)
            except _STORE_ERRORS as exc:
                self._degrade(exc)  # its leases expire in Redis if Redis still holds them
                return
            finally:
                self._sending.difference_update(batch.enqueues)
            self._observe_state(reply[:4])
            for ticket in reply[4]:
                self._grant_waiter(ticket)
            waiting = sum(ticket in self._waiters for ticket in batch.enqueues)
            if waiting and waiting == len(self._waiters):
                self._wake.set()  # the loop was idling at the renewal interval

    async def _tick(self) -> None:
        """Renew leases and waiters, heartbeat, lead if possible, collect grants and samples."""
        leases = [lease.lease_id for lease in self._leases.values()]
        limit_now = max(1, self.limit_algorithm.limit)
        now = asyncio.get_running_loop().time()
        # The leases are read for a limit that projects them, and not on every poll: the
        # loop ticks every POLL_MIN_S while calls wait, the scrapes come about once a second.
        read_calls = isinstance(self.limit_algorithm, InFlightWatcher | OutputCapped) and (
            self._shared_calls is None or now - self._shared_calls[0] >= POLL_MAX_S
        )
        reply = await self._call(
            "tick", str(limit_now), "1" if read_calls else "0", str(len(leases)), *leases,
            *self._waiters,
        )  # fmt: skip
        self._observe_state(reply[:4])
        self.leader = bool(int(reply[4]))
        if self.leader:
            self._published_limit = limit_now
        held = {lease.lease_id for lease in self._leases.values()}
        # A lease released while the tick ran is missing for a good reason.
        for lease_id in (lost for lost in reply[5] if lost in held):
            logger.warning(
                "admission %s: lease %s expired before it was renewed; the call goes on",
                self.name,
                lease_id,
            )
        for ticket in reply[6]:
            self._grant_waiter(ticket)
        now = asyncio.get_running_loop().time()
        for raw in reply[7]:
            fields = json.loads(raw)
            fields["at"] = now  # the sender's loop clock is not ours
            self.limit_algorithm.on_sample(Sample(**fields))
        if not self.leader:
            self._shared_calls = None
        elif len(reply) > 9:
            calls = _calls_in_flight(reply[8], float(reply[9]))
            self._shared_calls = (now, [(age, stage) for age, stage, _ in calls])
            if isinstance(self.limit_algorithm, OutputCapped):
                for _, stage, cap in calls:
                    if cap > 0:
                        self.limit_algorithm.note_output_cap(stage, cap)

    def _ticket(self, max_tokens: int | None) -> str:
        """A new ticket of this worker, naming the call's stage and output cap."""
        info = current_call.get()
        stage = _STAGE_UNSAFE.sub("_", info.stage)[:32] if info is not None else "-"
        return f"{self.worker_id}:{next(self._tickets):012d}:{stage or '-'}:{max_tokens or 0}"

    async def _run(self) -> None:
        interval_s = min(1.0, self.lease_ttl_s / 3)
        poll_s = POLL_MIN_S
        while True:
            wait_s = min(poll_s, interval_s) if self._waiters else interval_s
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()
                    poll_s = POLL_MIN_S  # new waiters or a new limit: look sooner
            self._wake.clear()
            poll_s = min(POLL_MAX_S, poll_s * 2)
            try:
                await self._tick()
            except _STORE_ERRORS as exc:
                self._degrade(exc)
                continue
            if self._fallback is not None:
                self._rejoin()

    async def _listen(self) -> None:
        """Wake local waiters whose tickets another worker's script granted."""
        assert self._subscriber_redis is not None
        while True:
            pubsub = self._subscriber_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                async for message in pubsub.listen():
                    for ticket in str(message["data"]).split():
                        self._grant_waiter(ticket)
            except _STORE_ERRORS:
                await asyncio.sleep(POLL_MAX_S)  # the loop notices and degrades; retry later
            finally:
                with contextlib.suppress(*_STORE_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _grant_waiter(self, ticket: str) -> None:
        waiter = self._waiters.pop(ticket, None)
        if waiter is None:
            return
        if waiter.future.done():  # cancelled as it was granted: give the slot back
            self._outbox.cancels.append(ticket)
            self._send_soon()
            return
        waiter.future.set_result(ticket)

    def _observe_state(self, reply: list[Any]) -> None:
        in_flight, queued, limit, workers = (int(x) for x in reply[:4])
        self._shared = SharedState(in_flight, queued, max(1, limit), max(1, workers))
        self.peak_in_flight = max(self.peak_in_flight, in_flight)
        self._notify()

    # -- degraded mode ---------------------------------------------------------------

    def _degrade(self, exc: BaseException) -> None:
        if self._fallback is not None:
            return
        shared = self._shared
        local_limit = max(1, shared.limit // max(1, shared.workers))
        logger.warning(
            "admission %s: store %s unreachable (%s); admitting locally with limit %d "
            "(shared limit %d / %d workers) until it answers",
            self.name,
            redact_url(self.url),
            exc,
            local_limit,
            shared.limit,
            shared.workers,
        )
        self.fallbacks += 1
        self.leader = False
        self._fallback = _LocalFallback(
            self.name,
            local_limit,
            lambda: len(self._leases),
            make_order(self.order_name, self.ledger),
            self.ledger,
            None if self.observer is None else _WholeView(self, self.observer),
        )
        self._outbox = _Outbox()  # leases and queued tickets expire in Redis
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            if not waiter.future.done():
                waiter.future.set_result(_FALLBACK)
        if self.on_degraded is not None:
            self.on_degraded(True)

    def _rejoin(self) -> None:
        assert self._fallback is not None
        logger.warning(
            "admission %s: store %s answers again; shared budget resumes",
            self.name,
            redact_url(self.url),
        )
        fallback, self._fallback = self._fallback, None
        fallback.stop_counting_shared()
        self._draining = [a for a in (*self._draining, fallback) if a.outstanding]
        self.rejoins += 1
        self._notify()
        if self.on_degraded is not None:
            self.on_degraded(False)

    def is_local(self, slot: Slot) -> bool:
        """True for a slot the local fallback granted (not a lease in the shared budget)."""
        return slot not in self._leases

    def _local_admissions(self) -> list[Admission]:
        self._draining = [a for a in self._draining if a.outstanding]
        return [*self._draining, *([self._fallback] if self._fallback is not None else [])]

    def _notify(self) -> None:
        if self.observer is not None:
            self.observer.on_state(self.limit, self.in_flight, self.queued)
