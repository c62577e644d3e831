"""The planning agent (reasoning model): request → a plan of files."""

from __future__ import annotations

import re
from typing import Any

from langchain_core.exceptions import ModelInvalidRequestError
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from pydantic import Field, JsonValue, create_model

from nodes.context import RunContext
from nodes.llm import ChatModels, OutputError, Usage, complete_structured
from nodes.paths import partition_paths
from nodes.schemas import FileTask, Plan, bounded_text
from routing.calls import CallInfo
from serving.protocol import PLAN_SCHEMA

PLAN_SYSTEM = """You are the planning agent of a code-generation team.
Turn the user's request into a plan of source files. Each file is written by a separate
coder who sees the request, this whole plan and its own file task only, so describe each
file's purpose and the exact public interface (names, signatures, formats) other files rely on.
Rules: paths are relative POSIX paths inside the project (no leading '/', no '..', no '~');
one entry per file; list a file's dependencies in depends_on; at most {max_files} files.
Answer with JSON matching the Plan schema and nothing else."""

PLAN_USER = """Request:
{request}"""
# Appended when the request names files: small models copy a list far better than they
# pick paths out of prose.
PLAN_NAMED = """

Files the request names: {paths}"""

# One worked example as a prior turn: a small instruct model follows the shape of an answer
# it has seen much better than a description of the schema.
PLAN_EXAMPLE_REQUEST = (
    "a calculator: calc/ops.py with add and sub, and calc/main.py that uses it"
    + PLAN_NAMED.format(paths="calc/ops.py, calc/main.py")
)
PLAN_EXAMPLE_ANSWER = (
    '{"summary":"A calculator: its operations and a command line that uses them.",'
    '"files":[{"path":"calc/ops.py","purpose":"The operations add and sub.","depends_on":[],'
    '"interface":"def add(a: float, b: float) -> float; def sub(a: float, b: float) -> float"},'
    '{"path":"calc/main.py","purpose":"Command line: reads two numbers, prints their sum and '
    'difference using calc.ops.","depends_on":["calc/ops.py"],"interface":"def main() -> None"}]}'
)
# With the "small" prompt style (`RunContext.prompt_style`), the most characters of the
# summary and of each purpose and interface (guided decoding): a small model's plan whose
# text starts looping ("a todo list: todo store.py, a todo list: ...") still ends as JSON.
SMALL_PLAN_TEXT_CHARS = 160

# A file path as a request names it: relative, with a known extension, not part of a longer
# path (an absolute or `~/` path is left out whole, never cut into a relative one).
NAMED_PATH_RE = re.compile(
    r"(?<![\w/.~-])((?:[\w-][\w.-]*/)*[\w-][\w.-]*\."
    r"(?:py|pyi|json|toml|yaml|yml|md|txt|cfg|ini|sh|js|ts|html|css|sql))(?![\w/-])"
)


def named_paths(request: str) -> list[str]:
    """The distinct file paths a request names, in order of first mention."""
    return list(dict.fromkeys(m.group(1) for m in NAMED_PATH_RE.finditer(request)))


def plan_schema(max_files: int, named: int, text_chars: int | None = None) -> type[Plan]:
    """`Plan` whose JSON schema asks for between `named` and `max_files` files, and with
    `text_chars` ends the summary and each purpose and interface within that many characters.

    The bounds guide decoding only (json_schema_extra): a longer plan is still cut to
    `max_files` with a reason per dropped path, as for any other model.
    """
    bounds: dict[str, JsonValue] = {"maxItems": max_files}
    if named:
        bounds["minItems"] = min(named, max_files)
    task: type[FileTask] = FileTask
    if text_chars is not None:
        task = create_model(
            "FileTask",
            __base__=FileTask,
            __doc__=FileTask.__doc__,
            **bounded_text(FileTask, ("purpose", "interface"), text_chars),
        )
    bounded: type[Plan] = create_model(
        PLAN_SCHEMA,
        __base__=Plan,
        files=(list[task], Field(min_length=1, max_length=200, json_schema_extra=bounds)),  # type: ignore[valid-type]
        **bounded_text(Plan, ("summary",), text_chars),
    )
    return bounded


def plan_messages(request: str, max_files: int, named: list[str]) -> list[BaseMessage]:
    """System prompt, the worked example, then the request (with the files it names)."""
    user = PLAN_USER.format(request=request)
    if named:
        user += PLAN_NAMED.format(paths=", ".join(named))
    return [
        SystemMessage(content=PLAN_SYSTEM.format(max_files=max_files)),
        HumanMessage(content=PLAN_USER.format(request=PLAN_EXAMPLE_REQUEST)),
        AIMessage(content=PLAN_EXAMPLE_ANSWER),
        HumanMessage(content=user),
    ]


async def run_plan(
    models: ChatModels, session_id: str, request: str, ctx: RunContext
) -> dict[str, Any]:
    """Ask the reasoning model for a plan and validate its paths.

    Returns a partial state: `plan` (accepted files only), `rejected_paths`, `pending`,
    `usage`; or `status="failed"` with `error` when no valid plan came back.
    """
    usage = Usage()
    info = CallInfo(session_id=session_id, stage="plan", role="reasoning")
    named = named_paths(request)
    messages = plan_messages(request, ctx.max_files, named)
    small = ctx.prompt_style == "small"
    try:
        plan = await complete_structured(
            models.for_role("reasoning"),
            plan_schema(ctx.max_files, len(named), SMALL_PLAN_TEXT_CHARS if small else None),
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
