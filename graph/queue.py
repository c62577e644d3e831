"""Sessions submitted to a queue in Redis and run by whichever `tandem worker` claims them.

Redis rather than Postgres rows (`SELECT ... FOR UPDATE SKIP LOCKED`): a claim must outlive
any one transaction (a session runs for minutes), so rows would need a lease column and a
heartbeat anyway, and the shared admission already needs Redis. Claims, heartbeats and the
re-queue of a dead worker's sessions are Lua scripts, atomic on Redis's clock, like
`routing.shared_admission`.

The model, under one key prefix per queue name:
    requests   hash, session id -> the submitted `SessionRequest` (JSON). Submitting an id
               twice is refused: a session id is its checkpoint thread and its folder.
    pending    list of session ids waiting for a worker; submissions join the tail, re-queued
               sessions the head (they hold checkpointed work and attained service).
    claims     hash, session id -> the worker running it.
    workers    sorted set, worker -> heartbeat expiry. Each worker renews every
               `heartbeat_ttl_s / 3`. Every script first re-queues the claims of workers whose
               heartbeat expired, so a killed worker's sessions go back within the TTL and the
               next claimer resumes them from their checkpoint.
    attempts   hash, session id -> how many times it was claimed.
    results    hash, session id -> the `SessionOutcome` (JSON) of its last run.
    coded      list of finished coder files, "session\\tround\\tfile\\tworker" per line: which
               worker coded what, so a resume that redid finished work can be seen.

A submitted request is untrusted: `SessionRequest` checks it when submitted and again when
claimed (anything that can write to Redis can write to the queue).
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any, Final

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from nodes.context import MAX_REQUEST_CHARS, RunContext, check_request, parse_context
from nodes.workspace import check_session_id
from routing.endpoints import redact_url

DEFAULT_QUEUE: Final = "default"
HEARTBEAT_TTL_S: Final = 6.0
# A session claimed this many times without ending is not claimed again (it may be what
# kills its workers).
MAX_ATTEMPTS: Final = 5
# Larger than any valid request (JSON escaping at most ~6x per character) plus its context.
MAX_REQUEST_JSON_BYTES: Final = MAX_REQUEST_CHARS * 6 + 100_000

STORE_ERRORS: Final = (RedisError, OSError)

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local caller = ARGV[1]
local ttl = tonumber(ARGV[2])

-- Claims of workers whose heartbeat expired go back to the head of `pending`.
local function requeue_dead()
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  local claims = redis.call('HGETALL', KEYS[3])
  local back = 0
  for i = 1, #claims, 2 do
    if not redis.call('ZSCORE', KEYS[4], claims[i + 1]) then
      redis.call('HDEL', KEYS[3], claims[i])
      redis.call('LPUSH', KEYS[2], claims[i])
      back = back + 1
    end
  end
  return back
end

local function heartbeat()
  if caller ~= '' then redis.call('ZADD', KEYS[4], now + ttl, caller) end
end
"""

# -> {session id, request JSON, attempts} or {} when nothing is pending.
_CLAIM = (
    _PRELUDE
    + """
heartbeat()
requeue_dead()
while true do
  local sid = redis.call('LPOP', KEYS[2])
  if not sid then return {} end
  if redis.call('HEXISTS', KEYS[6], sid) == 0 then
    redis.call('HSET', KEYS[3], sid, caller)
    local attempts = redis.call('HINCRBY', KEYS[5], sid, 1)
    return {sid, redis.call('HGET', KEYS[1], sid) or '', attempts}
  end
end
"""
)

# ARGV[3] session id, [4] outcome JSON. Only the claimer's claim is dropped: a worker whose
# heartbeat lapsed may finish a session another worker has claimed since.
_COMPLETE = (
    _PRELUDE
    + """
heartbeat()
redis.call('HSET', KEYS[6], ARGV[3], ARGV[4])
if redis.call('HGET', KEYS[3], ARGV[3]) == caller then redis.call('HDEL', KEYS[3], ARGV[3]) end
return 1
"""
)

# ARGV[3..] session ids this worker gives back unfinished.
_RELEASE = (
    _PRELUDE
    + """
local back = 0
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[3], ARGV[i]) == caller then
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('LPUSH', KEYS[2], ARGV[i])
    back = back + 1
  end
end
return back
"""
)

# -> {requeued, pending, claimed, results, submitted, live workers}
_TICK = (
    _PRELUDE
    + """
heartbeat()
local back = requeue_dead()
return {back, redis.call('LLEN', KEYS[2]), redis.call('HLEN', KEYS[3]),
        redis.call('HLEN', KEYS[6]), redis.call('HLEN', KEYS[1]), redis.call('ZCARD', KEYS[4])}
"""
)

# ARGV[3..] pairs of (session id, request JSON); -> the ids refused as already submitted.
_SUBMIT = (
    _PRELUDE
    + """
local taken = {}
for i = 3, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
  else
    taken[#taken + 1] = ARGV[i]
  end
end
return taken
"""
)


class QueueStoreUnavailable(RuntimeError):
    """The queue's Redis could not be reached; the text names it (password redacted)."""


class SessionRequest(BaseModel):
    """One session submitted to the queue: what to build, and the run's context.

    The same limits as `tandem run`: a non-empty request of at most `MAX_REQUEST_CHARS`, a
    context that `parse_context` accepts, a session id that is a safe folder name.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    session_id: str
    request: str
    context: dict[str, Any] = Field(default_factory=dict)

    @field_validator("session_id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return check_session_id(value)

    @field_validator("request")
    @classmethod
    def _bounded(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the request is empty")
        return check_request(value)

    @field_validator("context")
    @classmethod
    def _context(cls, value: dict[str, Any]) -> dict[str, Any]:
        parse_context(value)
        return value

    def run_context(self, defaults: RunContext) -> RunContext:
        """`defaults` with the fields this request's context sets."""
        return defaults.merged(parse_context(self.context)) if self.context else defaults


class SessionOutcome(BaseModel):
    """How a queued session's last run ended, as the worker that ran it recorded."""

    model_config = ConfigDict(extra="ignore")

    session_id: str
    status: str
    worker: str
    attempts: int = 1
    resumed: bool = False
    files_ok: int = 0
    files_failed: int = 0
    error: str = ""
    wall_s: float = 0.0
    manifest_path: str = ""


@dataclass(frozen=True)
class Claim:
    """A session this worker now runs; `request` is None when its stored request is invalid
    (`problem` says why)."""

    session_id: str
    attempts: int
    request: SessionRequest | None
    problem: str = ""


@dataclass(frozen=True)
class QueueState:
    """Counts read by one tick."""

    requeued: int
    pending: int
    claimed: int
    results: int
    submitted: int
    workers: int

    @property
    def drained(self) -> bool:
        """Nothing waits and nobody runs anything: every submitted session has ended."""
        return self.pending == 0 and self.claimed == 0


def parse_request(raw: str, session_id: str) -> SessionRequest:
    """The `SessionRequest` stored for `session_id`.

    Raises:
        ValueError: naming the session and what is wrong (never echoing the request).
    """
    if len(raw) > MAX_REQUEST_JSON_BYTES:
        raise ValueError(f"session {session_id}: request over {MAX_REQUEST_JSON_BYTES:,} bytes")
    try:
        request = SessionRequest.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"session {session_id}: invalid request ({problems})") from None
    if request.session_id != session_id:
        raise ValueError(f"session {session_id}: its request names {request.session_id!r}")
    return request


def new_worker_id() -> str:
    """A worker id unique across hosts and restarts: host, pid and a random tag."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class SessionQueue:
    """The Redis session queue named `name`, seen by one worker (or a submitter).

    Args:
        url: `redis://` URL.
        worker_id: This worker's id; empty for a client that only submits and reads.
        name: The queue's name (its key prefix).
        heartbeat_ttl_s: A worker not heard from for this long has its sessions re-queued.
    """

    def __init__(
        self,
        url: str,
        *,
        worker_id: str = "",
        name: str = DEFAULT_QUEUE,
        heartbeat_ttl_s: float = HEARTBEAT_TTL_S,
    ) -> None:
        if heartbeat_ttl_s <= 0:
            raise ValueError(f"heartbeat_ttl_s must be > 0, not {heartbeat_ttl_s}")
        self.url = url
        self.worker_id = worker_id
        self.name = name
        self.heartbeat_ttl_s = heartbeat_ttl_s
        prefix = f"tandem:queue:{name}:"
        self.keys = [
            prefix + part
            for part in ("requests", "pending", "claims", "workers", "attempts", "results")
        ]
        self.coded_key = prefix + "coded"
        self._redis: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}

    async def __aenter__(self) -> SessionQueue:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Connect and check that Redis answers.

        Raises:
            QueueStoreUnavailable: naming the URL (password redacted).
        """
        self._redis = aioredis.Redis.from_url(
            self.url,
            decode_responses=True,
            socket_timeout=max(1.0, self.heartbeat_ttl_s / 3),
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 1),
        )
        for label, source in (
            ("claim", _CLAIM),
            ("complete", _COMPLETE),
            ("release", _RELEASE),
            ("tick", _TICK),
            ("submit", _SUBMIT),
        ):
            self._scripts[label] = self._redis.register_script(source)
        try:
            await self._redis.ping()
        except STORE_ERRORS as exc:
            await self.aclose()
            raise QueueStoreUnavailable(
                f"session queue {redact_url(self.url)} is unreachable: {exc}"
            ) from None

    async def aclose(self) -> None:
        """Leave the live workers (if a worker) and close the connection."""
        if self._redis is None:
            return
        if self.worker_id:
            try:
                await self._redis.zrem(self.keys[3], self.worker_id)
            except STORE_ERRORS:
                pass  # the heartbeat expires on its own
        await self._redis.aclose()
        self._redis = None

    async def _call(self, script: str, *args: str) -> Any:
        if self._redis is None:
            raise RedisError("session queue connection closed")
        argv = [self.worker_id, repr(self.heartbeat_ttl_s), *args]
        return await self._scripts[script](keys=self.keys, args=argv)

    async def submit(self, requests: list[SessionRequest]) -> list[str]:
        """Queue `requests` in order; returns the session ids refused as already submitted."""
        args: list[str] = []
        for request in requests:
            args += [request.session_id, request.model_dump_json()]
        return [str(s) for s in await self._call("submit", *args)]

    async def claim(self) -> Claim | None:
        """The next pending session, now claimed by this worker; None when none is pending."""
        reply = await self._call("claim")
        if not reply:
            return None
        session_id, raw, attempts = str(reply[0]), str(reply[1]), int(reply[2])
        try:
            return Claim(session_id, attempts, parse_request(raw, session_id))
        except ValueError as exc:
            return Claim(session_id, attempts, None, str(exc))

    async def complete(self, outcome: SessionOutcome) -> None:
        """Record how a session ended and drop this worker's claim on it."""
        await self._call("complete", outcome.session_id, outcome.model_dump_json())

    async def release(self, session_ids: list[str]) -> int:
        """Put this worker's unfinished sessions back at the head of the queue."""
        if not session_ids:
            return 0
        return int(await self._call("release", *session_ids))

    async def tick(self) -> QueueState:
        """Heartbeat (if a worker), re-queue dead workers' sessions, and read the counts."""
        reply = [int(x) for x in await self._call("tick")]
        return QueueState(*reply)

    async def record_coded(self, session_id: str, round_: int, path: str) -> None:
        """Note that this worker's coder finished `path` in round `round_` of the session."""
        assert self._redis is not None
        line = "\t".join((session_id, str(round_), path, self.worker_id))
        await self._redis.rpush(self.coded_key, line)

    async def coded(self) -> list[tuple[str, int, str, str]]:
        """Every (session, round, file, worker) recorded by `record_coded`, oldest first."""
        assert self._redis is not None
        lines = await self._redis.lrange(self.coded_key, 0, -1)
        rows = []
        for line in lines:
            session_id, round_, path, worker = str(line).split("\t", 3)
            rows.append((session_id, int(round_), path, worker))
        return rows

    async def results(self) -> dict[str, SessionOutcome]:
        """The recorded outcome of every ended session, by session id."""
        assert self._redis is not None
        raw = await self._redis.hgetall(self.keys[5])
        return {str(sid): SessionOutcome.model_validate_json(text) for sid, text in raw.items()}

    async def claims(self) -> dict[str, str]:
        """Session id -> the worker running it, now."""
        assert self._redis is not None
        raw = await self._redis.hgetall(self.keys[2])
        return {str(sid): str(worker) for sid, worker in raw.items()}

    async def live_workers(self) -> list[str]:
        """Workers that have registered a heartbeat (an expired one leaves at the next tick)."""
        assert self._redis is not None
        return [str(w) for w in await self._redis.zrange(self.keys[3], 0, -1)]
