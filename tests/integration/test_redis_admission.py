"""Shared admission on a real redis-server: one budget across workers, kills, Redis outages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from routing.admission import Outcome, Slot
from routing.calls import CallInfo, current_call
from routing.limits import FixedLimit
from routing.router import Router
from routing.shared_admission import AdmissionStoreUnavailable, SharedAdmission
from routing.vllm_metrics import ServerSnapshot
from tests.integration.redis_server import INSTALL_HINT, REDIS_SERVER, RedisServer, free_port
from tests.sibling_calls import sibling_send_times

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(REDIS_SERVER).exists(), reason=INSTALL_HINT),
]

REPLICA = "coder@gpu0"
WAITING_KEY = f"tandem:admission:{REPLICA}:waiting"
LEASES_KEY = f"tandem:admission:{REPLICA}:leases"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def workers(
    url: str,
    n: int,
    limit: int,
    *,
    order: str = "fifo",
    lease_ttl_s: float = 10.0,
    prefix_hold_s: float | None = None,
) -> AsyncIterator[list[SharedAdmission]]:
    """`n` admissions for one replica, each with its own connection, as `n` workers would."""
    admissions = [
        SharedAdmission(
            REPLICA, FixedLimit(limit), url=url, order=order, lease_ttl_s=lease_ttl_s,
            prefix_hold_s=prefix_hold_s,
        )
        for _ in range(n)
    ]  # fmt: skip
    async with contextlib.AsyncExitStack() as stack:
        for admission in admissions:
            await stack.enter_async_context(admission)
        yield admissions


async def until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll `predicate` until true; fail the test when it never becomes true."""
    async with asyncio.timeout(timeout_s):
        # The state lives in Redis (or another task): there is no event to wait on.
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_four_workers_never_exceed_the_shared_limit(redis_server: RedisServer) -> None:
    in_flight = 0
    most = 0
    calls = 0

    async def session(admission: SharedAdmission, session_id: str) -> None:
        nonlocal in_flight, most, calls
        for i in range(4):
            slot = await admission.acquire(session_id)
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.002 * (i + 1))
            in_flight -= 1
            slot.release(Outcome("ok"))
            calls += 1

    async with workers(redis_server.url, 4, limit=3) as admissions:
        await asyncio.gather(
            *(
                session(admission, f"w{w}-s{s}")
                for w, admission in enumerate(admissions)
                for s in range(6)
            )
        )
        await until(lambda: _zcard(redis_server.url, LEASES_KEY, 0))
    assert calls == 4 * 6 * 4
    assert most == 3  # the budget is used, and never exceeded across the four workers


async def _zcard(url: str, key: str, expected: int) -> bool:
    client = aioredis.from_url(url)
    try:
        return int(await client.zcard(key)) == expected
    finally:
        await client.aclose()


async def _queue_in_order(
    admissions: list[SharedAdmission], url: str, calls: list[tuple[int, str]]
) -> tuple[list[str], list[asyncio.Task[None]]]:
    """Queue `calls` (worker index, session) one after the other; each, once admitted,
    records its session and gives the slot back."""
    order: list[str] = []

    async def call(admission: SharedAdmission, session_id: str) -> None:
        slot = await admission.acquire(session_id)
        order.append(session_id)
        slot.release(Outcome("ok"))

    tasks = []
    for queued, (worker, session_id) in enumerate(calls, start=1):
        tasks.append(asyncio.create_task(call(admissions[worker], session_id)))
        await until(lambda n=queued: _zcard(url, WAITING_KEY, n))  # type: ignore[misc]
    return order, tasks


async def test_fifo_order_holds_across_workers(redis_server: RedisServer) -> None:
    async with workers(redis_server.url, 4, limit=1) as admissions:
        holder = await admissions[0].acquire("holder")
        calls = [(3, "a"), (1, "b"), (2, "c"), (0, "d"), (3, "e"), (1, "f")]
        order, tasks = await _queue_in_order(admissions, redis_server.url, calls)
        holder.release(Outcome("ok"))
        await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "d", "e", "f"]


async def test_las_order_lets_the_light_session_overtake_across_workers(
    redis_server: RedisServer,
) -> None:
    async with workers(redis_server.url, 3, limit=1, order="las") as admissions:
        heavy = await admissions[0].acquire("heavy")
        await asyncio.sleep(0.5)  # half a slot-second of service for "heavy"
        heavy.release(Outcome("ok"))
        await until(lambda: _zcard(redis_server.url, LEASES_KEY, 0))
        holder = await admissions[0].acquire("holder")
        order, tasks = await _queue_in_order(
            admissions, redis_server.url, [(1, "heavy"), (2, "light")]
        )
        holder.release(Outcome("ok"))
        await asyncio.gather(*tasks)
    assert order == ["light", "heavy"]


@contextlib.asynccontextmanager
async def holding(url: str, limit: int, hold_s: float) -> AsyncIterator[SharedAdmission]:
    """One worker's LAS admission with a prefix hold of `hold_s`, as the router builds it."""
    async with workers(url, 1, limit, order="las", prefix_hold_s=hold_s) as (admission,):
        yield admission


async def test_siblings_wait_in_their_worker_until_the_prefix_leader_has_its_first_token(
    redis_server: RedisServer,
) -> None:
    async with holding(redis_server.url, limit=8, hold_s=30.0) as admission:
        leader = await admission.acquire("s")
        siblings = [asyncio.create_task(admission.acquire("s")) for _ in range(3)]
        other = await asyncio.wait_for(admission.acquire("t"), 5)  # another session: no hold
        await asyncio.sleep(0.2)
        assert not any(task.done() for task in siblings)
        assert (admission.prefix_held, admission.queued) == (3, 3)
        assert await _zcard(redis_server.url, WAITING_KEY, 0)  # none sent to the shared queue
        leader.first_token()
        granted = await asyncio.wait_for(asyncio.gather(*siblings), 5)
        assert admission.queued == 0
        later = await asyncio.wait_for(admission.acquire("s"), 5)  # prefix hot: no hold
        assert admission.prefix_held == 3
        for slot in [leader, other, later, *granted]:
            slot.release(Outcome("ok"))
        await until(lambda: _zcard(redis_server.url, LEASES_KEY, 0))


async def test_a_hold_ends_after_prefix_hold_s_or_when_the_leader_ends_without_a_token(
    redis_server: RedisServer,
) -> None:
    async with holding(redis_server.url, limit=4, hold_s=0.3) as admission:
        loop = asyncio.get_running_loop()
        leader = await admission.acquire("s")
        started = loop.time()
        sibling = await asyncio.wait_for(admission.acquire("s"), 5)
        assert 0.25 <= loop.time() - started < 3.0  # no first token: held for hold_s
        sibling.release(Outcome("ok"))
        leader.release(Outcome("ok"))
    async with holding(redis_server.url, limit=4, hold_s=30.0) as admission:
        leader = await admission.acquire("s")
        waiting = asyncio.create_task(admission.acquire("s"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        leader.release(Outcome("error"))  # ended before its first token
        slot = await asyncio.wait_for(waiting, 5)
        slot.release(Outcome("ok"))


async def test_a_caller_cancelled_while_held_sends_nothing(redis_server: RedisServer) -> None:
    async with holding(redis_server.url, limit=4, hold_s=30.0) as admission:
        leader = await admission.acquire("s")
        held = asyncio.create_task(admission.acquire("s"))
        await asyncio.sleep(0.1)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert admission.queued == 0
        leader.first_token()
        leader.release(Outcome("ok"))
        await until(lambda: _zcard(redis_server.url, LEASES_KEY, 0))
        assert await _zcard(redis_server.url, WAITING_KEY, 0)


async def test_a_session_whose_prefix_is_hot_goes_ahead_of_the_shared_queue(
    redis_server: RedisServer,
) -> None:
    async with workers(redis_server.url, 2, 4, order="las", prefix_hold_s=30) as admissions:
        mine, theirs = admissions
        leader = await mine.acquire("s")
        leader.first_token()
        await asyncio.sleep(0.3)  # "s" attains service: LAS alone would rank "light" first
        holders = [await theirs.acquire(f"h{i}") for i in range(3)]  # the replica is full
        order: list[str] = []

        async def call(admission: SharedAdmission, session_id: str) -> None:
            slot = await admission.acquire(session_id)
            order.append(session_id)
            slot.release(Outcome("ok"))

        light = asyncio.create_task(call(theirs, "light"))
        await until(lambda: _zcard(redis_server.url, WAITING_KEY, 1))
        sibling = asyncio.create_task(call(mine, "s"))
        await until(lambda: _zcard(redis_server.url, WAITING_KEY, 2))
        holders[0].release(Outcome("ok"))
        await asyncio.wait_for(asyncio.gather(light, sibling), 5)
        for slot in [leader, *holders[1:]]:
            slot.release(Outcome("ok"))
    assert order == ["s", "light"]


async def test_a_router_on_the_shared_budget_sends_siblings_after_the_leaders_first_token(
    redis_server: RedisServer,
) -> None:
    # Sent together, as a plan's coders are: the first leads while its ticket is still on
    # its way to Redis, and the others wait for its first token.
    sent = await sibling_send_times(
        lambda replica: Router(
            {"coder": [replica]}, limit="fixed-8", order="las", admission_url=redis_server.url
        )
    )
    assert len(sent) == 3 and sent[0] < 0.4
    assert all(0.45 <= t < 3.0 for t in sent[1:]), sent  # held until the prefix was computed


class _Projecting(FixedLimit):
    """A fixed limit that records what a projecting limit is told."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.in_flight: list[tuple[float, str]] = []
        self.caps: dict[str, int] = {}

    def set_in_flight(self, calls: list[tuple[float, str]]) -> None:
        self.in_flight = list(calls)

    def note_output_cap(self, kind: str, max_tokens: int) -> None:
        self.caps[kind] = max(max_tokens, self.caps.get(kind, 0))


async def test_the_leaders_limit_sees_every_workers_calls_with_their_stages_and_caps(
    redis_server: RedisServer,
) -> None:
    limits = [_Projecting(8), _Projecting(8)]
    admissions = [SharedAdmission(REPLICA, lim, url=redis_server.url) for lim in limits]
    async with contextlib.AsyncExitStack() as stack:
        for admission in admissions:  # the first to tick leads
            await stack.enter_async_context(admission)
        leader, other = admissions
        assert leader.leader and not other.leader

        async def call(admission: SharedAdmission, stage: str, cap: int) -> Slot:
            token = current_call.set(CallInfo("s", stage, "coder"))
            try:
                return await admission.acquire("s", max_tokens=cap)
            finally:
                current_call.reset(token)

        slots = [
            await call(other, "review", 777),
            await call(other, "review", 700),
            await call(leader, "plan", 555),
        ]
        await asyncio.sleep(1.0)  # a call's age grows while it holds its slot
        await leader._tick()  # what its loop does every second
        leader.on_snapshot(ServerSnapshot(taken_at=asyncio.get_running_loop().time()))
        other.on_snapshot(ServerSnapshot(taken_at=asyncio.get_running_loop().time()))
        for slot in slots:
            slot.release(Outcome("ok"))
    assert sorted(kind for _, kind in limits[0].in_flight) == ["plan", "review", "review"]
    assert all(0.9 <= age < 10.0 for age, _ in limits[0].in_flight), limits[0].in_flight
    assert limits[0].caps == {"review": 777, "plan": 555}
    assert limits[1].in_flight == [] and limits[1].caps == {}  # only the leader's limit acts


async def test_a_cancelled_waiter_leaves_the_shared_queue(redis_server: RedisServer) -> None:
    async with workers(redis_server.url, 2, limit=1) as (first, second):
        holder = await first.acquire("holder")
        waiting = asyncio.create_task(second.acquire("gone"))
        await until(lambda: _zcard(redis_server.url, WAITING_KEY, 1))
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await until(lambda: _zcard(redis_server.url, WAITING_KEY, 0))
        holder.release(Outcome("ok"))
        slot = await asyncio.wait_for(first.acquire("next"), 5)
        slot.release(Outcome("ok"))
        await until(lambda: _zcard(redis_server.url, LEASES_KEY, 0))


async def test_a_killed_workers_slot_comes_back_after_its_lease_ttl(
    redis_server: RedisServer,
) -> None:
    ttl_s = 1.0
    held = _spawn_worker(redis_server.url, "hold", "--limit", "1", "--ttl-s", str(ttl_s))
    try:
        assert held.stdout is not None
        line = await asyncio.to_thread(held.stdout.readline)
        assert line.strip() == "held"
        async with workers(redis_server.url, 1, limit=1, lease_ttl_s=ttl_s) as (admission,):
            assert admission.in_flight == 1  # the other process's slot
            held.send_signal(signal.SIGKILL)
            held.wait(10)
            slot = await asyncio.wait_for(admission.acquire("survivor"), 10 * ttl_s)
            assert slot.session_id == "survivor"
            assert admission.shared.in_flight == 1
            slot.release(Outcome("ok"))
    finally:
        if held.poll() is None:
            held.kill()
            held.wait(10)


def _spawn_worker(url: str, mode: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.admission_worker", mode, "--url", url, *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )


def test_four_processes_share_one_budget(redis_server: RedisServer) -> None:
    procs = [
        _spawn_worker(
            redis_server.url,
            "calls",
            "--limit",
            "3",
            "--sessions",
            "5",
            "--calls",
            "4",
            "--tag",
            f"p{i}",
            "--start-delay-s",
            "0.5",
        )
        for i in range(4)
    ]
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["calls"] for r in reports) == 4 * 5 * 4
    assert max(r["max_in_flight"] for r in reports) <= 3


async def test_redis_lost_mid_run_falls_back_locally_and_rejoins(
    redis_server: RedisServer,
) -> None:
    """Fixed limit 4 over 2 workers: 2 each while Redis is away, 4 shared once it is back.

    Worker 0 holds two shared slots into the outage: they fill its fallback limit, so it
    grants nothing locally until they are given back, and then resumes.
    """
    outcomes: list[str] = []
    held = [0, 0]  # slots each worker's calls hold, shared or local
    local_grants = [0, 0]
    held_at_local_grant: list[tuple[int, int]] = []  # (worker, slots it held then)
    phase = {"name": "shared"}
    calls_in: dict[str, int] = {"shared": 0, "degraded": 0, "rejoined": 0}

    async def session(index: int, admission: SharedAdmission, session_id: str) -> None:
        stop = asyncio.get_running_loop().time() + 60
        while phase["name"] != "done" and asyncio.get_running_loop().time() < stop:
            slot: Slot = await admission.acquire(session_id)
            held[index] += 1
            if admission.degraded and admission.is_local(slot):
                local_grants[index] += 1
                held_at_local_grant.append((index, held[index]))
            await asyncio.sleep(0.01)
            held[index] -= 1
            slot.release(Outcome("ok"))
            calls_in[phase["name"]] = calls_in.get(phase["name"], 0) + 1
        outcomes.append(session_id)

    async with workers(redis_server.url, 2, limit=4, lease_ttl_s=1.5) as admissions:
        changes: list[bool] = []
        for admission in admissions:
            admission.on_degraded = changes.append
        tasks = [
            asyncio.create_task(session(i, admission, f"w{i}-s{s}"))
            for i, admission in enumerate(admissions)
            for s in range(5)
        ]
        await asyncio.sleep(0.3)
        assert calls_in["shared"] > 0
        holders = [await admissions[0].acquire(f"w0-long{i}") for i in range(2)]
        held[0] += 2
        assert not any(admissions[0].is_local(slot) for slot in holders)

        redis_server.stop()
        await until(_all(admissions, degraded=True))
        phase["name"] = "degraded"
        await asyncio.sleep(0.5)
        assert [a.limit for a in admissions] == [2, 2]  # 4 // 2 last known workers
        assert local_grants[0] == 0  # its two shared slots fill worker 0's limit of 2
        assert local_grants[1] > 0
        for slot in holders:
            held[0] -= 1
            slot.release(Outcome("ok"))
        await until(lambda: _true(local_grants[0] > 0))  # the released slots wake its waiters

        redis_server.start()
        await until(_all(admissions, degraded=False))
        phase["name"] = "rejoined"
        await until(lambda: _leases_in_use(redis_server.url))
        # A call counts in the phase it ends in: let one end on the shared budget again.
        await until(lambda: _true(calls_in["rejoined"] > 0))
        phase["name"] = "done"
        await asyncio.gather(*tasks)
        assert [a.limit for a in admissions] == [4, 4]
        assert [a.stats()["fallbacks"] for a in admissions] == [1, 1]
        assert [a.stats()["rejoins"] for a in admissions] == [1, 1]
    assert sorted(outcomes) == sorted(f"w{i}-s{s}" for i in range(2) for s in range(5))
    assert calls_in["degraded"] > 0 and calls_in["rejoined"] > 0
    # Every local grant left its worker within the fallback limit, shared slots counted.
    assert held_at_local_grant
    assert max(n for _, n in held_at_local_grant) <= 2
    assert changes == [True, True, False, False]


async def _true(value: bool) -> bool:
    return value


def _all(admissions: list[SharedAdmission], *, degraded: bool) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all(a.degraded == degraded for a in admissions)

    return check


async def _leases_in_use(url: str) -> bool:
    client = aioredis.from_url(url)
    try:
        return int(await client.zcard(LEASES_KEY)) > 0
    finally:
        await client.aclose()


async def test_unreachable_redis_at_start_names_the_url_without_the_password() -> None:
    url = f"redis://tandem:s3cret@127.0.0.1:{free_port()}/0"
    admission = SharedAdmission(REPLICA, FixedLimit(2), url=url)
    with pytest.raises(AdmissionStoreUnavailable) as info:
        await admission.start()
    message = str(info.value)
    assert "redis://tandem:***@127.0.0.1:" in message
    assert "s3cret" not in message


async def _scripts_run(url: str) -> int:
    client = aioredis.from_url(url, decode_responses=True)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(
        int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval")
    )


async def test_calls_arriving_together_share_one_round_trip(redis_server: RedisServer) -> None:
    async with workers(redis_server.url, 1, limit=50) as (admission,):
        before = await _scripts_run(redis_server.url)
        slots = await asyncio.gather(*(admission.acquire(f"s{i}") for i in range(50)))
        sent = await _scripts_run(redis_server.url) - before
        assert admission.shared.in_flight == 50
        for slot in slots:
            slot.release(Outcome("ok"))
        await until(lambda: _zcard(redis_server.url, LEASES_KEY, 0))
    # One batch for the 50 enqueues, granted in its reply; the loop's tick may add one.
    assert sent <= 2
