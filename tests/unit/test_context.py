"""The run context (merge, validation, schema), size bounds, progress events, lazy server graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from graph.graph import build_graph
from graph.sessions import run_session
from nodes.code import MAX_FILE_CHARS
from nodes.context import (
    MAX_REQUEST_CHARS,
    RequestTooLargeError,
    RunContext,
    ServerOptions,
    parse_context,
)
from nodes.finalize import write_interrupted
from nodes.llm import StaticModels
from routing.fanout import FanoutPolicy
from tests.fakes import python_file, standard_models

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_merged_keeps_a_field_set_explicitly_to_the_class_default() -> None:
    base = RunContext(max_files=10, max_tokens={"plan": 600})
    merged = base.merged(RunContext(max_files=40))
    assert merged.max_files == 40
    assert merged.max_tokens.plan == 600  # not set by the override: the base's
    assert base.merged(RunContext()) == base  # nothing set, nothing changes


def test_merged_takes_caps_per_stage_and_checks_mappings() -> None:
    base = RunContext(max_tokens={"plan": 600, "review": 300})
    merged = base.merged({"max_tokens": {"code": 100}, "review_on": "coder"})
    assert (merged.max_tokens.plan, merged.max_tokens.code, merged.max_tokens.review) == (
        600,
        100,
        300,
    )
    assert merged.review_on == "coder"
    with pytest.raises(ValueError, match="max_files: Input should be greater than or equal"):
        base.merged({"max_files": 0})
    with pytest.raises(ValueError, match="workspace: unknown field"):
        base.merged({"workspace": "/etc"})


def test_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match=r"max_tokens\.review: .*less than or equal"):
        parse_context({"max_tokens": {"review": 10**9}})
    with pytest.raises(ValueError, match=r"max_tokens\.draft: unknown field"):
        parse_context({"max_tokens": {"draft": 5}})
    with pytest.raises(ValueError, match="review_on"):
        parse_context({"review_on": "gpu0"})


def test_context_schema_shows_the_given_defaults_and_only_public_fields() -> None:
    defaults = RunContext(max_files=7, max_tokens={"review": 900})
    schema_class = RunContext.with_defaults(defaults)
    schema = schema_class.model_json_schema()
    fields = schema["properties"]
    assert fields["max_files"]["default"] == 7
    assert fields["max_tokens"]["default"]["review"] == 900
    assert fields["max_files"]["minimum"] == 1 and fields["max_files"]["maximum"] == 500
    assert all(f["description"] for f in fields.values())
    assert set(fields) == {
        "review_on",
        "review_delay_budget_s",
        "max_parallel_agents",
        "max_review_rounds",
        "max_files",
        "max_output_retries",
        "max_tokens",
        "prompt_style",
    }
    # What LangGraph builds from a context dict: bounds hold, only given fields count as set.
    ctx = schema_class(max_review_rounds=0)
    assert ctx.max_files == 7 and ctx.model_fields_set == {"max_review_rounds"}
    with pytest.raises(ValueError, match="max_files"):
        schema_class(max_files=0)


def test_server_options_refuse_a_tiny_review_budget() -> None:
    with pytest.raises(ValueError, match="review_batch_chars"):
        ServerOptions(review_batch_chars=10)


def _env_without_tandem(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update(PYTHONPATH=str(REPO_ROOT), **extra)
    return env


def test_importing_the_graph_module_reads_no_environment() -> None:
    code = (
        "import graph.graph as g\n"
        "try:\n"
        "    g.make_graph()\n"
        "except ValueError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=_env_without_tandem(TANDEM_LIMIT="bogus"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # The import succeeded; the bad setting surfaced only when the graph was first needed,
    # as a ValueError naming the variable, not as an exit.
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "TANDEM_LIMIT" in done.stdout


def test_the_server_graph_takes_its_defaults_from_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from graph.graph import make_graph

    monkeypatch.setenv("TANDEM_MAX_FILES", "9")
    make_graph.cache_clear()
    try:
        schema = make_graph().get_context_jsonschema()
    finally:
        make_graph.cache_clear()
    assert schema is not None and schema["properties"]["max_files"]["default"] == 9


async def test_an_oversized_request_is_refused_and_nothing_of_it_is_kept(
    tmp_path: Path,
) -> None:
    reasoning, coder = standard_models(["a.py"])
    options = ServerOptions(workspace=tmp_path / "ws")
    huge = "x" * (MAX_REQUEST_CHARS + 1)
    graph = build_graph(StaticModels(reasoning, coder), options=options)
    with pytest.raises(RequestTooLargeError, match=f"the limit is {MAX_REQUEST_CHARS:,}"):
        await graph.ainvoke({"request": huge, "session_id": "s1"})
    db = tmp_path / "cp.db"
    async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
        graph = build_graph(StaticModels(reasoning, coder), options=options, checkpointer=saver)
        result = await run_session(
            graph,
            huge,
            "s2",
            context=RunContext(),
            fanout=FanoutPolicy(),
            workspace=options.workspace,
        )
        assert (await graph.aget_state({"configurable": {"thread_id": "s2"}})).values == {}
    assert result.status == "error" and "the limit is" in result.error
    assert reasoning.calls == []
    manifest_text = (options.workspace / "s2" / "manifest.json").read_text()
    assert json.loads(manifest_text)["request"] is None
    assert len(manifest_text) < 10_000 and db.stat().st_size < MAX_REQUEST_CHARS


async def test_a_file_over_the_size_limit_fails_alone(tmp_path: Path) -> None:
    def coder_fn(path: str, messages: list[BaseMessage]) -> str:
        if path == "big.py":
            return "```python\n" + "X = 1\n" * (MAX_FILE_CHARS // 6 + 10) + "```"
        return python_file(path)

    reasoning, coder = standard_models(["big.py", "small.py"], coder=coder_fn)
    graph = build_graph(
        StaticModels(reasoning, coder),
        defaults=RunContext(max_review_rounds=0),
        options=ServerOptions(workspace=tmp_path),
    )
    out = await graph.ainvoke({"request": "r", "session_id": "s1"})
    assert out["files"]["big.py"]["status"] == "failed"
    assert out["files"]["big.py"]["error"].endswith(f"the limit is {MAX_FILE_CHARS:,}")
    assert out["files"]["small.py"]["status"] == "written"
    assert out["status"] == "partial"
    assert not (tmp_path / "s1" / "big.py").exists() and (tmp_path / "s1" / "small.py").is_file()


async def test_nodes_emit_stage_and_file_done_events(tmp_path: Path) -> None:
    paths = ["a.py", "b.py", "c.py"]
    reasoning, coder = standard_models(paths, needs_fix_once=["b.py"])
    graph = build_graph(StaticModels(reasoning, coder), options=ServerOptions(workspace=tmp_path))
    events: list[dict[str, Any]] = [
        e async for e in graph.astream({"request": "r", "session_id": "s1"}, stream_mode="custom")
    ]
    done = [e for e in events if e["event"] == "file_done"]
    assert sorted((e["round"], e["file"]) for e in done) == [
        (0, "a.py"),
        (0, "b.py"),
        (0, "c.py"),
        (1, "b.py"),
    ]
    assert sorted(e["done"] for e in done if e["round"] == 0) == [1, 2, 3]
    assert [e["total"] for e in done if e["round"] == 1] == [1]
    assert all(e["ok"] and e["session_id"] == "s1" for e in done)
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["plan", "review", "review", "finalize"]
    assert all(e["seconds"] >= 0 for e in events if e["event"] == "stage")


def test_an_interrupted_session_writes_done_files_with_its_reason(tmp_path: Path) -> None:
    state = {
        "request": "r",
        "plan": {"files": [{"path": "a.py"}, {"path": "b.py"}, {"path": "../x.py"}]},
        "files": {
            "a.py": {"path": "a.py", "content": "A = 1\n", "status": "written"},
            "b.py": {"path": "b.py", "content": "B = (\n", "status": "written"},
            "../x.py": {"path": "../x.py", "content": "X = 1\n", "status": "written"},
        },
        "verdicts": {"b.py": {"verdict": "needs-fix", "comments": "syntax"}},
    }
    path = write_interrupted(state, "s1", tmp_path, "stopped by the user", status="interrupted")
    manifest = json.loads(path.read_text())
    assert manifest["status"] == "interrupted" and manifest["error"] == "stopped by the user"
    assert (tmp_path / "s1" / "a.py").read_text() == "A = 1\n"
    assert manifest["files"]["b.py"]["status"] == "checkpointed"
    assert not (tmp_path / "s1" / "b.py").exists()
    # The same path policy as finalize: a hostile path is refused, never written.
    assert manifest["files"]["../x.py"]["status"] == "refused"
    assert not (tmp_path / "x.py").exists()
