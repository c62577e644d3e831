"""Honest outcomes on fake models: missing verdicts, plans shorter than the request, backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from langchain_core.messages import BaseMessage

from cli.summary import summary_text
from graph.graph import build_graph
from graph.sessions import SessionResult, _fill
from graph.settings import load_settings
from nodes.context import ServerOptions
from nodes.finalize import backend_line, describe_backend
from nodes.llm import StaticModels
from nodes.plan import named_paths, plan_schema
from nodes.review import review_schema
from tests.fakes import (
    ScriptedChatModel,
    plan_json,
    python_file,
    review_json,
    reviewed_paths,
    schema_name,
)


def _models(plan: list[str], skip_verdict: set[str], skip_times: int) -> tuple[Any, Any]:
    """A reviewer that leaves out `skip_verdict` files the first `skip_times` times."""
    skipped = {"n": 0}

    def reasoning(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        if schema_name(kwargs) == "Plan":
            return plan_json(plan)
        files = reviewed_paths(messages)
        if skipped["n"] < skip_times and set(files) & skip_verdict:
            skipped["n"] += 1
            files = [p for p in files if p not in skip_verdict]
        return review_json(files)

    def coder(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        return python_file("x.py")

    return ScriptedChatModel(responder=reasoning), ScriptedChatModel(responder=coder)


async def _run(tmp_path: Path, reasoning: Any, coder: Any, request: str) -> dict[str, Any]:
    graph = build_graph(StaticModels(reasoning, coder), options=ServerOptions(workspace=tmp_path))
    out: dict[str, Any] = await graph.ainvoke({"request": request, "session_id": "s1"})
    return out


async def test_a_file_the_reviewer_never_judged_is_unreviewed_not_ok(tmp_path: Path) -> None:
    reasoning, coder = _models(["a.py", "b.py"], skip_verdict={"b.py"}, skip_times=2)
    out = await _run(tmp_path, reasoning, coder, "build a.py and b.py")
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["files"]["a.py"]["verdict"] == "ok"
    assert manifest["files"]["b.py"]["verdict"] == "unreviewed"
    assert manifest["files_unreviewed"] == ["b.py"]
    assert manifest["status"] == out["status"] == "partial"
    # Asked twice for b.py (the review, then once more for the missing file only).
    reviews = [c for c in reasoning.calls if schema_name(c["kwargs"]) == "Review"]
    assert [reviewed_paths(c["messages"]) for c in reviews] == [["a.py", "b.py"], ["b.py"]]
    result = SessionResult(session_id="s1", status="running")
    _fill(result, out)
    assert (result.files_ok, result.files_failed) == (1, 1)


async def test_a_verdict_given_on_the_second_ask_counts(tmp_path: Path) -> None:
    reasoning, coder = _models(["a.py", "b.py"], skip_verdict={"b.py"}, skip_times=1)
    out = await _run(tmp_path, reasoning, coder, "build a.py and b.py")
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert out["status"] == "ok"
    assert {p: e["verdict"] for p, e in manifest["files"].items()} == {"a.py": "ok", "b.py": "ok"}
    assert manifest["files_unreviewed"] == []


async def test_a_plan_shorter_than_the_request_is_a_warning(tmp_path: Path) -> None:
    reasoning, coder = _models(["todo/store.py"], skip_verdict=set(), skip_times=0)
    request = "a todo list: todo/store.py, todo/cli.py and tests/test_store.py"
    out = await _run(tmp_path, reasoning, coder, request)
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["warnings"] == [
        "the request names 3 files, the plan has 1; not planned: todo/cli.py, tests/test_store.py"
    ]
    result = SessionResult(session_id="s1", status="running")
    _fill(result, out)
    assert "s1 warning: the request names 3 files" in summary_text([result], virtual=True)


def test_named_paths_are_relative_and_whole() -> None:
    request = "todo/store.py, README.md and /etc/x.py, ~/y.py, ../z.py; pyproject.toml."
    assert named_paths(request) == ["todo/store.py", "README.md", "pyproject.toml"]


def test_schemas_bound_the_plan_and_name_every_reviewed_file() -> None:
    files = plan_schema(max_files=4, named=2).model_json_schema()["properties"]["files"]
    assert (files["minItems"], files["maxItems"]) == (2, 4)
    schema = review_schema(["a.py", "b/c.py"]).model_json_schema()
    assert schema["properties"]["verdicts"]["minItems"] == 2
    assert schema["$defs"]["FileVerdict"]["properties"]["path"]["enum"] == ["a.py", "b/c.py"]


def test_the_emulator_is_named_and_its_content_called_placeholder() -> None:
    from graph.runtime import build_runtime

    settings = load_settings(reasoning_url=None, coder_url=None, endpoints_file=None)
    backend = describe_backend(build_runtime(settings).models)
    assert backend["kind"] == "emulator" and backend["placeholder_content"]
    assert backend["roles"]["coder"] == [{"model": settings.coder_model, "host": "emulator"}]
    assert "placeholder content" in backend_line(backend)


async def test_a_fix_round_carries_the_failed_check_and_the_previous_version(
    tmp_path: Path,
) -> None:
    # A small reviewer asks for a fix with no comment; the check also finds a syntax error.
    # The coder's fix prompt must still say what failed and show the previous version.
    def reasoning(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        if schema_name(kwargs) == "Plan":
            return plan_json(["a.py"])
        files = reviewed_paths(messages)
        verdicts = [{"path": p, "verdict": "needs-fix", "comments": ""} for p in files]
        return json.dumps({"verdicts": verdicts, "summary": ""})

    prompts: list[str] = []

    def coder(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        prompts.append(str(messages[-1].content))
        return "```python\ndef broken(:\n```" if len(prompts) == 1 else python_file("a.py")

    await _run(
        tmp_path,
        ScriptedChatModel(responder=reasoning),
        ScriptedChatModel(responder=coder),
        "build a.py",
    )
    assert len(prompts) >= 2
    fix = prompts[1]
    assert "The reviewer asked for changes" in fix
    assert "def broken(:" in fix  # the previous version
    assert "syntax" in fix.lower() or "compile" in fix.lower(), fix
