"""One path or one file never ends a session badly: failures stay per file, resume included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import BaseMessage
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from graph.graph import build_graph
from graph.sessions import SessionResult, run_session
from nodes.check import MAX_CHECK_BYTES, check_file
from nodes.context import RunContext, ServerOptions
from nodes.llm import StaticModels
from routing.fanout import FanoutPolicy
from tests.fakes import file_of, python_file, standard_models

NESTED_60 = "/".join(["d"] * 60) + "/x.py"
LONG_NAME = "\U0001d51e" * 70 + ".py"  # 73 characters, 283 bytes
HOSTILE = ["manifest.json/x.py", LONG_NAME, ".git/hooks/pre-commit", NESTED_60]
GOOD = ["app/main.py", "app/util.py"]
DEEP = 100_000


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def _run(
    tmp_path: Path,
    paths: list[str],
    *,
    coder: Any = None,
    resume: bool = False,
    **ctx_fields: Any,
) -> tuple[SessionResult, Any]:
    reasoning, coder_model = standard_models(paths, coder=coder)
    ctx = RunContext(**ctx_fields)
    options = ServerOptions(workspace=tmp_path / "ws")
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "cp.db")) as saver:
        graph = build_graph(
            StaticModels(reasoning, coder_model), defaults=ctx, options=options, checkpointer=saver
        )
        result = await run_session(
            graph,
            "build",
            "s1",
            context=ctx,
            fanout=FanoutPolicy(max_parallel=4),
            workspace=options.workspace,
            resume=resume,
        )
    return result, coder_model


async def test_hostile_paths_next_to_good_files(tmp_path: Path) -> None:
    result, _ = await _run(tmp_path, [*HOSTILE, *GOOD])
    assert result.status in ("ok", "partial"), result.error
    root = tmp_path / "ws" / "s1"
    assert _files_under(root) == ["app/main.py", "app/util.py", "manifest.json"]
    assert not (root / ".git").exists()
    manifest = json.loads((root / "manifest.json").read_text())
    reasons = {r["path"]: r["reason"] for r in manifest["rejected_paths"]}
    assert set(reasons) == set(HOSTILE)
    assert "reserved" in reasons["manifest.json/x.py"]
    assert "bytes" in reasons[LONG_NAME]
    assert ".git" in reasons[".git/hooks/pre-commit"]
    assert "components" in reasons[NESTED_60]
    assert manifest["files_written"] == 2


@pytest.mark.parametrize(
    ("path", "content"),
    [
        ("deep.json", "[" * DEEP + "]" * DEEP),
        ("deep.toml", "a = " + "[" * DEEP + "]" * DEEP),
        ("deep.yaml", "[" * DEEP + "]" * DEEP),
        ("deep.py", "x = " + "-" * DEEP + "1"),
        ("add.py", "x = " + "1+" * DEEP + "1"),
        ("calls.py", "x = a" + "()" * DEEP),
        ("big.py", "x = 1\n" * (MAX_CHECK_BYTES // 6 + 1)),
        ("surrogate.py", "x = '\ud800'\n"),
    ],
)
def test_checks_that_would_blow_up_become_problems_of_the_file(path: str, content: str) -> None:
    problems = check_file(path, content)
    assert len(problems) == 1 and problems[0]


def test_ordinary_files_still_pass_and_fail_their_checks() -> None:
    assert check_file("a.json", '{"a": [1, {"b": 2}]}') == []
    assert check_file("a.yaml", "a:\n  - b: [1, 2]\n") == []
    assert check_file("a.py", "def f(:\n")[0].startswith("SyntaxError line 1")
    assert check_file("a.toml", "a = [") != []


async def test_files_that_break_the_checks_fail_alone(tmp_path: Path) -> None:
    bad = {
        "deep.json": "[" * DEEP + "]" * DEEP,
        "deep.yaml": "[" * DEEP + "]" * DEEP,
        "deep.py": "x = " + "-" * DEEP + "1",
        "bad_text.py": "x = '\ud800'",
    }

    def coder_fn(path: str, messages: list[BaseMessage]) -> str:
        return f"```\n{bad[path]}\n```" if path in bad else python_file(path)

    result, _ = await _run(tmp_path, [*bad, *GOOD], coder=coder_fn, max_review_rounds=1)
    assert result.status == "partial", result.error
    root = tmp_path / "ws" / "s1"
    manifest = json.loads((root / "manifest.json").read_text())
    for path in bad:
        entry = manifest["files"][path]
        assert entry["verdict"] == "needs-fix" and entry["checks"], entry
    assert "not valid Unicode" in manifest["files"]["bad_text.py"]["error"]
    assert manifest["files"]["bad_text.py"]["status"] == "failed"
    for path in GOOD:
        assert manifest["files"][path]["status"] == "written"
        assert (root / path).is_file()


async def test_a_write_the_filesystem_refuses_fails_that_file_only(tmp_path: Path) -> None:
    # A workspace so deep that a 254-byte name pushes the full path past PATH_MAX.
    deep = tmp_path.joinpath(*["w" * 240] * 16)
    deep.mkdir(parents=True)
    long_name = "x" * 251 + ".py"
    reasoning, coder = standard_models([long_name, "a.py"])
    graph = build_graph(StaticModels(reasoning, coder), options=ServerOptions(workspace=deep))
    out = await graph.ainvoke({"request": "r", "session_id": "s1"})
    assert out["status"] == "partial"
    manifest = json.loads((deep / "s1" / "manifest.json").read_text())
    assert manifest["files"][long_name]["status"] == "failed"
    assert (
        manifest["files"][long_name]["error"] == "write failed: File name too long (ENAMETOOLONG)"
    )
    assert (deep / "s1" / "a.py").is_file()


async def test_resume_does_not_repeat_a_per_file_failure(tmp_path: Path) -> None:
    # A folder already stands where a planned file goes: a deterministic refusal.
    (tmp_path / "ws" / "s1" / "b.py").mkdir(parents=True)
    first, _ = await _run(tmp_path, ["a.py", "b.py"])
    assert first.status == "partial", first.error
    manifest = json.loads((tmp_path / "ws" / "s1" / "manifest.json").read_text())
    assert manifest["files"]["b.py"]["status"] == "refused"
    assert "is a directory" in manifest["files"]["b.py"]["error"]
    again, coder = await _run(tmp_path, ["a.py", "b.py"], resume=True)
    assert again.status == "partial" and coder.calls == []


async def test_an_errored_session_writes_its_finished_files(tmp_path: Path) -> None:
    def coder_fn(path: str, messages: list[BaseMessage]) -> str:
        if path == "b.py":
            raise ConnectionError("coder server went away")
        return python_file(path)

    # b.py last: its failure cancels the coders not yet finished (no node-level retry).
    result, coder = await _run(tmp_path, ["a.py", "c.py", "b.py"], coder=coder_fn)
    assert result.status == "error"
    root = tmp_path / "ws" / "s1"
    assert _files_under(root) == ["a.py", "c.py", "manifest.json"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "error" and "coder server went away" in manifest["error"]
    assert manifest["files"]["a.py"]["status"] == "written"
    assert "b.py" not in manifest["files"]
    assert [file_of(c["messages"]) for c in coder.calls].count("b.py") == 1
