"""Recording a run's LLM calls and replaying them on emulated engines (bench/trace.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest

from bench.policies import get_policy
from bench.runner import _run_with_router
from bench.trace import CallRecord, RecordingTransport, phases, replay_makespan, usage_of
from bench.workloads import TokenSpec, Workload
from graph.runtime import emulator_apps, in_process_endpoints
from routing.calls import Role
from serving.clock import run
from serving.emulator.profiles import get_profile, solo_latency_s

PROFILES: dict[Role, str] = {"reasoning": "h100-nvl-reasoning-32b", "coder": "h100-nvl-coder-8b"}


def _call(session: str, start: float, end: float, role: Role = "coder") -> CallRecord:
    return CallRecord(role, session, "code", start, end, 100, 50)


def test_phases_split_where_a_call_waits_for_all_earlier_ones() -> None:
    calls = [
        _call("s", 0.0, 1.0, "reasoning"),
        _call("s", 1.2, 3.0),
        _call("s", 1.3, 2.0),
        _call("s", 3.5, 4.0, "reasoning"),
    ]
    split = phases(calls)
    assert [len(p.calls) for p in split] == [1, 2, 1]
    assert abs(split[1].gap_s - 0.2) < 1e-9 and abs(split[2].gap_s - 0.5) < 1e-9
    assert [round(off, 6) for off, _ in split[1].calls] == [0.0, 0.1]


def test_usage_is_read_from_json_and_from_the_last_sse_event() -> None:
    assert usage_of(b'{"usage": {"prompt_tokens": 7, "completion_tokens": 3}}') == (7, 3)
    sse = (
        b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage_of(sse) == (9, 4)
    assert usage_of(b"data: [DONE]\n\n") is None


def test_a_lone_call_replays_in_its_solo_latency() -> None:
    profile = get_profile("h100-nvl-coder-8b")
    calls = [CallRecord("coder", "s", "code", 5.0, 9.0, 400, 300)]
    took = run(replay_makespan(calls, {"coder": profile}), virtual=True)
    assert abs(took - solo_latency_s(profile, 400, 300)) < 1e-3


def test_replaying_an_emulated_run_gives_back_its_makespan() -> None:
    """Record the real graph on the emulator, replay the calls: the makespans agree.

    The replay has no prefix-cache hits (prompts are unique), so it may only be slower, and
    only by the prefill the cache saved.
    """
    workload = Workload(
        "trace",
        sessions=2,
        tasks=3,
        tokens=TokenSpec(max_tokens={"plan": 512, "code": 256, "review": 256}),
    )
    policy = dataclasses.replace(get_policy("fixed-64+coder"), name="trace")

    async def main() -> tuple[float, list[CallRecord], float]:
        models: dict[Role, str] = {role: f"tandem-{role}" for role in PROFILES}
        apps = emulator_apps(PROFILES, models, 0)
        endpoints = in_process_endpoints(apps, models)
        recorders: list[RecordingTransport] = []
        for role, replicas in endpoints.items():
            for i, replica in enumerate(replicas):
                assert replica.transport is not None
                recorder = RecordingTransport(role, replica.transport)
                recorders.append(recorder)
                replicas[i] = dataclasses.replace(replica, transport=recorder)
        policy_run = await _run_with_router(workload, policy, endpoints, None)
        for app in apps.values():
            await app.state.engine.aclose()
        calls = [c for r in recorders for c in r.records]
        profiles = {role: get_profile(name) for role, name in PROFILES.items()}
        return policy_run.makespan_s, calls, await replay_makespan(calls, profiles)

    makespan, calls, replayed = run(main(), virtual=True)
    assert {c.stage for c in calls} >= {"plan", "code", "review"}
    assert len({c.session_id for c in calls}) == 2
    assert makespan * 0.98 <= replayed <= makespan * 1.10, (makespan, replayed)


def test_guided_calls_pay_the_guided_cost_and_one_server_batches_every_role() -> None:
    profile = dataclasses.replace(get_profile("h100-nvl-coder-8b"), guided_seq_s=2e-3)
    plain = CallRecord("coder", "s", "code", 0.0, 1.0, 400, 300)
    guided = dataclasses.replace(plain, guided=True)
    took_plain = run(replay_makespan([plain], {"coder": profile}), virtual=True)
    took_guided = run(replay_makespan([guided], {"coder": profile}), virtual=True)
    # Every decode step after the prefill step carries one guided sequence.
    assert abs((took_guided - took_plain) - 299 * 2e-3) < 1e-6

    both = [
        CallRecord("reasoning", "a", "plan", 0.0, 1.0, 400, 300),
        CallRecord("coder", "b", "code", 0.0, 1.0, 400, 300),
    ]
    profiles: dict[Role, object] = {"reasoning": profile, "coder": profile}
    apart = run(replay_makespan(both, profiles), virtual=True)  # type: ignore[arg-type]
    together = run(
        replay_makespan(both, profiles, one_server=True),  # type: ignore[arg-type]
        virtual=True,
    )
    assert abs(apart - took_plain) < 1e-6
    # On one server both calls share every step: each step holds two sequences.
    assert together > apart + 299 * profile.decode_seq_s * 0.9


def test_the_recorder_marks_calls_that_asked_for_structured_output() -> None:
    import httpx

    sse = (
        b'data: {"choices": [{"delta": {"content": "{}"}}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}\n\n'
        b"data: [DONE]\n\n"
    )

    async def events() -> AsyncIterator[bytes]:
        yield sse

    def answer(request: httpx.Request) -> httpx.Response:
        # A streamed body, as a server's: the recorder reads it as it passes.
        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})

    recorder = RecordingTransport("reasoning", httpx.MockTransport(answer))

    async def main() -> None:
        async with httpx.AsyncClient(transport=recorder) as client:
            for body in (
                {"messages": [], "stream": True},
                {"messages": [], "stream": True, "response_format": {"type": "json_schema"}},
            ):
                response = await client.post("http://s/v1/chat/completions", json=body)
                await response.aread()

    run(main(), virtual=False)
    assert [c.guided for c in recorder.records] == [False, True]


def test_each_call_pays_the_request_overhead_once_and_a_chain_pays_it_per_call() -> None:
    profile = get_profile("h100-nvl-coder-8b")
    lone = [CallRecord("coder", "s", "code", 0.0, 1.0, 400, 300)]
    # Two calls at once (one phase), then one that waited for both (a second phase).
    chain = [
        CallRecord("coder", "s", "code", 0.0, 1.0, 400, 300),
        CallRecord("coder", "s", "code", 0.0, 1.0, 400, 300),
        CallRecord("coder", "s", "review", 1.0, 2.0, 400, 300),
    ]
    coder = {"coder": profile}
    bare, charged = (
        run(replay_makespan(lone, coder, request_overhead_s=o), virtual=True) for o in (0.0, 0.05)
    )
    assert abs((charged - bare) - 0.05) < 1e-6
    bare, charged = (
        run(replay_makespan(chain, coder, request_overhead_s=o), virtual=True) for o in (0.0, 0.05)
    )
    assert abs((charged - bare) - 0.10) < 1e-6  # two phases, the parallel calls overlap theirs
    spans: list[tuple[CallRecord, float, float]] = []
    took = run(replay_makespan(chain, coder, request_overhead_s=0.05, spans=spans), virtual=True)
    assert [c.stage for c, _, _ in spans] == ["code", "code", "review"]
    assert spans[0][1] == 0.0 and abs(spans[-1][2] - took) < 1e-9
    assert spans[2][1] >= max(end for _, _, end in spans[:2])  # the review waited for both
    with pytest.raises(ValueError, match="request_overhead_s"):
        run(replay_makespan(lone, coder, request_overhead_s=-1.0), virtual=True)
