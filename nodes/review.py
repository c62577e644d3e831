"""The review agent (reasoning model by default): a verdict per file."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from nodes.context import RunContext
from nodes.llm import ChatModels, Usage, complete_structured, dumps_compact
from nodes.schemas import Review
from routing.calls import CallInfo

REVIEW_SYSTEM = """You are the review agent of a code-generation team. Check each file below
against the request and the plan: correctness, consistency with the interfaces other files
use, and the static check results. Give every file a verdict: "ok", or "needs-fix" with
concrete comments a coder can act on. Answer with JSON matching the Review schema only."""

REVIEW_USER = """Request:
{request}

Plan (JSON):
{plan}

Files to review ({count}):
{files}"""

REVIEW_FILE = """### FILE: {path}
Static checks: {checks}
```
{content}
```"""


async def run_review(
    models: ChatModels,
    session_id: str,
    state: dict[str, Any],
    paths: list[str],
    ctx: RunContext,
) -> tuple[Review, dict[str, int]]:
    """Review `paths`. Raises OutputError when no valid Review comes back."""
    usage = Usage()
    role = ctx.review_on
    info = CallInfo(session_id=session_id, stage="review", role=role)
    files = state.get("files", {})
    checks = state.get("checks", {})
    blocks = [
        REVIEW_FILE.format(
            path=p,
            checks="; ".join(checks.get(p, [])) or "passed",
            content=files.get(p, {}).get("content", "")[:20000],
        )
        for p in paths
    ]
    messages = [
        SystemMessage(content=REVIEW_SYSTEM),
        HumanMessage(
            content=REVIEW_USER.format(
                request=state["request"],
                plan=dumps_compact(state.get("plan", {})),
                count=len(paths),
                files="\n\n".join(blocks),
            )
        ),
    ]
    review = await complete_structured(
        models.for_role(role),
        Review,
        messages,
        info,
        usage,
        retries=ctx.max_output_retries,
        max_tokens=ctx.max_tokens.get("review"),
    )
    return review, usage.as_dict()
