"""Prompts and limits for small models (prompt_style="small"), and the trim of a Python answer
cut at max_tokens: on fake models, so every outcome is scripted and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage

from graph.graph import build_graph
from nodes.code import CODER_SMALL_EXAMPLE_ANSWER, coder_messages, trim_to_compiling
from nodes.context import RunContext, ServerOptions
from nodes.llm import StaticModels, response_format_for
from nodes.plan import SMALL_PLAN_TEXT_CHARS, plan_schema
from nodes.review import SMALL_REVIEW_TEXT_CHARS, review_schema
from nodes.schemas import Plan, Review
from tests.fakes import (
    ScriptedChatModel,
    file_of,
    plan_json,
    review_json,
    reviewed_paths,
    schema_name,
)

WHOLE = "class Store:\n    def add(self, item: str) -> None:\n        self.items.append(item)\n"
LOOPING_TAIL = '\nNAMES = {\n    "a": "b",\n    "a": "b",\n    "a": "unterminated'
TASK = {
    "request": "a store: store.py with a Store class",
    "path": "store.py",
    "plan": json.loads(plan_json(["store.py"])),
}


def _fenced(code: str) -> str:
    return f"```python\n{code}"


def _models(answer: AIMessage) -> tuple[ScriptedChatModel, ScriptedChatModel]:
    def reasoning(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        if schema_name(kwargs) == "Plan":
            return plan_json(["store.py"])
        return review_json(reviewed_paths(messages))

    def coder(messages: list[BaseMessage], kwargs: dict[str, Any]) -> AIMessage:
        assert file_of(messages) == "store.py"
        return answer

    return ScriptedChatModel(responder=reasoning), ScriptedChatModel(responder=coder)


async def _run(tmp_path: Path, answer: AIMessage, style: str = "full") -> dict[str, Any]:
    reasoning, coder = _models(answer)
    graph = build_graph(
        StaticModels(reasoning, coder),
        defaults=RunContext(max_review_rounds=0, prompt_style=style),  # type: ignore[arg-type]
        options=ServerOptions(workspace=tmp_path),
    )
    out: dict[str, Any] = await graph.ainvoke({"request": TASK["request"], "session_id": "s1"})
    return out


async def test_an_answer_cut_at_max_tokens_keeps_its_longest_compiling_prefix_and_says_so(
    tmp_path: Path,
) -> None:
    cut = AIMessage(
        content=_fenced(WHOLE + LOOPING_TAIL), response_metadata={"finish_reason": "length"}
    )
    out = await _run(tmp_path, cut)
    assert (tmp_path / "s1" / "store.py").read_text() == WHOLE
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    entry = manifest["files"]["store.py"]
    assert entry["trimmed"] == (
        "cut at max_tokens; kept the first 3 of 8 lines, the longest prefix that compiles"
    )
    assert entry["checks"] == [] and out["status"] == "ok"
    assert manifest["warnings"] == [f"store.py trimmed: {entry['trimmed']}"]


async def test_an_answer_the_model_ended_itself_is_never_trimmed(tmp_path: Path) -> None:
    ended = AIMessage(
        content=_fenced(WHOLE + LOOPING_TAIL), response_metadata={"finish_reason": "stop"}
    )
    out = await _run(tmp_path, ended)
    assert (tmp_path / "s1" / "store.py").read_text() == WHOLE + LOOPING_TAIL + "\n"
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert "trimmed" not in manifest["files"]["store.py"]
    assert manifest["files"]["store.py"]["verdict"] == "needs-fix"
    assert out["status"] == "partial" and manifest["warnings"] == []


def test_trim_leaves_alone_what_compiles_what_is_not_python_and_what_has_no_good_prefix() -> None:
    assert trim_to_compiling("store.py", WHOLE) is None
    assert trim_to_compiling("data.json", '{"a": [1, 2') is None
    assert trim_to_compiling("store.py", "def broken(:\n    pass\n") is None
    kept, note = trim_to_compiling("store.py", WHOLE + LOOPING_TAIL) or ("", "")
    assert kept == WHOLE and "3 of 8 lines" in note


def test_the_small_coder_prompt_is_one_worked_example_then_this_file_only() -> None:
    messages = coder_messages(
        {**TASK, "comments": "SyntaxError line 1: invalid syntax", "previous": "def f(:\n"},
        "small",
    )
    assert [m.type for m in messages] == ["system", "human", "ai", "human"]
    assert messages[2].content == CODER_SMALL_EXAMPLE_ANSWER
    own = str(messages[-1].content)
    assert file_of(messages) == "store.py"
    assert own.startswith(f"Request: {TASK['request']}\n")
    assert "SyntaxError line 1: invalid syntax" in own and "def f(:" in own
    assert own.endswith("Write store.py.")
    # The whole plan's JSON is left out: only this file's task is there.
    assert '"files"' not in own
    assert coder_messages(TASK) != messages


def test_small_style_caps_the_free_text_of_plan_and_review_schemas_only() -> None:
    plan = response_format_for(plan_schema(4, 2, SMALL_PLAN_TEXT_CHARS))["json_schema"]["schema"]
    task = plan["$defs"]["FileTask"]["properties"]
    assert plan["properties"]["summary"]["maxLength"] == SMALL_PLAN_TEXT_CHARS
    assert task["purpose"]["maxLength"] == task["interface"]["maxLength"] == SMALL_PLAN_TEXT_CHARS
    review = review_schema(["a.py"], SMALL_REVIEW_TEXT_CHARS).model_json_schema()
    comments = review["$defs"]["FileVerdict"]["properties"]["comments"]
    assert comments["maxLength"] == review["properties"]["summary"]["maxLength"] == 200
    # The default schemas are the plain models' (the emulator's benchmark reads them).
    assert plan_schema(4, 2).model_json_schema()["$defs"] == Plan.model_json_schema()["$defs"]
    plain = review_schema(["a.py"]).model_json_schema()
    assert plain["properties"]["summary"] == Review.model_json_schema()["properties"]["summary"]
    # Validation keeps the models' own bounds: a longer text is still accepted.
    long = "x" * 1000
    assert review_schema(["a.py"], 200).model_validate({"verdicts": [], "summary": long})


async def test_a_small_style_session_sends_the_small_prompts(tmp_path: Path) -> None:
    reasoning, coder = _models(AIMessage(content=_fenced(WHOLE)))
    graph = build_graph(
        StaticModels(reasoning, coder),
        defaults=RunContext(max_review_rounds=0, prompt_style="small"),
        options=ServerOptions(workspace=tmp_path),
    )
    out = await graph.ainvoke({"request": TASK["request"], "session_id": "s1"})
    assert out["status"] == "ok"
    sent = coder.calls[0]["messages"]
    assert sent[2].content == CODER_SMALL_EXAMPLE_ANSWER
    plan_call = reasoning.calls[0]["kwargs"]["extra_body"]["response_format"]
    assert plan_call["json_schema"]["schema"]["properties"]["summary"]["maxLength"] == 160
