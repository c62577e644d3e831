"""Program-aware order inside vLLM: the router sends each call's session rank as `priority`.

A replica flagged `priority` (its server runs `--scheduling-policy priority`) gets each
call's least-attained-service rank in vLLM's per-request `priority` field; any other replica
gets the body unchanged (vLLM's default `fcfs` policy refuses a non-zero priority).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_socket import disable_socket, enable_socket

from graph.runtime import emulator_apps, in_process_endpoints
from routing.calls import CallInfo, call_scope
from routing.endpoints import Replica, load_endpoints_file
from routing.router import Router
from routing.transport import PRIORITY_UNITS_PER_S, engine_rank, with_priority
from serving.clock import run
from serving.launch import export_lines, load_profile

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(autouse=True)
def _no_network() -> Iterator[None]:
    disable_socket(allow_unix_socket=True)
    yield
    enable_socket()


def test_rank_is_attained_service_less_aging_in_tenths_of_a_slot_second() -> None:
    assert engine_rank(0.0) == 0
    assert engine_rank(2.34) == int(2.34 * PRIORITY_UNITS_PER_S) == 23
    assert engine_rank(5.0, forgiven_s=2.0) == 30
    assert engine_rank(1.0, forgiven_s=9.0) == 0  # aging never goes below the top rank
    assert engine_rank(1e12) == 2**31 - 1  # vLLM's priority is a 32-bit integer


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.dictionaries(st.text(), _JSON, max_size=5),
    priority=st.integers(0, 2**31 - 1),
    indent=st.sampled_from([None, 0, 2]),
    ascii_only=st.booleans(),
    pad=st.sampled_from(["", " ", "\n\t "]),
)
def test_a_priority_spliced_into_any_json_object_reads_back_with_the_rest_intact(
    payload: dict[str, object], priority: int, indent: int | None, ascii_only: bool, pad: str
) -> None:
    body = (pad + json.dumps(payload, indent=indent, ensure_ascii=ascii_only) + pad).encode()
    sent = json.loads(with_priority(body, payload, priority))
    assert sent == {**payload, "priority": priority}
    if "priority" not in payload:  # spliced: everything after the opening brace as it was
        assert with_priority(body, payload, priority).endswith(body[len(pad) + 1 :])


def test_a_callers_own_priority_is_replaced_not_left_to_win() -> None:
    body = b'{"model":"m","priority":-5}'
    sent = with_priority(body, json.loads(body), 7)
    assert json.loads(sent) == {"model": "m", "priority": 7}
    assert sent.count(b'"priority"') == 1


def _router(priority: bool, seen: list[dict[str, object]], hold_s: float) -> Router:
    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        await asyncio.sleep(hold_s)
        return httpx.Response(200, json={"choices": [], "usage": {"completion_tokens": 1}})

    replica = Replica(
        url="http://gpu1:8002/v1",
        model="m",
        gpu="gpu1",
        transport=httpx.MockTransport(handler),
        priority=priority,
    )
    return Router({"reasoning": [replica], "coder": [replica]}, limit="fixed-8", order="las")


async def _calls(router: Router) -> None:
    client = router.client("coder")
    url = f"{router.base_url('coder')}/chat/completions"

    async def call(session: str) -> None:
        with call_scope(CallInfo(session_id=session, stage="code", role="coder")):
            answer = await client.post(url, json=CHAT)
            assert answer.status_code == 200

    async with router:
        await call("heavy")  # 10 s of service for the heavy session
        await asyncio.gather(call("heavy"), call("light"))


def test_a_priority_replica_gets_each_sessions_rank() -> None:
    seen: list[dict[str, object]] = []
    run(_calls(_router(True, seen, hold_s=10.0)), virtual=True)
    first, *later = seen
    assert first["priority"] == 0  # nothing attained yet
    ranks = sorted(int(str(body["priority"])) for body in later)
    # The light session goes first inside the engine: rank 0 against 10 slot-seconds.
    assert ranks == [0, 10 * PRIORITY_UNITS_PER_S]
    assert all(body["messages"] == CHAT["messages"] for body in seen)  # the rest is intact


def test_an_fcfs_replica_gets_the_body_unchanged() -> None:
    seen: list[dict[str, object]] = []
    run(_calls(_router(False, seen, hold_s=10.0)), virtual=True)
    assert seen and all(body == CHAT for body in seen)


def test_emulated_priority_servers_get_ranks_and_fcfs_servers_none() -> None:
    async def go(engine_priority: bool) -> list[int]:
        models = {"reasoning": "r", "coder": "m"}
        apps = emulator_apps(
            {"reasoning": "cpu-tiny", "coder": "cpu-tiny"},
            models,
            seed=0,
            engine_priority=engine_priority,
        )
        endpoints = in_process_endpoints(apps, models)
        assert endpoints["coder"][0].priority is engine_priority
        router = Router(endpoints, limit="fixed-4", order="las")
        await _calls_on(router)
        engine = apps["coder"].state.engine
        await engine.aclose()
        return [record.priority for record in engine.records]

    assert max(run(go(True), virtual=True)) > 0
    assert set(run(go(False), virtual=True)) == {0}


async def _calls_on(router: Router) -> None:
    client = router.client("coder")
    url = f"{router.base_url('coder')}/chat/completions"

    async def call(session: str) -> None:
        with call_scope(CallInfo(session_id=session, stage="code", role="coder")):
            answer = await client.post(url, json={**CHAT, "max_tokens": 1000})
            assert answer.status_code == 200, answer.text

    async with router:
        await call("heavy")
        await asyncio.gather(call("heavy"), call("light"))


def test_endpoints_file_marks_priority_replicas(tmp_path: Path) -> None:
    path = tmp_path / "endpoints.yaml"
    path.write_text(
        "reasoning: [{url: 'http://a:8001/v1', model: r, gpu: gpu0, priority: true}]\n"
        "coder: [{url: 'http://b:8002/v1', model: c, gpu: gpu1}]\n"
    )
    endpoints = load_endpoints_file(path)
    assert endpoints["reasoning"][0].priority is True
    assert endpoints["coder"][0].priority is False
    path.write_text("reasoning: [{url: 'http://a:8001/v1', model: r, gpu: g, priority: 'yes'}]\n")
    with pytest.raises(ValueError, match=r"reasoning\[0\]\.priority must be true or false"):
        load_endpoints_file(path)


def test_launch_exports_engine_priority_only_when_both_servers_run_it() -> None:
    names = {"reasoning": "tandem-reasoning", "coder": "tandem-coder"}
    assert "export TANDEM_ENGINE_PRIORITY=true" in export_lines(load_profile("h100-pair"), names)
    assert not any(
        "TANDEM_ENGINE_PRIORITY" in line for line in export_lines(load_profile("cpu-tiny"), names)
    )
