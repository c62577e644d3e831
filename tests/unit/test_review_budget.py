"""Review prompts fit the reviewer: batching by size and context window; refused calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from langchain_core.exceptions import ModelInvalidRequestError
from langchain_core.messages import BaseMessage

from graph.graph import build_graph
from nodes.context import RunContext, ServerOptions
from nodes.llm import StaticModels
from nodes.review import batch_paths, review_budget_chars
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


def test_batches_keep_order_and_budget() -> None:
    sizes = {"a": 40, "b": 40, "c": 90, "d": 10}
    assert batch_paths(["a", "b", "c", "d"], sizes, 100) == [["a", "b"], ["c", "d"]]
    assert batch_paths(["c"], {"c": 500}, 100) == [["c"]]  # one big file still gets a call


async def test_budget_shrinks_to_the_servers_context_window() -> None:
    class Windowed:
        async def context_tokens(self, role: str) -> int | None:
            return 4096 if role == "reasoning" else None

    ctx = RunContext(max_tokens={"review": 1024})
    batch = 60_000
    assert await review_budget_chars(Windowed(), "reasoning", ctx, batch) == (4096 - 1024 - 512) * 3
    assert await review_budget_chars(Windowed(), "coder", ctx, batch) == batch
    assert await review_budget_chars(object(), "reasoning", ctx, batch) == batch


async def test_many_files_are_reviewed_in_several_calls(tmp_path: Path) -> None:
    paths = [f"m{i}.py" for i in range(12)]

    def coder_fn(path: str, messages: list[BaseMessage]) -> str:
        return "```python\n" + f"# {path}\n" + "X = 1\n" * 300 + "```"

    reasoning, coder = standard_models(paths, coder=coder_fn)
    graph = build_graph(
        StaticModels(reasoning, coder),
        options=ServerOptions(workspace=tmp_path, review_batch_chars=5000),
    )
    out = await graph.ainvoke({"request": "r", "session_id": "s1"})
    reviews = [c for c in reasoning.calls if schema_name(c["kwargs"]) == "Review"]
    seen = [reviewed_paths(c["messages"]) for c in reviews]
    assert len(reviews) > 1
    assert sorted(p for batch in seen for p in batch) == sorted(paths)
    assert all(len(str(c["messages"][-1].content)) <= 5000 + 1500 for c in reviews)
    assert out["status"] == "ok" and len(out["verdicts"]) == 12


async def test_a_refused_review_ends_the_session_with_a_clear_error(tmp_path: Path) -> None:
    def reasoning_fn(messages: list[BaseMessage], kwargs: dict[str, Any]) -> Any:
        if schema_name(kwargs) == "Plan":
            return plan_json(["a.py"])
        return ModelInvalidRequestError("maximum context length is 4096 tokens")

    reasoning = ScriptedChatModel(responder=reasoning_fn)
    _, coder = standard_models([])
    graph = build_graph(StaticModels(reasoning, coder), options=ServerOptions(workspace=tmp_path))
    out = await graph.ainvoke({"request": "r", "session_id": "s1"})
    assert out["status"] == "partial"
    assert out["error"].startswith("review: ") and "context length" in out["error"]
    # Refused requests are not retried: one plan call, one review call.
    assert len(reasoning.calls) == 2
    assert (tmp_path / "s1" / "a.py").is_file()
    # The file no reviewer judged is unreviewed, never ok, and says why.
    assert out["verdicts"]["a.py"]["verdict"] == "unreviewed"
    assert "context length" in out["verdicts"]["a.py"]["comments"]
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["files_unreviewed"] == ["a.py"]
    assert manifest["files"]["a.py"]["verdict"] == "unreviewed"
    assert manifest["error"].startswith("review: ") and "context length" in manifest["error"]


async def test_a_refused_coder_request_fails_only_that_file(tmp_path: Path) -> None:
    def coder_fn(messages: list[BaseMessage], kwargs: dict[str, Any]) -> Any:
        if file_of(messages) == "huge.py":
            return ModelInvalidRequestError("prompt too long")
        return python_file(file_of(messages))

    def reasoning_fn(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        if schema_name(kwargs) == "Plan":
            return plan_json(["huge.py", "ok.py"])
        return review_json(reviewed_paths(messages))

    coder = ScriptedChatModel(responder=coder_fn)
    graph = build_graph(
        StaticModels(ScriptedChatModel(responder=reasoning_fn), coder),
        defaults=RunContext(max_review_rounds=0),
        options=ServerOptions(workspace=tmp_path),
    )
    out = await graph.ainvoke({"request": "r", "session_id": "s1"})
    assert out["files"]["huge.py"]["status"] == "failed"
    assert "refused" in out["files"]["huge.py"]["error"]
    assert out["files"]["ok.py"]["status"] == "written"
    assert [file_of(c["messages"]) for c in coder.calls].count("huge.py") == 1


async def test_context_window_is_read_from_the_servers_model_card() -> None:
    from graph.runtime import build_runtime
    from graph.settings import Settings
    from serving.emulator.profiles import get_profile

    runtime = build_runtime(Settings(emulator_coder_profile="cpu-tiny"))
    async with runtime.router:
        assert await runtime.models.context_tokens("coder") == get_profile("cpu-tiny").max_model_len
        assert await runtime.models.context_tokens("reasoning") == 32768
    await runtime.aclose()


async def test_unusable_review_answers_still_count_in_the_usage(tmp_path: Path) -> None:
    """A reviewer whose every answer is invalid JSON: the session ends `partial` with the
    file unreviewed, and the answers it paid for are in the manifest's usage and review
    share (they were dropped with the error before)."""

    def reasoning_fn(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        if schema_name(kwargs) == "Plan":
            return plan_json(["a.py"])
        return "not a review"

    reasoning = ScriptedChatModel(responder=reasoning_fn)
    _, coder = standard_models([])
    graph = build_graph(
        StaticModels(reasoning, coder),
        defaults=RunContext(max_output_retries=1),
        options=ServerOptions(workspace=tmp_path),
    )
    out = await graph.ainvoke({"request": "r", "session_id": "s1"})
    assert out["status"] == "partial"
    assert out["error"].startswith("review: ") and "invalid" in out["error"]
    assert out["verdicts"]["a.py"]["verdict"] == "unreviewed"
    # One plan answer and two review answers (the first and its one retry).
    assert len(reasoning.calls) == 3
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["usage"]["reasoning"]["calls"] == 3
    assert manifest["review_calls"] == {"reasoning": 2, "coder": 0}
    assert manifest["review_share"] == {"reasoning": 1.0, "coder": 0.0}
