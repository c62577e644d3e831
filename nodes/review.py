"""The review agent (reasoning model by default): a verdict per file."""

from __future__ import annotations

from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from nodes.context import RunContext
from nodes.llm import ChatModels, Usage, complete_structured, dumps_compact
from nodes.schemas import Review
from routing.calls import CallInfo, Role

# Review roles in order of preference: the reasoning model is the quality default.
REVIEW_CANDIDATES: tuple[Role, ...] = ("reasoning", "coder")
# Expected answer length when the run sets no cap for the review stage.
DEFAULT_REVIEW_TOKENS = 1024

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


def review_role(models: ChatModels | Any, ctx: RunContext) -> Role:
    """The model that reviews this call.

    A fixed `review_on` is used as is. With "auto", models that can estimate (the router's
    `RoutedModels.choose_role`) pick the role that would finish the review first; others
    (fakes, `StaticModels`) get the reasoning model.
    """
    if ctx.review_on != "auto":
        return ctx.review_on
    choose = getattr(models, "choose_role", None)
    if choose is None:
        return "reasoning"
    role: Role = choose(REVIEW_CANDIDATES, ctx.max_tokens.get("review") or DEFAULT_REVIEW_TOKENS)
    return role


async def run_review(
    models: ChatModels,
    session_id: str,
    state: dict[str, Any],
    paths: list[str],
    ctx: RunContext,
) -> tuple[Review, dict[str, int], Role]:
    """Review `paths`. Returns (review, usage, role that reviewed).

    Raises:
        OutputError: no valid Review came back.
    """
    usage = Usage()
    role = review_role(models, ctx)
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
    return review, usage.as_dict(), role
