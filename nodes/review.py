"""The review agent (reasoning model by default): a verdict per file."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.exceptions import ModelInvalidRequestError
from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import Field, JsonValue, create_model

from nodes.context import RunContext
from nodes.llm import ChatModels, OutputError, Usage, complete_structured, dumps_compact
from nodes.schemas import FileVerdict, Review, bounded_text
from routing.calls import ROLES, CallInfo, Role
from serving.protocol import REVIEW_FILE_MARKER, REVIEW_SCHEMA

# Review roles in order of preference: the reasoning model is the quality default.
REVIEW_CANDIDATES: tuple[Role, ...] = ("reasoning", "coder")
# Expected answer length when the run sets no cap for the review stage.
DEFAULT_REVIEW_TOKENS = 1024
# Prompt budgeting against the server's context window: code runs about 3-4 characters per
# token, so 3 errs on the safe side; the reserve covers the chat template and schema.
CHARS_PER_TOKEN = 3
PROMPT_RESERVE_TOKENS = 512
MIN_REVIEW_CHARS = 2000
# With the "small" prompt style, the most characters of each review comment and of the
# summary (guided decoding): a small model that starts repeating itself inside a string would
# otherwise run to max_tokens and leave the JSON unterminated.
SMALL_REVIEW_TEXT_CHARS = 200

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

REVIEW_FILE = (
    REVIEW_FILE_MARKER
    + """{path}
Static checks: {checks}
```
{content}
```"""
)


# The usage entry that counts review calls by the role that answered them.
REVIEW_ROLE_USAGE = "review_role"
UNREVIEWED = "unreviewed"
UNREVIEWED_COMMENT = "the reviewer gave no verdict for this file (asked twice)"
REASON_CHARS = 500  # of a failed review's reason kept in each file's comments
NEEDS_FIX = "needs-fix"


def is_done(path: str, state: Mapping[str, Any]) -> bool:
    """The one rule for "a file is done": its coder wrote it and review did not turn it down.

    Turned down means sent back (`needs-fix`) or left without a verdict (`unreviewed`). A
    written file the session ended before reviewing counts as done: its content is final
    unless a review asks for a fix.
    """
    status = state.get("files", {}).get(path, {}).get("status")
    verdict = state.get("verdicts", {}).get(path, {}).get("verdict")
    return bool(status == "written" and verdict not in (NEEDS_FIX, UNREVIEWED))


def review_calls(usage: Mapping[str, Mapping[str, float]]) -> dict[Role, int]:
    """Review calls answered per role, from a session's usage (every role, zeros included)."""
    counts = usage.get(REVIEW_ROLE_USAGE, {})
    return {role: int(counts.get(role, 0)) for role in ROLES}


def review_share(calls: Mapping[Role, int]) -> dict[Role, float] | None:
    """Each role's share of the review calls, to 4 places; None when there were none."""
    total = sum(calls.values())
    if total <= 0:
        return None
    return {role: round(n / total, 4) for role, n in calls.items()}


def merge_verdicts(
    paths: Sequence[str], given: dict[str, FileVerdict]
) -> dict[str, dict[str, str]]:
    """Verdict entries for `paths`: the reviewer's, or `unreviewed` where it gave none."""
    return {
        path: {"verdict": given[path].verdict, "comments": given[path].comments}
        if path in given
        else {"verdict": UNREVIEWED, "comments": UNREVIEWED_COMMENT}
        for path in paths
    }


def review_schema(paths: Sequence[str], text_chars: int | None = None) -> type[Review]:
    """`Review` whose JSON schema asks for one verdict per path of `paths`, by name.

    Guided decoding then cannot skip a file or invent a path (small models do both), and
    with `text_chars` each comment and the summary end within that many characters. The
    bounds guide decoding only: validation stays as lenient as `Review`'s, and a path
    without a verdict is the caller's to handle.
    """
    verdict: type[FileVerdict] = create_model(
        "FileVerdict",
        __base__=FileVerdict,
        path=(str, Field(max_length=400, json_schema_extra={"enum": list(paths)})),
        **bounded_text(FileVerdict, ("comments",), text_chars),
    )
    count: dict[str, JsonValue] = {"minItems": len(paths), "maxItems": len(paths)}
    bounded: type[Review] = create_model(
        REVIEW_SCHEMA,
        __base__=Review,
        verdicts=(list[verdict], Field(json_schema_extra=count)),  # type: ignore[valid-type]
        **bounded_text(Review, ("summary",), text_chars),
    )
    return bounded


def review_role(models: ChatModels | Any, ctx: RunContext) -> Role:
    """The model that reviews this call.

    A fixed `review_on` is used as is. With "auto", the reasoning model reviews unless the
    router estimates that the review would wait on it longer than `review_delay_budget_s`
    before its first token and that the coder would finish it sooner
    (`RoutedModels.choose_role`). Models that cannot estimate (fakes, `StaticModels`) get
    the reasoning model.
    """
    if ctx.review_on != "auto":
        return ctx.review_on
    choose = getattr(models, "choose_role", None)
    if choose is None:
        return "reasoning"
    role: Role = choose(
        REVIEW_CANDIDATES,
        ctx.max_tokens.get("review") or DEFAULT_REVIEW_TOKENS,
        delay_budget_s=ctx.review_delay_budget_s,
    )
    return role


def batch_paths(paths: Sequence[str], sizes: dict[str, int], budget_chars: int) -> list[list[str]]:
    """Group `paths` in order into batches whose file text stays within `budget_chars`."""
    batches: list[list[str]] = []
    used = 0
    for path in paths:
        size = sizes.get(path, 0)
        if batches and used + size <= budget_chars:
            batches[-1].append(path)
            used += size
        else:
            batches.append([path])
            used = size
    return batches


async def review_budget_chars(
    models: ChatModels | Any, role: Role, ctx: RunContext, batch_chars: int
) -> int:
    """Characters of prompt one review call may use: `batch_chars`, lowered to fit the
    reviewer's context window when the server reports it (vLLM's `max_model_len`)."""
    budget = batch_chars
    lookup = getattr(models, "context_tokens", None)
    if lookup is not None:
        window = await lookup(role)
        if window:
            answer = ctx.max_tokens.get("review") or window // 4
            budget = min(budget, (window - answer - PROMPT_RESERVE_TOKENS) * CHARS_PER_TOKEN)
    return max(budget, MIN_REVIEW_CHARS)


def _plan_for_prompt(plan: dict[str, Any], budget_chars: int) -> str:
    full = dumps_compact(plan)
    if len(full) <= budget_chars // 2:
        return full
    # A large plan: keep its summary and the file list, not every interface.
    slim = {
        "summary": plan.get("summary", ""),
        "files": [
            {"path": f["path"], "purpose": f.get("purpose", "")} for f in plan.get("files", [])
        ],
    }
    return dumps_compact(slim)[: budget_chars // 2]


class ReviewFailed(Exception):
    """No valid review came back (raised from the call's error); the calls made for it still
    count (`usage`, `role`)."""

    def __init__(
        self, cause: OutputError | ModelInvalidRequestError, usage: dict[str, int], role: Role
    ):
        super().__init__(str(cause))
        self.usage = usage
        self.role = role


def _add_usage(usage_by_role: dict[str, dict[str, int]], role: Role, usage: dict[str, int]) -> None:
    """Add one review's usage to `usage_by_role`, with the review calls `role` answered."""
    for key, counts in ((role, usage), (REVIEW_ROLE_USAGE, {role: usage["calls"]})):
        slot = usage_by_role.setdefault(key, {})
        for name, value in counts.items():
            slot[name] = slot.get(name, 0) + value


async def run_review(
    models: ChatModels,
    session_id: str,
    state: dict[str, Any],
    paths: list[str],
    ctx: RunContext,
    batch_chars: int,
) -> tuple[Review, dict[str, int], Role]:
    """Review `paths`, in as many concurrent calls as the reviewer's context needs.

    Returns (merged review, usage, role that reviewed); `batch_chars` bounds one call's prompt.

    Raises:
        ReviewFailed: a batch got no valid Review back (`OutputError`), or the server refused
            a call (`ModelInvalidRequestError`, e.g. still too long); it carries what the
            calls made so far used.
    """
    usage = Usage()
    role = review_role(models, ctx)
    info = CallInfo(session_id=session_id, stage="review", role=role)
    files = state.get("files", {})
    checks = state.get("checks", {})
    budget = await review_budget_chars(models, role, ctx, batch_chars)
    plan_text = _plan_for_prompt(state.get("plan", {}), budget)
    fixed = len(REVIEW_SYSTEM) + len(REVIEW_USER) + len(state["request"]) + len(plan_text)
    file_budget = max(MIN_REVIEW_CHARS // 2, budget - fixed)
    per_file = max(200, file_budget - 300)
    contents = {p: files.get(p, {}).get("content", "")[:per_file] for p in paths}
    sizes = {p: len(c) + len(p) + 100 for p, c in contents.items()}

    async def ask(batch: list[str]) -> Review:
        blocks = [
            REVIEW_FILE.format(
                path=p, checks="; ".join(checks.get(p, [])) or "passed", content=contents[p]
            )
            for p in batch
        ]
        messages = [
            SystemMessage(content=REVIEW_SYSTEM),
            HumanMessage(
                content=REVIEW_USER.format(
                    request=state["request"],
                    plan=plan_text,
                    count=len(batch),
                    files="\n\n".join(blocks),
                )
            ),
        ]
        return await complete_structured(
            models.for_role(role),
            review_schema(batch, SMALL_REVIEW_TEXT_CHARS if ctx.prompt_style == "small" else None),
            messages,
            info,
            usage,
            retries=ctx.max_output_retries,
            max_tokens=ctx.max_tokens.get("review"),
            retry_when_cut=len(batch) == 1,
        )

    async def one(batch: list[str]) -> Review:
        """Review `batch`; where the verdicts overrun the review cap, half as many per call."""
        try:
            return await ask(batch)
        except OutputError as exc:
            if not exc.cut_at_max_tokens or len(batch) < 2:
                raise
        half = len(batch) // 2
        return _merged(await asyncio.gather(one(batch[:half]), one(batch[half:])))

    try:
        reviews = await asyncio.gather(*(one(b) for b in batch_paths(paths, sizes, file_budget)))
    except (OutputError, ModelInvalidRequestError) as exc:
        raise ReviewFailed(exc, usage.as_dict(), role) from exc
    return _merged(reviews), usage.as_dict(), role


def _merged(reviews: Sequence[Review]) -> Review:
    """One Review of several calls' verdicts, their summaries joined."""
    return Review(
        verdicts=[v for r in reviews for v in r.verdicts],
        summary=" ".join(r.summary for r in reviews)[:4000],
    )


async def review_round(
    models: ChatModels,
    state: Mapping[str, Any],
    ctx: RunContext,
    batch_chars: int,
) -> dict[str, Any]:
    """Review this round's files and decide the next round: the reviewer's rules in one place.

    Written files get the reviewer's verdict (asked once more for any it left out; still
    none: `unreviewed`, never ok). A file that failed to be written, or whose static checks
    found problems, is `needs-fix` whatever the reviewer said. Files that need a fix go back
    to the coders while rounds remain (`pending`, `round`); otherwise `pending` is empty.

    Returns:
        A partial state update: `verdicts`, `pending`, maybe `round`, `usage`,
        `review_summary`, or `error` when the reviewer gave no valid answer.
    """
    files = state.get("files", {})
    checks = state.get("checks", {})
    pending = list(state.get("pending", []))
    session_id = str(state["session_id"])
    to_review = [p for p in pending if files.get(p, {}).get("status") == "written"]
    verdicts = dict(state.get("verdicts", {}))
    update: dict[str, Any] = {}
    if to_review:
        # Usage per role, plus the review calls each role answered (review_on may be "auto");
        # calls whose answer was unusable count too.
        usage_by_role: dict[str, dict[str, int]] = {}
        try:
            review, usage, role = await run_review(
                models, session_id, dict(state), to_review, ctx, batch_chars
            )
        except ReviewFailed as exc:
            # No verdict came: the files are unreviewed (never ok), and the session ends
            # with the reason.
            _add_usage(usage_by_role, exc.role, exc.usage)
            reason = f"the review gave no valid answer: {exc}"[:REASON_CHARS]
            for path in to_review:
                verdicts[path] = {"verdict": UNREVIEWED, "comments": reason}
            return {
                "error": f"review: {exc}",
                "pending": [],
                "verdicts": verdicts,
                "usage": usage_by_role,
            }
        _add_usage(usage_by_role, role, usage)
        given = {v.path: v for v in review.verdicts}
        missing = [p for p in to_review if p not in given]
        if missing:
            try:
                again, usage_again, role_again = await run_review(
                    models, session_id, dict(state), missing, ctx, batch_chars
                )
            except ReviewFailed as exc:
                _add_usage(usage_by_role, exc.role, exc.usage)  # still unreviewed, below
            else:
                _add_usage(usage_by_role, role_again, usage_again)
                given.update({v.path: v for v in again.verdicts if v.path in missing})
        verdicts.update(merge_verdicts(to_review, given))
        update["usage"] = usage_by_role
        update["review_summary"] = review.summary
    for path in pending:
        problems = checks.get(path, [])
        if files.get(path, {}).get("status") != "written":
            comments = files.get(path, {}).get("error", "not written")
            verdicts[path] = {"verdict": NEEDS_FIX, "comments": comments}
        elif problems:
            # The check's findings always reach the coder, with the reviewer's comments
            # (which a small model may leave empty) when it asked for a fix too.
            found = "; ".join(problems)
            said = verdicts.get(path, {})
            said_text = str(said.get("comments") or "") if said.get("verdict") == NEEDS_FIX else ""
            comments = f"{said_text}; {found}" if said_text and found not in said_text else found
            verdicts[path] = {"verdict": NEEDS_FIX, "comments": comments}
    update["verdicts"] = verdicts
    needs_fix = [p for p in pending if verdicts.get(p, {}).get("verdict") == NEEDS_FIX]
    rounds_done = int(state.get("round", 0))
    if needs_fix and rounds_done < ctx.max_review_rounds:
        update.update(pending=needs_fix, round=rounds_done + 1)
    else:
        update["pending"] = []
    return update
