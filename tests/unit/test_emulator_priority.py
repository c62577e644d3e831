"""vLLM V1's priority scheduling policy in the emulator's engine and server.

vLLM (`--scheduling-policy priority`): the waiting queue is ordered by `(priority, arrival)`,
lower first; when a running request cannot get KV blocks, the running request with the
largest `(priority, arrival)` is preempted (under `fcfs`: the most recently admitted one);
a waiting request never preempts a running one; a non-zero priority under `fcfs` is an error.
"""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from serving.clock import run
from serving.emulator.app import create_app
from serving.emulator.engine import CHARS_PER_TOKEN, Engine, RequestHandle
from serving.emulator.profiles import PROFILES

SMALL_KV = dataclasses.replace(
    PROFILES["cpu-tiny"], name="small-kv", kv_cache_tokens=4096, max_model_len=2048
)
ONE_SEQ = dataclasses.replace(PROFILES["cpu-tiny"], name="one-seq", max_num_seqs=1)


def _prompt(tag: str, tokens: int) -> str:
    return (f"{tag}: " + "x" * tokens * CHARS_PER_TOKEN)[: tokens * CHARS_PER_TOKEN]


async def _finish(engine: Engine, handles: list[RequestHandle]) -> None:
    await asyncio.gather(*(h.result() for h in handles))
    await engine.aclose()


def test_waiting_requests_are_admitted_by_priority_then_arrival() -> None:
    async def go() -> list[str]:
        engine = Engine(ONE_SEQ, scheduling_policy="priority")
        # The first request takes the only slot; the rest queue behind it.
        handles = [engine.submit(_prompt("busy", 50), 50, request_id="busy")]
        for name, priority in (("low", 5), ("high-a", 0), ("mid", 2), ("high-b", 0)):
            handles.append(engine.submit(_prompt(name, 50), 5, request_id=name, priority=priority))
        await _finish(engine, handles)
        records = sorted(engine.records, key=lambda r: r.first_scheduled_s or 0.0)
        return [r.request_id for r in records]

    assert run(go(), virtual=True) == ["busy", "high-a", "high-b", "mid", "low"]


def test_fcfs_admits_in_arrival_order_and_refuses_a_priority() -> None:
    async def go() -> list[str]:
        engine = Engine(ONE_SEQ)
        handles = [engine.submit(_prompt(name, 50), 5, request_id=name) for name in ("a", "b", "c")]
        with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
            engine.submit(_prompt("d", 50), 5, priority=1)
        await _finish(engine, handles)
        records = sorted(engine.records, key=lambda r: r.first_scheduled_s or 0.0)
        return [r.request_id for r in records]

    assert run(go(), virtual=True) == ["a", "b", "c"]


def _kv_bound(policy: str) -> Engine:
    """Eight requests that need 5,600 of 4,096 cache tokens; the oldest has the lowest rank."""

    async def go() -> Engine:
        engine = Engine(SMALL_KV, scheduling_policy=policy)  # type: ignore[arg-type]
        handles = []
        for i in range(8):
            # Under priority, the first-arrived request is the least important one.
            priority = (8 - i) if policy == "priority" else 0
            handles.append(
                engine.submit(_prompt(f"r{i}", 400), 300, request_id=f"r{i}", priority=priority)
            )
        await _finish(engine, handles)
        return engine

    return run(go(), virtual=True)


def test_kv_shortage_preempts_the_largest_priority_value() -> None:
    engine = _kv_bound("priority")
    by_id = {r.request_id: r for r in engine.records}
    assert engine.stats.preemptions > 0
    # The most important request (r7, priority 1) is never preempted; preemptions fall on
    # the least important ones, although they were admitted first.
    assert by_id["r7"].preemptions == 0
    assert by_id["r0"].preemptions > 0
    assert all(r.finish_reason == "stop" and r.generated_tokens == 300 for r in engine.records)
    assert engine.pool.num_used == 0


def test_kv_shortage_under_fcfs_preempts_the_most_recently_admitted() -> None:
    engine = _kv_bound("fcfs")
    by_id = {r.request_id: r for r in engine.records}
    assert by_id["r0"].preemptions == 0
    assert engine.records[-1].preemptions > 0


def test_priority_finishes_important_requests_first_under_kv_pressure() -> None:
    engine = _kv_bound("priority")
    finish = {r.request_id: r.finish_s or 0.0 for r in engine.records}
    assert finish["r7"] < finish["r0"]
    fcfs = {r.request_id: r.finish_s or 0.0 for r in _kv_bound("fcfs").records}
    assert fcfs["r0"] < fcfs["r7"]


def test_a_waiting_request_never_preempts_a_running_one() -> None:
    async def go() -> Engine:
        engine = Engine(ONE_SEQ, scheduling_policy="priority")
        busy = engine.submit(_prompt("busy", 50), 40, request_id="busy", priority=9)
        await asyncio.sleep(0.05)  # busy is running
        urgent = engine.submit(_prompt("urgent", 50), 5, request_id="urgent", priority=-3)
        await _finish(engine, [busy, urgent])
        return engine

    engine = run(go(), virtual=True)
    busy, urgent = engine.records
    assert busy.preemptions == 0
    assert (urgent.first_scheduled_s or 0.0) >= (busy.finish_s or 0.0)


def test_server_takes_priority_only_under_the_priority_policy() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4,
        "priority": 3,
    }

    async def post(policy: str) -> httpx.Response:
        app = create_app("cpu-tiny", served_model_name="m", scheduling_policy=policy)  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            answer = await client.post("/v1/chat/completions", json=body)
        await app.state.engine.aclose()
        return answer

    refused = run(post("fcfs"), virtual=True)
    assert refused.status_code == 400
    assert "Priority scheduling is not enabled" in refused.text
    served = run(post("priority"), virtual=True)
    assert served.status_code == 200, served.text
    bad = {**body, "priority": "high"}

    async def post_bad() -> httpx.Response:
        app = create_app("cpu-tiny", served_model_name="m", scheduling_policy="priority")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            answer = await client.post("/v1/chat/completions", json=bad)
        await app.state.engine.aclose()
        return answer

    assert run(post_bad(), virtual=True).status_code == 400
