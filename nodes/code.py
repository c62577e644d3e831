"""The coder agent (coder model): writes one file of the plan."""

from __future__ import annotations

from typing import Any

from langchain_core.exceptions import ModelInvalidRequestError
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from nodes.check import check_file
from nodes.context import PromptStyle, RunContext
from nodes.llm import (
    ChatModels,
    Usage,
    complete_answer,
    dumps_compact,
    finish_reason,
    split_reasoning,
    strip_code_fence,
)
from routing.calls import CallInfo
from serving.protocol import CODER_FILE_MARKER

# Longest answer, in lines, that is trimmed back to a compiling prefix (each try compiles the
# prefix again, so the work grows with the square of the length).
MAX_TRIM_LINES = 1000

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


# The "small" prompt style (`RunContext.prompt_style`), for models of a few hundred million
# parameters: a short system prompt, one worked example as a prior turn (such a model copies
# the shape and length of an answer it has seen), then the request and this file's task only.
# The whole plan is left out: a 135M model echoes its JSON instead of writing code.
CODER_SMALL_SYSTEM = """You write one Python file of a small project. Answer with the file's \
code only, in one ```python block.
Keep it short and simple: one class or a few functions, each method a few lines. \
Use only the Python standard library. No example usage, no tests, no comments."""

CODER_SMALL_EXAMPLE_TASK = (
    "Request: a calculator: calc/ops.py with add and sub, and calc/main.py that uses it\n"
    + CODER_FILE_MARKER
    + """calc/ops.py
Purpose: The operations add and sub.
Depends on: nothing
Public interface: class Calculator: def add(self, a: float, b: float) -> float; \
def sub(self, a: float, b: float) -> float
Write calc/ops.py."""
)
CODER_SMALL_EXAMPLE_ANSWER = """```python
class Calculator:
    def add(self, a: float, b: float) -> float:
        return a + b

    def sub(self, a: float, b: float) -> float:
        return a - b
```"""

CODER_SMALL_FIX = """
The reviewer asked for changes to your previous version: {comments}
Previous version:
```python
{previous}
```"""
CODER_SMALL_WRITE = """
Write {path}."""


def coder_messages(task: dict[str, Any], style: PromptStyle = "full") -> list[BaseMessage]:
    """Messages for one coder: the shared prefix first, the file's own task last.

    With `style="small"`, a short prompt with one worked example instead (no shared prefix).
    """
    plan = task["plan"]
    spec = next((f for f in plan.get("files", []) if f["path"] == task["path"]), None) or {}
    own = CODER_TASK.format(
        path=task["path"],
        purpose=spec.get("purpose", ""),
        depends_on=", ".join(spec.get("depends_on", [])) or "nothing",
        interface=spec.get("interface", "") or "(none given)",
    )
    if style == "small":
        return _small_coder_messages(task, own)
    if _fixing(task):
        own += CODER_FIX.format(comments=_fix_reason(task), previous=task.get("previous", ""))
    own += CODER_WRITE.format(path=task["path"])
    return [
        SystemMessage(content=CODER_SYSTEM),
        HumanMessage(
            content=CODER_SHARED.format(request=task["request"], plan=dumps_compact(plan))
        ),
        HumanMessage(content=own),
    ]


def _fixing(task: dict[str, Any]) -> bool:
    """A fix round: the file comes back with comments or with a previous version."""
    return bool(task.get("comments") or task.get("previous"))


def _fix_reason(task: dict[str, Any]) -> str:
    return str(task.get("comments") or "") or "(no comments given; improve the file)"


def _small_coder_messages(task: dict[str, Any], own: str) -> list[BaseMessage]:
    own = f"Request: {task['request']}\n{own}"
    if _fixing(task):
        own += CODER_SMALL_FIX.format(
            comments=_fix_reason(task), previous=str(task.get("previous", "")).rstrip("\n")
        )
    own += CODER_SMALL_WRITE.format(path=task["path"])
    return [
        SystemMessage(content=CODER_SMALL_SYSTEM),
        HumanMessage(content=CODER_SMALL_EXAMPLE_TASK),
        AIMessage(content=CODER_SMALL_EXAMPLE_ANSWER),
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
    messages = coder_messages(task, ctx.prompt_style)
    content = ""
    attempts = 0
    refused = ""
    cut = False
    for attempts in range(1, ctx.max_output_retries + 2):  # noqa: B007
        try:
            answer = await complete_answer(
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
        text, _ = split_reasoning(answer)
        content = strip_code_fence(text) if text.strip() else ""
        cut = finish_reason(answer) == "length"
        if content.strip():
            break
        messages = [*messages, HumanMessage(content="Your answer was empty. Write the file.")]
    result: dict[str, Any] = {"path": path, "round": task["round"], "attempts": attempts}
    if len(content) > MAX_FILE_CHARS:
        error = f"file is {len(content):,} characters; the limit is {MAX_FILE_CHARS:,}"
        result.update(content="", status="failed", error=error)
    elif content.strip():
        trimmed = trim_to_compiling(path, content) if cut else None
        if trimmed is not None:
            content, note = trimmed
            result["trimmed"] = note
        result.update(content=content, status="written")
    else:
        error = refused or f"empty code after {attempts} attempts"
        result.update(content="", status="failed", error=error)
    return {"files": {path: result}, "usage": {"coder": usage.as_dict()}}


def trim_to_compiling(path: str, content: str) -> tuple[str, str] | None:
    """Cut a Python answer that ended at max_tokens back to its longest compiling prefix.

    A model stopped by max_tokens leaves an unfinished tail (an open string or bracket, half
    a statement) after code that may be whole. Only the tail is dropped: whole lines are
    removed from the end until the rest passes the same check the reviewer sees.

    Returns:
        (the prefix, a note for the manifest saying how much was cut), or None when `path`
        is not Python, already passes its check, is over `MAX_TRIM_LINES`, or no non-empty
        prefix compiles.
    """
    if not path.endswith(".py") or not check_file(path, content):
        return None
    lines = content.splitlines(keepends=True)
    if len(lines) > MAX_TRIM_LINES:
        return None
    for keep in range(len(lines) - 1, 0, -1):
        prefix = "".join(lines[:keep]).rstrip() + "\n"
        if prefix.strip() and not check_file(path, prefix):
            kept = prefix.count("\n")
            note = (
                f"cut at max_tokens; kept the first {kept} of {len(lines)} lines, "
                "the longest prefix that compiles"
            )
            return prefix, note
    return None
