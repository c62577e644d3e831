"""The planning agent (reasoning model): request → a plan of files."""

from __future__ import annotations

from typing import Any

from langchain_core.exceptions import ModelInvalidRequestError
from langchain_core.messages import HumanMessage, SystemMessage

from nodes.context import RunContext
from nodes.llm import ChatModels, OutputError, Usage, complete_structured
from nodes.paths import partition_paths
from nodes.schemas import FileTask, Plan
from routing.calls import CallInfo

PLAN_SYSTEM = """You are the planning agent of a code-generation team.
Turn the user's request into a plan of source files. Each file is written by a separate
coder who sees the request, this whole plan and its own file task only, so describe each
file's purpose and the exact public interface (names, signatures, formats) other files rely on.
Rules: paths are relative POSIX paths inside the project (no leading '/', no '..', no '~');
one entry per file; list a file's dependencies in depends_on; at most {max_files} files.
Answer with JSON matching the Plan schema and nothing else."""

PLAN_USER = """Request:
{request}"""


async def run_plan(
    models: ChatModels, session_id: str, request: str, ctx: RunContext
) -> dict[str, Any]:
    """Ask the reasoning model for a plan and validate its paths.

    Returns a partial state: `plan` (accepted files only), `rejected_paths`, `pending`,
    `usage`; or `status="failed"` with `error` when no valid plan came back.
    """
    usage = Usage()
    info = CallInfo(session_id=session_id, stage="plan", role="reasoning")
    messages = [
        SystemMessage(content=PLAN_SYSTEM.format(max_files=ctx.max_files)),
        HumanMessage(content=PLAN_USER.format(request=request)),
    ]
    try:
        plan = await complete_structured(
            models.for_role("reasoning"),
            Plan,
            messages,
            info,
            usage,
            retries=ctx.max_output_retries,
            max_tokens=ctx.max_tokens.get("plan"),
        )
    except (OutputError, ModelInvalidRequestError) as exc:
        return {
            "status": "failed",
            "error": f"plan: {exc}" if isinstance(exc, ModelInvalidRequestError) else str(exc),
            "pending": [],
            "usage": {"reasoning": usage.as_dict()},
        }
    accepted, rejected = partition_paths([f.path for f in plan.files], ctx.max_files)
    by_path: dict[str, FileTask] = {}
    for task in plan.files:
        by_path.setdefault(task.path, task)
    keep = set(accepted)
    files = [
        by_path[p].model_copy(
            update={"depends_on": [d for d in by_path[p].depends_on if d in keep]}
        )
        for p in accepted
        if p in by_path
    ]
    update: dict[str, Any] = {
        "plan": {"summary": plan.summary, "files": [f.model_dump() for f in files]},
        "rejected_paths": [{"path": r.path, "reason": r.reason} for r in rejected],
        "pending": [f.path for f in files],
        "round": 0,
        "usage": {"reasoning": usage.as_dict()},
    }
    if not files:
        update["status"] = "failed"
        update["error"] = "the plan had no acceptable file paths"
    return update
