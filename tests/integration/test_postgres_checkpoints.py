"""Durable runs in a real Postgres: a session interrupted in one worker resumes in another."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from langchain_core.messages import BaseMessage

from graph.checkpoints import CheckpointStoreUnavailable, open_checkpointer
from graph.graph import build_graph
from graph.sessions import run_session
from nodes.context import RunContext, ServerOptions
from nodes.llm import StaticModels
from routing.fanout import FanoutPolicy
from tests.fakes import file_of, python_file, standard_models
from tests.integration.pg_server import INSTALL_HINT, PostgresServer, pg_bin_dir
from tests.integration.redis_server import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(pg_bin_dir() is None, reason=INSTALL_HINT),
]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def test_a_session_interrupted_in_one_worker_resumes_in_another(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    broken = {"on": True}

    def coder_fn(path: str, messages: list[BaseMessage]) -> str:
        if path == "c.py" and broken["on"]:
            raise ConnectionError("coder server went away")
        return python_file(path)

    # The failing file last: its siblings, started first, finish before its error cancels
    # the round, so their writes are in worker 1's checkpoint.
    paths = ["a.py", "b.py", "d.py", "c.py"]
    reasoning, coder = standard_models(paths, coder=coder_fn)
    ctx = RunContext()
    ws = tmp_path / "ws"
    options = ServerOptions(workspace=ws)
    fanout = FanoutPolicy(max_parallel=4)
    async with open_checkpointer(postgres.url) as saver:  # worker 1
        graph = build_graph(
            StaticModels(reasoning, coder), defaults=ctx, options=options, checkpointer=saver
        )
        first = await run_session(graph, "build", "pg-s1", context=ctx, fanout=fanout, workspace=ws)
    assert first.status == "error" and "coder server went away" in first.error
    coded_first = [file_of(c["messages"]) for c in coder.calls]
    assert sorted(p for p in coded_first if p != "c.py") == ["a.py", "b.py", "d.py"]

    broken["on"] = False
    coder.calls.clear()
    plans_before = len(reasoning.calls)
    async with open_checkpointer(postgres.url) as saver:  # worker 2: its own pool and saver
        graph = build_graph(
            StaticModels(reasoning, coder), defaults=ctx, options=options, checkpointer=saver
        )
        config = {"configurable": {"thread_id": "pg-s1"}}
        snapshot = await graph.aget_state(config)  # type: ignore[arg-type]
        assert snapshot.next  # worker 2 sees where worker 1 stopped
        second = await run_session(
            graph, None, "pg-s1", context=ctx, fanout=fanout, workspace=ws, resume=True
        )
    assert second.status == "ok", second.error
    assert [file_of(c["messages"]) for c in coder.calls] == ["c.py"]  # finished files not redone
    assert len(reasoning.calls) == plans_before + 1  # the review only, no new plan
    manifest = json.loads((tmp_path / "ws" / "pg-s1" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["files_written"] == 4


async def test_opening_twice_keeps_the_schema_and_the_sessions(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    reasoning, coder = standard_models(["x.py"])
    ctx = RunContext()
    ws = tmp_path / "ws"
    options = ServerOptions(workspace=ws)
    async with open_checkpointer(postgres.url) as saver:
        graph = build_graph(
            StaticModels(reasoning, coder), defaults=ctx, options=options, checkpointer=saver
        )
        result = await run_session(
            graph, "one file", "pg-s2", context=ctx, fanout=FanoutPolicy(), workspace=ws
        )
    assert result.status == "ok"
    async with open_checkpointer(postgres.url) as saver:
        graph = build_graph(
            StaticModels(reasoning, coder), defaults=ctx, options=options, checkpointer=saver
        )
        state = await graph.aget_state({"configurable": {"thread_id": "pg-s2"}})
    assert state.values.get("status") == "ok" and not state.next


async def test_unreachable_postgres_names_the_url_without_the_password() -> None:
    url = f"postgresql://tandem:s3cret@127.0.0.1:{free_port()}/tandem"
    with pytest.raises(CheckpointStoreUnavailable) as info:
        async with open_checkpointer(url):
            pass
    assert "postgresql://tandem:***@127.0.0.1:" in str(info.value)
    assert "s3cret" not in str(info.value)
