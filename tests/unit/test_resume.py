"""Durable runs: a failed coder leaves the others' work checkpointed; resume redoes only it."""

from __future__ import annotations

import json
from pathlib import Path

from langchain_core.messages import BaseMessage
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from graph.graph import build_graph
from graph.sessions import run_session
from nodes.context import RunContext, ServerOptions
from nodes.llm import StaticModels
from routing.fanout import FanoutPolicy
from tests.fakes import file_of, python_file, standard_models


async def test_resume_reruns_only_the_failed_coder(tmp_path: Path) -> None:
    broken = {"on": True}

    def coder_fn(path: str, messages: list[BaseMessage]) -> str:
        if path == "b.py" and broken["on"]:
            raise ConnectionError("coder server went away")
        return python_file(path)

    # b.py last: without node retries its failure cancels the coders not yet finished.
    paths = ["a.py", "c.py", "d.py", "b.py"]
    reasoning, coder = standard_models(paths, coder=coder_fn)
    ctx = RunContext()
    options = ServerOptions(workspace=tmp_path / "ws")
    fanout = FanoutPolicy(max_parallel=4)
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "cp.db")) as saver:
        graph = build_graph(
            StaticModels(reasoning, coder), defaults=ctx, options=options, checkpointer=saver
        )
        first = await run_session(
            graph, "build", "s1", context=ctx, fanout=fanout, workspace=options.workspace
        )
        assert first.status == "error" and "coder server went away" in first.error
        manifest = json.loads((tmp_path / "ws" / "s1" / "manifest.json").read_text())
        assert manifest["status"] == "error" and manifest["resume"] == "tandem resume s1"
        coded_first = [file_of(c["messages"]) for c in coder.calls]
        # No node-level retry: transport errors are retried (or not) by nodes/llm.py alone.
        assert coded_first.count("b.py") == 1
        assert sorted(p for p in coded_first if p != "b.py") == ["a.py", "c.py", "d.py"]

    broken["on"] = False
    coder.calls.clear()
    plans_before = len(reasoning.calls)
    # A new process: a fresh saver on the same file.
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "cp.db")) as saver:
        graph = build_graph(
            StaticModels(reasoning, coder), defaults=ctx, options=options, checkpointer=saver
        )
        second = await run_session(
            graph, None, "s1", context=ctx, fanout=fanout, workspace=options.workspace, resume=True
        )
    assert second.status == "ok", second.error
    assert [file_of(c["messages"]) for c in coder.calls] == ["b.py"]
    assert len(reasoning.calls) == plans_before + 1  # the review only, no new plan
    for p in paths:
        assert (tmp_path / "ws" / "s1" / p).is_file()
    manifest = json.loads((tmp_path / "ws" / "s1" / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["files_written"] == 4
