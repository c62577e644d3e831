"""The emulator's answers parse as the workflow's schemas and as files of the right kind, and
have exactly the size the token spec charges (4 characters a token, each part rounded up)."""

from __future__ import annotations

import configparser
import itertools
import json
import tomllib
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nodes.schemas import Plan, Review
from serving.emulator import content
from serving.emulator.engine import count_tokens


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


def _assert_valid_file(path: str, body: str) -> None:
    if path.endswith(".py"):
        compile(body, path, "exec")
    elif path.endswith(".json"):
        json.loads(body)
    elif path.endswith(".toml"):
        assert isinstance(tomllib.loads(body), dict)
    elif path.endswith((".yaml", ".yml")):
        assert isinstance(yaml.safe_load(body), dict)
    elif path.endswith(".cfg"):
        configparser.ConfigParser().read_string(body)
    assert body.strip()
    assert "```" not in body  # the coder's fence parser stops at the first one


PATHS = ["pkg/__init__.py", "pkg/class.py", "3d-model.py", "a.json", "pyproject.toml", "ci.yml",
         "conf.yaml", "README.md", "setup.cfg", "notes.txt", "Makefile"]  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tokens", [0, 40, 600, 1015])
def test_coder_answers_are_valid_files(path: str, tokens: int) -> None:
    messages = [{"role": "user", "content": f"FILE: {path}\nwrite it"}]
    answer = content.coder_answer(0, messages, content.coder_path(messages, None), tokens)
    _assert_valid_file(path, _fenced_body(answer))
    if tokens >= 40:
        assert len(answer) == 4 * tokens


_SEGMENT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")),
    min_size=1,
    max_size=12,
).filter(lambda s: "/" not in s and s.strip() == s and "`" not in s)
_EXT = st.sampled_from(["py", "json", "toml", "yaml", "yml", "md", "txt", "cfg", ""])


@st.composite
def _paths(draw: st.DrawFn) -> str:
    parts = draw(st.lists(_SEGMENT, min_size=1, max_size=3))
    ext = draw(_EXT)
    return "/".join(parts) + (f".{ext}" if ext else "")


@settings(max_examples=300, deadline=None)
@given(path=_paths(), tokens=st.integers(0, 9000), seed=st.integers(0, 2**31))
def test_coder_answers_have_the_drawn_size_and_valid_syntax(
    path: str, tokens: int, seed: int
) -> None:
    messages = [{"role": "user", "content": f"FILE: {path}\nwrite it"}]
    answer = content.coder_answer(seed, messages, path, tokens)
    _assert_valid_file(path, _fenced_body(answer))
    smallest = content.coder_answer(seed, messages, path, 0)
    # Exactly the drawn size, unless the smallest valid file is larger (content wins).
    assert len(answer) == max(4 * tokens, len(smallest))
    assert content.part_tokens(answer) == max(tokens, count_tokens(smallest))


def test_coder_file_size_matches_a_real_file_of_that_many_tokens() -> None:
    messages = [{"role": "user", "content": "FILE: pkg/util.py\nwrite it"}]
    body = _fenced_body(content.coder_answer(0, messages, "pkg/util.py", 1000))
    functions = body.count("\ndef ")
    assert 30 <= functions <= 50  # about 100 characters a documented function
    assert sum(line.startswith("#") for line in body.splitlines()) <= 3  # padding stays small


def test_coder_path_prefers_the_header_and_revisions_follow_the_request() -> None:
    messages = [{"role": "user", "content": "FILE: a/b.py\n"}]
    assert content.coder_path(messages, "x/y.md") == "x/y.md"
    assert content.coder_path(messages, None) == "a/b.py"
    fix = [*messages, {"role": "user", "content": "Fix: handle empty input"}]
    for tokens in (0, 300):
        answer = content.coder_answer(0, messages, "a/b.py", tokens)
        assert answer == content.coder_answer(0, messages, "a/b.py", tokens)
        assert answer != content.coder_answer(0, fix, "a/b.py", tokens)


def test_output_length_is_seeded_and_within_bounds() -> None:
    messages = [{"role": "user", "content": "hi"}]
    n = content.output_token_count(1, messages, 1000, 0.5)
    assert 500 <= n <= 1000
    assert n == content.output_token_count(1, messages, 1000, 0.5)
    lengths = {content.output_token_count(s, messages, 1000, 0.5) for s in range(20)}
    assert len(lengths) > 10
    assert content.output_token_count(0, messages, 1, 0.5) == 1


def _plan_request(n: int) -> str:
    return "Files: " + ", ".join(f"s00/file_{i}.py" for i in range(n))


@settings(max_examples=150, deadline=None)
@given(files=st.integers(0, 60), tokens=st.integers(0, 40_000), seed=st.integers(0, 99))
def test_plans_validate_and_reach_the_drawn_size(files: int, tokens: int, seed: int) -> None:
    schema = Plan.model_json_schema()
    text = content.structured_answer(seed, "Plan", schema, _plan_request(files), tokens)
    plan = Plan.model_validate_json(text)
    smallest = content.structured_answer(seed, "Plan", schema, _plan_request(files), 0)
    bare = Plan.model_validate_json(smallest)
    room = 4000 - len(bare.summary)
    room += sum(2000 - len(f.purpose) + 4000 - len(f.interface) for f in bare.files)
    # Padded to the drawn size within the fields' maxLength; never shorter than valid JSON.
    assert len(text) == max(len(smallest), min(4 * tokens, len(smallest) + room))
    assert len(plan.files) == (files or len(content.DEFAULT_PLAN_FILES))
    assert [f.path for f in plan.files] == [f.path for f in bare.files]


@settings(max_examples=150, deadline=None)
@given(files=st.integers(0, 40), tokens=st.integers(0, 40_000), seed=st.integers(0, 99))
def test_reviews_validate_and_reach_the_drawn_size(files: int, tokens: int, seed: int) -> None:
    schema = Review.model_json_schema()
    text = content.structured_answer(seed, "Review", schema, _review_text(files, "s"), tokens)
    review = Review.model_validate_json(text)
    assert len(review.verdicts) == files
    smallest = content.structured_answer(seed, "Review", schema, _review_text(files, "s"), 0)
    capacity = (
        len(smallest)
        + 4000 * (files + 1)
        - sum(len(v.comments) for v in Review.model_validate_json(smallest).verdicts)
        - len(Review.model_validate_json(smallest).summary)
    )
    # Padded to the drawn size within the fields' maxLength; never shorter than valid JSON.
    assert len(text) == max(len(smallest), min(4 * tokens, capacity))


def test_padding_is_spread_over_the_free_text_fields() -> None:
    text = content.structured_answer(3, "Review", {}, _review_text(20, "s"), 2000)
    review = Review.model_validate_json(text)
    sizes = [len(v.comments) for v in review.verdicts]
    assert min(sizes) > 250 and max(sizes) - min(sizes) < 100
    assert review.verdicts[0].comments.startswith(("Looks correct. The", "Handle empty"))


def test_generic_schemas_pad_only_unconstrained_strings() -> None:
    schema = {
        "type": "object",
        "properties": {
            "note": {"type": "string", "maxLength": 50},
            "code": {"type": "string", "pattern": "^[0-9]+$"},
            "n": {"type": "integer"},
        },
        "required": ["note", "code", "n"],
    }
    value = json.loads(content.structured_answer(0, "Other", schema, "", 100))
    assert len(value["note"]) == 50 and value["code"] == "0" and value["n"] == 1
    bare = content.structured_answer(0, "Other", {"type": "string"}, "", 25)
    assert len(bare) == 100 and isinstance(json.loads(bare), str)


@settings(max_examples=200, deadline=None)
@given(
    target=st.integers(1, 6000),
    frac=st.sampled_from([0.0, 0.6, 0.25]),
    cap=st.integers(1, 8000),
    structured=st.booleans(),
    cuts=st.lists(st.integers(0, 20_000), max_size=12),
)
def test_answers_follow_the_token_spec(
    target: int, frac: float, cap: int, structured: bool, cuts: list[int]
) -> None:
    messages = [{"role": "user", "content": "Write app/a.py and app/b.py"}]
    fmt = (
        {"type": "json_schema", "json_schema": {"name": "Plan", "schema": Plan.model_json_schema()}}
        if structured
        else None
    )
    answer = content.build_answer(
        0, messages, response_format=fmt, file_header=None, target_tokens=target,
        reasoning_frac=frac, max_tokens=cap,
    )  # fmt: skip
    reasoning_tokens = round(target * frac)
    assert answer.tokens == content.part_tokens(answer.reasoning) + count_tokens(answer.content)
    assert answer.tokens <= cap
    if answer.finish_reason == "length":
        assert answer.reasoning == "" and answer.tokens == cap
    else:
        # Content is sized to the target less reasoning (the size tests above check that).
        assert answer.content == content.content_text(
            0, messages, fmt, None, target - reasoning_tokens
        )
        if structured:
            Plan.model_validate_json(answer.content)
        else:
            smallest = content.part_tokens(content.content_text(0, messages, fmt, None, 0))
            assert answer.content_tokens == max(target - reasoning_tokens, smallest)
        room = cap - answer.content_tokens
        assert answer.reasoning_tokens == min(reasoning_tokens, room)
    # Streaming: engine token k is 4 characters of reasoning, then of content, in order.
    bounds = sorted({0, answer.tokens, *(c % (answer.tokens + 1) for c in cuts)})
    deltas = [d for a, b in itertools.pairwise(bounds) for d in answer.deltas(a, b)]
    assert "".join(d.get("reasoning", "") for d in deltas) == answer.reasoning
    assert "".join(d.get("content", "") for d in deltas) == answer.content
    k = answer.tokens - 1
    (last,) = answer.deltas(k, k + 1)
    assert last == {"content": answer.content[4 * (answer.content_tokens - 1) :]}


def test_reasoning_has_exactly_the_tokens_asked_without_a_cap() -> None:
    messages = [{"role": "user", "content": "plan it"}]
    for tokens in (0, 1, 7, 20_000):
        assert len(content.reasoning_text(1, messages, tokens)) == 4 * tokens
