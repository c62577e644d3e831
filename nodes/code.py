"""The coder agent (coder model): writes one file of the plan."""

from __future__ import annotations

from typing import Any

from langchain_core.exceptions import ModelInvalidRequestError
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage

from nodes.context import RunContext
from nodes.llm import ChatModels, Usage, complete_text, dumps_compact, strip_code_fence
from routing.calls import CallInfo
from serving.protocol import CODER_FILE_MARKER

# Largest file a coder may write, in characters; a longer answer fails that file only (the
# static checks and the reviewer would only see its first part anyway).
MAX_FILE_CHARS = 1_000_000

CODER_SYSTEM = """You are a coder agent in a team. Each agent writes exactly one file of the
plan below. Follow the plan's interfaces exactly so the files work together.
Answer with the complete content of your file in one fenced code block and nothing else."""

# Shared by every coder of a session, byte for byte, so the server's prefix cache hits.
CODER_SHARED = """Request:
{request}

Plan (JSON):
{plan}"""

CODER_TASK = (
    CODER_FILE_MARKER
    + """{path}
Purpose: {purpose}
Depends on: {depends_on}
Public interface: {interface}"""
)
# Last in the prompt: small models answer with prose unless the final line asks for the file.
CODER_WRITE = """

Write the complete file {path} now, in one fenced code block."""

CODER_FIX = """
The reviewer asked for changes to your previous version:
{comments}

Previous version:
```
{previous}
```"""


def coder_messages(task: dict[str, Any]) -> list[BaseMessage]:
    """Messages for one coder: the shared prefix first, the file's own task last."""
    plan = task["plan"]
    spec = next((f for f in plan.get("files", []) if f["path"] == task["path"]), None) or {}
    own = CODER_TASK.format(
        path=task["path"],
        purpose=spec.get("purpose", ""),
        depends_on=", ".join(spec.get("depends_on", [])) or "nothing",
        interface=spec.get("interface", "") or "(none given)",
    )
    if task.get("comments"):
        own += CODER_FIX.format(comments=task["comments"], previous=task.get("previous", ""))
    own += CODER_WRITE.format(path=task["path"])
    return [
        SystemMessage(content=CODER_SYSTEM),
        HumanMessage(
            content=CODER_SHARED.format(request=task["request"], plan=dumps_compact(plan))
        ),
        HumanMessage(content=own),
    ]


async def run_code(models: ChatModels, task: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Write one file; an empty answer is retried, then the file is marked failed.

    A file over `MAX_FILE_CHARS` is marked failed with its size (the session goes on).

    Transport errors propagate, so the run fails and `resume` re-runs only this file.
    """
    usage = Usage()
    path = task["path"]
    info = CallInfo(session_id=task["session_id"], stage="code", role="coder", file=path)
    messages = coder_messages(task)
    content = ""
    attempts = 0
    refused = ""
    for attempts in range(1, ctx.max_output_retries + 2):  # noqa: B007
        try:
            text, _ = await complete_text(
                models.for_role("coder"),
                messages,
                info,
                usage,
                max_tokens=ctx.max_tokens.get("code"),
            )
        except ModelInvalidRequestError as exc:
            # The server refused this request (e.g. longer than its context): it would
            # refuse it again, so the file fails and the other files go on.
            refused = f"the coder server refused the request: {exc}"
            break
        content = strip_code_fence(text) if text.strip() else ""
        if content.strip():
            break
        messages = [*messages, HumanMessage(content="Your answer was empty. Write the file.")]
    result: dict[str, Any] = {"path": path, "round": task["round"], "attempts": attempts}
    if len(content) > MAX_FILE_CHARS:
        error = f"file is {len(content):,} characters; the limit is {MAX_FILE_CHARS:,}"
        result.update(content="", status="failed", error=error)
    elif content.strip():
        result.update(content=content, status="written")
    else:
        error = refused or f"empty code after {attempts} attempts"
        result.update(content="", status="failed", error=error)
    return {"files": {path: result}, "usage": {"coder": usage.as_dict()}}
