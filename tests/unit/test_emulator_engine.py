"""Scheduler, KV cache, prefix cache, abort and determinism of the emulator's engine."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from serving.clock import run
from serving.emulator.engine import (
    CHARS_PER_TOKEN,
    Engine,
    RequestRecord,
    count_tokens,
    next_step_start_s,
)
from serving.emulator.profiles import PROFILES, Profile

SMALL_KV = dataclasses.replace(
    PROFILES["cpu-tiny"], name="small-kv", kv_cache_tokens=4096, max_model_len=2048
)


def _prompt(tag: str, tokens: int) -> str:
    return (f"{tag}: " + "x" * tokens * CHARS_PER_TOKEN)[: tokens * CHARS_PER_TOKEN]


async def _serve(
    profile: Profile,
    requests: list[tuple[str, int]],
    *,
    gap_s: float = 0.0,
    max_coalesced_steps: int | None = None,
) -> Engine:
    engine = Engine(profile, max_coalesced_steps=max_coalesced_steps)
    handles = []
    for i, (text, out) in enumerate(requests):
        handles.append(engine.submit(text, out, session_id=f"s{i % 3}", stage="code"))
        if gap_s:
            await asyncio.sleep(gap_s)
    await asyncio.gather(*(h.result() for h in handles))
    await engine.aclose()
    return engine


def test_prompt_tokens_are_about_four_characters_each() -> None:
    assert count_tokens("a" * 400) == 100
    assert count_tokens("a" * 401) == 101
    assert count_tokens("") == 1


def test_kv_overflow_preempts_and_a_fitting_run_does_not() -> None:
    # 8 x (400 + 300) tokens need 5,600 of 4,096 cache tokens.
    over = [(_prompt(f"r{i}", 400), 300) for i in range(8)]
    engine = run(_serve(SMALL_KV, over), virtual=True)
    assert engine.stats.preemptions > 0
    assert sum(r.preemptions for r in engine.records) == engine.stats.preemptions
    assert all(r.finish_reason == "stop" and r.generated_tokens == 300 for r in engine.records)
    assert engine.pool.num_used == 0

    fits = [(_prompt(f"r{i}", 400), 300) for i in range(5)]  # 3,500 tokens
    engine = run(_serve(SMALL_KV, fits), virtual=True)
    assert engine.stats.preemptions == 0


def test_preemption_takes_the_most_recently_admitted_request() -> None:
    over = [(_prompt(f"r{i}", 400), 300) for i in range(8)]
    engine = run(_serve(SMALL_KV, over), virtual=True)
    assert engine.records[0].preemptions == 0  # the oldest keeps running
    assert engine.records[-1].preemptions > 0


def test_shared_prefix_hits_the_prefix_cache() -> None:
    shared = "system prompt and plan " * 200  # ~1,150 tokens shared
    requests = [(shared + f"file {i}: write it", 20) for i in range(6)]
    engine = run(_serve(PROFILES["h100-coder-8b"], requests, gap_s=1.0), virtual=True)
    first, *rest = engine.records
    assert first.cached_tokens == 0
    assert all(r.cached_tokens >= 1100 for r in rest)
    assert engine.stats.prefix_cache_hits == sum(r.cached_tokens for r in rest)
    assert engine.stats.prefix_cache_queries == sum(r.prompt_tokens for r in engine.records)
    # The cached prefix skips its prefill: later requests answer faster.
    ttft = [r.first_token_s - r.arrival_s for r in engine.records]  # type: ignore[operator]
    assert max(ttft[1:]) < 0.5 * ttft[0]


def test_distinct_prompts_do_not_hit() -> None:
    requests = [(_prompt(f"distinct {i}", 500), 10) for i in range(4)]
    engine = run(_serve(PROFILES["h100-coder-8b"], requests, gap_s=1.0), virtual=True)
    assert engine.stats.prefix_cache_hits == 0


def _records(engine: Engine) -> list[RequestRecord]:
    return [dataclasses.replace(r) for r in engine.records]


def _workload() -> list[tuple[str, int]]:
    shared = "shared plan " * 300
    return [
        (shared + _prompt(f"w{i}", 100 + 37 * (i % 11)), 20 + (i * 13) % 200) for i in range(60)
    ]


def test_same_requests_give_identical_records() -> None:
    a = run(_serve(SMALL_KV, _workload(), gap_s=0.01), virtual=True)
    b = run(_serve(SMALL_KV, _workload(), gap_s=0.01), virtual=True)
    assert _records(a) == _records(b)
    assert a.busy_intervals == b.busy_intervals
    assert a.stats.preemptions > 0  # the workload exercises preemption too


def test_coalesced_steps_give_the_same_schedule_as_single_steps() -> None:
    bulk = run(_serve(SMALL_KV, _workload(), gap_s=0.013), virtual=True)
    single = run(_serve(SMALL_KV, _workload(), gap_s=0.013, max_coalesced_steps=1), virtual=True)
    assert single.steps == bulk.steps
    for x, y in zip(bulk.records, single.records, strict=True):
        assert (x.cached_tokens, x.preemptions, x.generated_tokens) == (
            y.cached_tokens,
            y.preemptions,
            y.generated_tokens,
        )
        assert abs(x.first_token_s - y.first_token_s) < 1e-4  # type: ignore[operator]
        assert abs(x.finish_s - y.finish_s) < 1e-4  # type: ignore[operator]


def test_records_and_busy_intervals_describe_the_run() -> None:
    requests = [(_prompt("a", 100), 50), (_prompt("b", 100), 50)]

    async def scenario() -> Engine:
        engine = Engine(PROFILES["cpu-tiny"])
        await engine.submit(*requests[0], session_id="s1", stage="plan").result()
        await asyncio.sleep(10.0)  # idle gap
        await engine.submit(*requests[1], session_id="s2", stage="code").result()
        await engine.aclose()
        return engine

    engine = run(scenario(), virtual=True)
    a, b = engine.records
    assert (a.session_id, a.stage, b.session_id, b.stage) == ("s1", "plan", "s2", "code")
    for r in (a, b):
        assert r.arrival_s <= r.first_scheduled_s <= r.first_token_s <= r.finish_s  # type: ignore[operator]
        assert (r.prompt_tokens, r.output_tokens, r.generated_tokens) == (100, 50, 50)
    assert len(engine.busy_intervals) == 2
    (s1, e1), (s2, e2) = engine.busy_intervals
    assert (s1, e1) == (a.first_scheduled_s, a.finish_s)
    assert (s2, e2) == (b.first_scheduled_s, b.finish_s)
    assert s2 - e1 >= 10.0


def test_abort_frees_the_kv_cache() -> None:
    async def scenario() -> tuple[int, int, int, Engine]:
        engine = Engine(PROFILES["h100-coder-8b"])
        keep = engine.submit(_prompt("keep", 1000), 2000)
        drop = engine.submit(_prompt("drop", 3000), 2000)
        await asyncio.sleep(1.0)
        both = engine.pool.num_used
        drop.abort()
        after = engine.pool.num_used
        await asyncio.sleep(0.5)
        running = engine.num_running
        await keep.result()
        await engine.aclose()
        return both, after, running, engine

    both, after, running, engine = run(scenario(), virtual=True)
    assert both - after >= (3000 + 1) // 16  # the aborted request's blocks are free again
    assert running == 1
    dropped = engine.records[1]
    assert dropped.finish_reason == "abort"
    assert engine.stats.request_success == {"stop": 1, "abort": 1}
    assert engine.pool.num_used == 0


def test_abort_of_a_waiting_request_removes_it() -> None:
    async def scenario() -> Engine:
        engine = Engine(dataclasses.replace(PROFILES["cpu-tiny"], max_num_seqs=1))
        first = engine.submit(_prompt("first", 10), 100)
        queued = engine.submit(_prompt("queued", 10), 100)
        await asyncio.sleep(0.05)
        assert engine.num_waiting == 1
        queued.abort()
        assert engine.num_waiting == 0
        await first.result()
        await engine.aclose()
        return engine

    engine = run(scenario(), virtual=True)
    assert engine.records[1].first_scheduled_s is None


def test_token_waits_see_every_token() -> None:
    async def scenario() -> list[int]:
        engine = Engine(PROFILES["cpu-tiny"], max_coalesced_steps=1)
        handle = engine.submit(_prompt("stream", 20), 8)
        seen, counts = 0, []
        while not handle.finished:
            seen = await handle.wait_tokens(seen)
            counts.append(seen)
        await engine.aclose()
        return counts

    assert run(scenario(), virtual=True) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_large_benchmark_simulates_in_seconds() -> None:
    # 16 sessions x 25 files with multi-thousand-token prompts sharing a per-session prefix.
    async def scenario() -> Engine:
        engine = Engine(PROFILES["h100-coder-8b"])

        async def session(s: int) -> None:
            plan = f"session {s} plan " * 1000
            for wave in range(5):
                await asyncio.gather(
                    *(
                        engine.submit(plan + _prompt(f"f{f}", 500), 1500 + 37 * f).result()
                        for f in range(wave * 5, wave * 5 + 5)
                    )
                )

        await asyncio.gather(*(session(s) for s in range(16)))
        await engine.aclose()
        return engine

    start = time.perf_counter()
    engine = run(scenario(), virtual=True)
    assert len(engine.records) == 400
    assert engine.stats.generation_tokens > 600_000
    assert time.perf_counter() - start < 10.0


def test_streamed_tokens_come_first_alone_then_by_the_stream_interval() -> None:
    async def scenario(**kwargs: int) -> tuple[list[int], RequestRecord]:
        engine = Engine(PROFILES["cpu-tiny"], **kwargs)
        handle = engine.submit(_prompt("stream", 20), 600)
        seen, counts = 0, []
        while not handle.finished:
            seen = await handle.wait_tokens(seen)
            counts.append(seen)
        await engine.aclose()
        return counts, handle.record

    every, every_record = run(scenario(max_coalesced_steps=1), virtual=True)
    assert every == list(range(1, 601))  # a real clock's default: one token per event
    by_256, record_256 = run(
        scenario(max_coalesced_steps=1, stream_interval_tokens=256), virtual=True
    )
    assert by_256 == [1, 257, 513, 600]
    bulk, bulk_record = run(scenario(), virtual=True)  # one coalesced sleep: one event
    assert bulk == [1, 600]
    assert every_record == record_256  # delivery changes, never the schedule
    assert bulk_record.finish_s == pytest.approx(every_record.finish_s)


def test_steps_keep_absolute_deadlines_and_resynchronise_when_far_behind() -> None:
    step = 0.0046
    assert next_step_start_s(10.0, None, step) == 10.0  # after idle: now
    # Woken 0.7 ms late: the step still starts at the last deadline, so it ends on time.
    assert next_step_start_s(10.0007, 10.0, step) == 10.0
    # Behind by a whole step or more: start now, no burst of short steps to catch up.
    assert next_step_start_s(10.005, 10.0, step) == 10.005
    assert next_step_start_s(12.0, 10.0, step) == 12.0
    # 1,000 steps, each woken 0.7 ms late: the mean gap stays the profile's step.
    end: float | None = None
    now = 0.0
    for _ in range(1000):
        start = next_step_start_s(now, end, step)
        end = start + step
        now = end + 0.0007
    assert end is not None and abs(end / 1000 - step) < 1e-9
