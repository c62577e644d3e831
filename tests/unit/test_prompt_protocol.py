"""The prompts the agents write and what the emulator reads in them agree, through
`serving.protocol`: file markers, schema names and headers come from one place."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import BaseMessage

from nodes import code, plan, review
from nodes.schemas import Plan, Review
from routing.calls import CallInfo
from serving import protocol
from serving.emulator import app as emulator_app
from serving.emulator import content

PATHS = ["pkg/a.py", "pkg/sub dir/b.json", "README.md"]


def _wire(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    """Chat messages as the OpenAI client sends them."""
    roles = {"system": "system", "human": "user", "ai": "assistant"}
    return [{"role": roles[m.type], "content": m.content} for m in messages]


def test_the_emulator_reviews_every_file_section_the_review_prompt_writes() -> None:
    blocks = [review.REVIEW_FILE.format(path=p, checks="passed", content="x = 1\n") for p in PATHS]
    user = review.REVIEW_USER.format(
        request="r", plan="{}", count=len(PATHS), files="\n\n".join(blocks)
    )
    answer = content.review_answer(0, user)
    assert [v["path"] for v in answer["verdicts"]] == PATHS


def test_the_emulator_finds_the_file_a_coder_prompt_asks_for() -> None:
    for path in PATHS:
        task = {
            "request": "r",
            "path": path,
            "plan": {"files": [{"path": p, "purpose": "p"} for p in PATHS]},
        }
        messages = _wire(code.coder_messages(task))
        assert content.coder_path(messages, None) == path


def test_schema_names_sent_are_the_ones_the_emulator_answers_with_a_plan_or_review() -> None:
    plan_model = plan.plan_schema(max_files=10, named=2)
    review_model = review.review_schema(PATHS)
    assert plan_model.__name__ == protocol.PLAN_SCHEMA
    assert review_model.__name__ == protocol.REVIEW_SCHEMA
    request = "make pkg/a.py and pkg/c.py"
    planned = Plan.model_validate_json(
        content.structured_answer(0, plan_model.__name__, {}, request)
    )
    assert [f.path for f in planned.files] == ["pkg/a.py", "pkg/c.py"]
    section = review.REVIEW_FILE.format(path="pkg/a.py", checks="passed", content="")
    reviewed = Review.model_validate_json(
        content.structured_answer(0, review_model.__name__, {}, section)
    )
    assert [v.path for v in reviewed.verdicts] == ["pkg/a.py"]


def test_the_headers_the_router_sends_are_the_ones_the_emulator_reads() -> None:
    headers = CallInfo("s1", "code", "coder", "pkg/a.py").headers()
    assert headers == {
        emulator_app.SESSION_HEADER: "s1",
        emulator_app.STAGE_HEADER: "code",
        emulator_app.FILE_HEADER: "pkg/a.py",
    }
    assert emulator_app.SESSION_HEADER is protocol.SESSION_HEADER
