"""The workflow's state schema and its reducers."""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal

from typing_extensions import TypedDict

from nodes.context import check_request

FileStatus = Literal["written", "failed"]


class FileResult(TypedDict, total=False):
    """One file as a coder agent left it."""

    path: str
    content: str
    status: FileStatus
    error: str
    round: int
    attempts: int
    trimmed: str


def merge_files(left: dict[str, FileResult], right: dict[str, FileResult]) -> dict[str, FileResult]:
    """Later results for a path replace earlier ones; other paths are kept."""
    return {**(left or {}), **(right or {})}


def add_counts(
    left: dict[str, dict[str, float]], right: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """Sum nested counters, e.g. usage[role][prompt_tokens]."""
    out = {k: dict(v) for k, v in (left or {}).items()}
    for key, counts in (right or {}).items():
        slot = out.setdefault(key, {})
        for name, value in counts.items():
            slot[name] = slot.get(name, 0) + value
    return out


def add_floats(left: dict[str, float], right: dict[str, float]) -> dict[str, float]:
    """Sum per-key floats, e.g. seconds per stage."""
    out = dict(left or {})
    for key, value in (right or {}).items():
        out[key] = out.get(key, 0.0) + value
    return out


def bounded_request(_current: str, new: str) -> str:
    """The request channel's reducer: a request over the documented limit never enters.

    It runs as the input is written, before any node, so an oversized request fails the run
    with `RequestTooLargeError` and reaches no manifest.
    """
    return check_request(new)


class InputState(TypedDict, total=False):
    """What a caller gives: the request (at most `MAX_REQUEST_CHARS`), optionally a session id."""

    request: Annotated[str, bounded_request]
    session_id: str


class SessionState(InputState, total=False):
    """Everything one session carries from plan to finalize."""

    plan: dict[str, Any]
    # Paths the planner proposed that were refused, with the reason.
    rejected_paths: Annotated[list[dict[str, str]], operator.add]
    files: Annotated[dict[str, FileResult], merge_files]
    checks: dict[str, list[str]]
    verdicts: dict[str, dict[str, str]]
    review_summary: str
    # Paths the current round sends to coders; review rounds done so far.
    pending: list[str]
    round: int
    round_started_at: float
    usage: Annotated[dict[str, dict[str, float]], add_counts]
    timings_s: Annotated[dict[str, float], add_floats]
    status: Literal["running", "ok", "partial", "failed"]
    error: str
    output_dir: str
    manifest_path: str
    # Which servers produced the files, and warnings about the plan (finalize).
    produced_by: str
    warnings: list[str]


class CodeTask(TypedDict):
    """The private input of one coder agent (one `Send`)."""

    session_id: str
    request: str
    plan: dict[str, Any]
    path: str
    round: int
    # Files in this round, for progress events.
    total: int
    comments: str
    previous: str
