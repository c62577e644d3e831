"""The workflow end to end on fake chat models: shape, review rounds, bad output, safety."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage

from graph.graph import build_graph
from nodes.context import RunContext, ServerOptions
from nodes.llm import StaticModels
from tests.fakes import (
    ScriptedChatModel,
    file_of,
    plan_json,
    python_file,
    review_json,
    reviewed_paths,
    schema_name,
    standard_models,
)


def _graph(tmp_path: Path, reasoning: Any, coder: Any, **ctx: Any) -> Any:
    return build_graph(
        StaticModels(reasoning, coder),
        defaults=RunContext(**ctx),
        options=ServerOptions(workspace=tmp_path),
    )


async def test_plan_code_review_writes_files_and_manifest(tmp_path: Path) -> None:
    paths = ["pkg/__init__.py", "pkg/core.py", "config.json", "README.md"]
    reasoning, coder = standard_models(paths)
    out = await _graph(tmp_path, reasoning, coder).ainvoke(
        {"request": "build pkg", "session_id": "s1"}
    )
    assert out["status"] == "ok"
    root = tmp_path / "s1"
    for p in paths:
        assert (root / p).is_file()
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["request"] == "build pkg"
    assert set(manifest["files"]) == set(paths)
    assert manifest["usage"]["coder"]["calls"] == 4
    assert {"plan", "code", "code_agents", "review"} <= set(manifest["timings_s"])
    # One coder call per file; every coder prompt starts with the same shared prefix.
    assert len(coder.calls) == 4
    prefixes = {tuple(str(m.content) for m in call["messages"][:2]) for call in coder.calls}
    assert len(prefixes) == 1
    assert all("FILE:" in str(call["messages"][-1].content) for call in coder.calls)


async def test_only_failing_files_go_back_to_code(tmp_path: Path) -> None:
    paths = ["a.py", "b.py", "c.py"]
    reasoning, coder = standard_models(paths, needs_fix_once=["b.py"])
    out = await _graph(tmp_path, reasoning, coder).ainvoke({"request": "r", "session_id": "s1"})
    coded = [file_of(c["messages"]) for c in coder.calls]
    assert sorted(coded) == ["a.py", "b.py", "b.py", "c.py"]
    fix_prompt = str(coder.calls[-1]["messages"][-1].content)
    assert "fix it" in fix_prompt and "Previous version" in fix_prompt
    assert out["round"] == 1 and out["status"] == "ok"
    # The second review saw only the fixed file.
    reviews = [c for c in reasoning.calls if schema_name(c["kwargs"]) == "Review"]
    assert reviewed_paths(reviews[1]["messages"]) == ["b.py"]


async def test_review_rounds_are_bounded(tmp_path: Path) -> None:
    def reasoning(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        if schema_name(kwargs) == "Plan":
            return plan_json(["a.py", "b.py"])
        files = reviewed_paths(messages)
        return review_json(files, needs_fix=["a.py"])

    r = ScriptedChatModel(responder=reasoning)
    _, coder = standard_models([])
    out = await _graph(tmp_path, r, coder, max_review_rounds=2).ainvoke(
        {"request": "r", "session_id": "s1"}
    )
    assert [file_of(c["messages"]) for c in coder.calls].count("a.py") == 3
    assert out["round"] == 2
    assert out["status"] == "partial"
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["files"]["a.py"]["verdict"] == "needs-fix"


async def test_hostile_plan_writes_nothing_outside_and_reports_rejections(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    hostile = ["../x.py", "/tmp/tandem-evil-x.py", "a/../../x.py", "~/x.py", "ok.py", "OK.py"]
    reasoning, coder = standard_models(hostile)
    out = await _graph(ws, reasoning, coder).ainvoke({"request": "r", "session_id": "s1"})
    rejected = {r["path"] for r in out["rejected_paths"]}
    assert rejected == {"../x.py", "/tmp/tandem-evil-x.py", "a/../../x.py", "~/x.py", "OK.py"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ws"]  # noqa: ASYNC240
    assert not Path("/tmp/tandem-evil-x.py").exists()  # noqa: ASYNC240
    written = sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if p.is_file())
    assert written == ["s1/manifest.json", "s1/ok.py"]
    manifest = json.loads((ws / "s1" / "manifest.json").read_text())
    assert {r["path"] for r in manifest["rejected_paths"]} == rejected


async def test_malformed_plan_is_retried_with_the_error_fed_back(tmp_path: Path) -> None:
    answers = iter(["not json at all", '{"summary": "x"}', plan_json(["a.py"])])

    def reasoning(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        if schema_name(kwargs) == "Plan":
            return next(answers)
        return review_json(reviewed_paths(messages))

    r = ScriptedChatModel(responder=reasoning)
    _, coder = standard_models([])
    out = await _graph(tmp_path, r, coder).ainvoke({"request": "r", "session_id": "s1"})
    assert out["status"] == "ok"
    third = r.calls[2]["messages"]
    assert "not valid Plan JSON" in str(third[-1].content) and "files" in str(third[-1].content)


async def test_plan_that_stays_malformed_ends_the_session_with_a_clear_error(
    tmp_path: Path,
) -> None:
    r = ScriptedChatModel(responder=lambda m, k: "{broken")
    _, coder = standard_models([])
    out = await _graph(tmp_path, r, coder, max_output_retries=1).ainvoke(
        {"request": "r", "session_id": "s1"}
    )
    assert out["status"] == "failed"
    assert "invalid Plan JSON after 2 attempts" in out["error"]
    assert len(r.calls) == 2 and coder.calls == []
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "invalid Plan JSON" in manifest["error"]


async def test_empty_code_is_retried_then_marked_failed(tmp_path: Path) -> None:
    def coder_fn(path: str, messages: list[BaseMessage]) -> str:
        return "" if path == "empty.py" else python_file(path)

    reasoning, coder = standard_models(["empty.py", "fine.py"], coder=coder_fn)
    out = await _graph(
        tmp_path, reasoning, coder, max_review_rounds=0, max_output_retries=1
    ).ainvoke({"request": "r", "session_id": "s1"})
    assert out["files"]["empty.py"]["status"] == "failed"
    assert "empty code after 2 attempts" in out["files"]["empty.py"]["error"]
    assert out["status"] == "partial"
    assert not (tmp_path / "s1" / "empty.py").exists()
    assert (tmp_path / "s1" / "fine.py").exists()


async def test_check_failures_send_the_file_back(tmp_path: Path) -> None:
    seen: dict[str, int] = {}

    def coder_fn(path: str, messages: list[BaseMessage]) -> str:
        seen[path] = seen.get(path, 0) + 1
        if path == "bad.py" and seen[path] == 1:
            return "```python\ndef broken(:\n```"
        return python_file(path)

    reasoning, coder = standard_models(["bad.py", "data.json"], coder=coder_fn)
    out = await _graph(tmp_path, reasoning, coder).ainvoke({"request": "r", "session_id": "s1"})
    assert seen["bad.py"] == 2
    assert "SyntaxError" in str(coder.calls[-1]["messages"][-1].content)
    assert out["status"] == "ok"
    assert out["checks"] == {"bad.py": [], "data.json": []}


async def test_run_context_overrides_defaults(tmp_path: Path) -> None:
    reasoning, coder = standard_models(["a.py", "b.py", "c.py"])
    g = _graph(tmp_path, reasoning, coder)
    out = await g.ainvoke(
        {"request": "r", "session_id": "s1"}, context={"max_files": 2, "review_on": "coder"}
    )
    assert sorted(out["files"]) == ["a.py", "b.py"]
    assert out["rejected_paths"][0]["path"] == "c.py"
    # Review ran on the coder model.
    assert any(schema_name(c["kwargs"]) == "Review" for c in coder.calls)
    with pytest.raises(ValueError, match="max_files"):
        await g.ainvoke({"request": "r", "session_id": "s2"}, context={"max_files": 0})
