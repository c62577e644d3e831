"""The emulator's answers parse as the workflow's schemas and as files of the right kind."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest
import yaml

from nodes.schemas import Plan, Review
from serving.emulator import content


def test_plan_lists_the_mentioned_paths_in_order_once() -> None:
    text = (
        "Build a CLI. Files: src/cli.py, src/core.py and README.md; config in conf/app.yaml.\n"
        "src/cli.py imports src/core.py. Also pyproject.toml and data/seed.json, notes.txt."
    )
    plan = Plan.model_validate_json(
        content.structured_answer(0, "Plan", Plan.model_json_schema(), text)
    )
    assert [f.path for f in plan.files] == [
        "src/cli.py",
        "src/core.py",
        "README.md",
        "conf/app.yaml",
        "pyproject.toml",
        "data/seed.json",
        "notes.txt",
    ]


def test_plan_without_paths_is_a_small_python_package() -> None:
    plan = Plan.model_validate_json(
        content.structured_answer(0, "Plan", Plan.model_json_schema(), "Make a todo app.")
    )
    assert [f.path for f in plan.files] == list(content.DEFAULT_PLAN_FILES)


def _review_text(n: int, salt: str) -> str:
    return "\n".join(f"### FILE: pkg/m{i}.py\n```python\nx = {i}  # {salt}\n```" for i in range(n))


def test_review_has_one_verdict_per_file_and_some_need_fixes() -> None:
    text = _review_text(200, "v1")
    review = Review.model_validate_json(
        content.structured_answer(7, "Review", Review.model_json_schema(), text)
    )
    assert [v.path for v in review.verdicts] == [f"pkg/m{i}.py" for i in range(200)]
    fixes = sum(v.verdict == "needs-fix" for v in review.verdicts)
    assert 10 <= fixes <= 55  # ~15% of 200
    again = content.structured_answer(7, "Review", {}, text)
    assert again == content.structured_answer(7, "Review", {}, text)
    changed = Review.model_validate_json(
        content.structured_answer(7, "Review", {}, _review_text(200, "v2"))
    )
    assert [v.verdict for v in changed.verdicts] != [v.verdict for v in review.verdicts]


SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3}}, "required": ["a"]},
    {"type": "array", "items": {"type": "string", "minLength": 5, "maxLength": 8}, "minItems": 2},
    {"type": "string", "pattern": "^[0-9]+$"},
    {"type": "string", "enum": ["red", "green"]},
    {"anyOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 0}]},
    {
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"],
            }
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1}
        },
        "required": ["items"],
    },
    {"type": "string", "format": "date-time"},
]


EXPECTED: list[Any] = [
    {"a": 3},
    ["xxxxx", "xxxxx"],
    "0",
    "red",
    1.0,
    {"items": [{"ok": False}]},
    "2026-01-01T00:00:00Z",
]


@pytest.mark.parametrize(("schema", "expected"), list(zip(SCHEMAS, EXPECTED, strict=True)))
def test_generic_schemas_get_a_minimal_valid_instance(
    schema: dict[str, Any], expected: Any
) -> None:
    value = json.loads(content.structured_answer(0, "Other", schema, ""))
    assert value == expected


def _fenced_body(answer: str) -> str:
    assert answer.startswith("```") and answer.rstrip().endswith("```")
    return answer.split("\n", 1)[1].rsplit("```", 1)[0]


@pytest.mark.parametrize(
    "path", ["pkg/__init__.py", "pkg/class.py", "3d-model.py", "a.json", "pyproject.toml",
             "ci.yml", "conf.yaml", "README.md", "setup.cfg", "notes.txt", "Makefile"],
)  # fmt: skip
def test_coder_answers_are_valid_files(path: str) -> None:
    messages = [{"role": "user", "content": f"FILE: {path}\nwrite it"}]
    body = _fenced_body(content.coder_answer(0, messages, content.coder_path(messages, None)))
    if path.endswith(".py"):
        compile(body, path, "exec")
    elif path.endswith(".json"):
        json.loads(body)
    elif path.endswith(".toml"):
        tomllib.loads(body)
    elif path.endswith((".yaml", ".yml")):
        assert isinstance(yaml.safe_load(body), dict)
    assert body.strip()


def test_coder_path_prefers_the_header_and_revisions_follow_the_request() -> None:
    messages = [{"role": "user", "content": "FILE: a/b.py\n"}]
    assert content.coder_path(messages, "x/y.md") == "x/y.md"
    assert content.coder_path(messages, None) == "a/b.py"
    fix = [*messages, {"role": "user", "content": "Fix: handle empty input"}]
    assert content.coder_answer(0, messages, "a/b.py") == content.coder_answer(
        0, messages, "a/b.py"
    )
    assert content.coder_answer(0, messages, "a/b.py") != content.coder_answer(0, fix, "a/b.py")


def test_output_length_is_seeded_and_within_bounds() -> None:
    messages = [{"role": "user", "content": "hi"}]
    n = content.output_token_count(1, messages, 1000, 0.5)
    assert 500 <= n <= 1000
    assert n == content.output_token_count(1, messages, 1000, 0.5)
    lengths = {content.output_token_count(s, messages, 1000, 0.5) for s in range(20)}
    assert len(lengths) > 10
    assert content.output_token_count(0, messages, 1, 0.5) == 1
