"""Running several sessions of the workflow concurrently, with progress and a summary."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph

from nodes.context import RunContext, check_request
from nodes.finalize import write_interrupted
from nodes.review import is_done
from routing.fanout import FanoutPolicy
from serving.clock import now

Progress = Callable[[str], None]


@dataclass
class SessionResult:
    """How one session ended."""

    session_id: str
    status: str
    files_ok: int = 0
    files_failed: int = 0
    rounds: int = 0
    seconds: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    rejected: list[dict[str, str]] = field(default_factory=list)
    manifest_path: str = ""
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    produced_by: str = ""
    warnings: list[str] = field(default_factory=list)


def new_session_id(prefix: str = "s") -> str:
    """A fresh, filesystem-safe session id."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _describe(node: str, update: dict[str, Any]) -> str | None:
    if node == "plan":
        files = len((update.get("plan") or {}).get("files", []))
        rejected = update.get("rejected_paths") or []
        text = f"planned {files} files"
        if rejected:
            text += f"; rejected {len(rejected)}: " + ", ".join(
                f"{r['path']!r} ({r['reason']})" for r in rejected[:5]
            )
        if update.get("error"):
            text += f"; error: {update['error']}"
        return text
    if node == "review":
        pending = update.get("pending") or []
        if update.get("error"):
            return f"review failed: {update['error']}"
        return f"reviewed; {len(pending)} to fix" if pending else "reviewed; done"
    if node == "finalize":
        return f"{update.get('status')} → {update.get('output_dir')}"
    return None


async def run_session(
    graph: CompiledStateGraph[Any, Any, Any, Any],
    request: str | None,
    session_id: str,
    *,
    context: RunContext,
    fanout: FanoutPolicy,
    workspace: Path,
    progress: Progress | None = None,
    on_code_done: Callable[[str, int, int], None] | None = None,
    on_stage: Callable[[str, float], None] | None = None,
    resume: bool = False,
) -> SessionResult:
    """Run (or resume) one session to its end; errors end this session only.

    `workspace` is the graph's (`ServerOptions.workspace`): where an ended session's done
    files and manifest go. A request over `MAX_REQUEST_CHARS` ends the session before the
    graph, so nothing of it is checkpointed.
    """
    say = progress or (lambda _msg: None)
    config: RunnableConfig = {
        "configurable": {"thread_id": session_id},
        "max_concurrency": fanout.max_concurrency(context.max_files),
        "metadata": {"session_id": session_id},
        "tags": [f"session:{session_id}"],
        "run_name": f"tandem:{session_id}",
    }
    started = now()
    result = SessionResult(session_id=session_id, status="running", started_at=started)
    inputs = None if resume else {"request": request, "session_id": session_id}
    total = 0
    done = 0
    state: dict[str, Any] | None = None
    try:
        if request is not None:
            check_request(request)
        async for mode, chunk in graph.astream(
            inputs,
            config,
            context=context,
            stream_mode=["updates", "values"],
        ):
            if not isinstance(chunk, dict):
                continue
            if mode == "values":
                state = chunk
                continue
            for node, update in chunk.items():
                if not isinstance(update, dict):
                    continue
                if on_stage and node != "code":
                    for stage, seconds in (update.get("timings_s") or {}).items():
                        on_stage(stage, seconds)
                if node in ("plan", "review") and "pending" in update:
                    # A new round of coders starts: count it from zero.
                    total, done = len(update.get("pending") or []), 0
                if node == "code":
                    done += 1
                    if on_code_done:
                        on_code_done(session_id, done, max(total, done))
                    continue
                line = _describe(node, update)
                if line:
                    say(f"[{session_id}] {node}: {line}")
    except Exception as exc:  # one session's failure must not stop the others
        result.status = "error"
        result.error = f"{type(exc).__name__}: {exc}"
        say(f"[{session_id}] error: {result.error} (resume with: tandem resume {session_id})")
        # Without a checkpointer the last streamed state is all there is to write.
        if graph.checkpointer:
            try:
                state = (await graph.aget_state(config)).values
            except Exception:
                state = None
        _write_interrupted_manifest(workspace, session_id, state or {}, result.error)
    result.finished_at = now()
    result.seconds = result.finished_at - started
    if state:
        _fill(result, state)
    return result


def _fill(result: SessionResult, state: dict[str, Any]) -> None:
    result.files_ok = sum(1 for p in state.get("files", {}) if is_done(p, state))
    result.files_failed = len(state.get("plan", {}).get("files", [])) - result.files_ok
    result.rounds = int(state.get("round", 0))
    result.rejected = list(state.get("rejected_paths", []))
    result.manifest_path = str(state.get("manifest_path", ""))
    result.usage = dict(state.get("usage", {}))
    result.produced_by = str(state.get("produced_by") or "")
    result.warnings = list(state.get("warnings") or [])
    if result.status != "error":
        result.status = str(state.get("status", "unknown"))
        result.error = str(state.get("error") or "")


def _write_interrupted_manifest(
    workspace: Path, session_id: str, state: dict[str, Any], error: str
) -> None:
    try:
        write_interrupted(state, session_id, workspace, error)
    except Exception as exc:
        print(f"[{session_id}] could not write manifest: {exc}", file=sys.stderr)


async def run_many(
    graph: CompiledStateGraph[Any, Any, Any, Any],
    requests: Sequence[tuple[str, str]],
    *,
    context: RunContext,
    fanout: FanoutPolicy,
    workspace: Path,
    progress: Progress | None = None,
    on_code_done: Callable[[str, int, int], None] | None = None,
    on_stage: Callable[[str, float], None] | None = None,
    concurrent: bool = True,
    arrivals_s: Sequence[float] | None = None,
) -> list[SessionResult]:
    """Run sessions `(session_id, request)` concurrently (or one after another).

    `arrivals_s`, one per request, delays each session's start to that many seconds after
    the call (a session due while an earlier one still runs starts when its turn comes).
    """
    if arrivals_s is not None and len(arrivals_s) != len(requests):
        raise ValueError(f"{len(arrivals_s)} arrival times for {len(requests)} sessions")
    t0 = now()

    async def one(index: int, sid: str, req: str) -> SessionResult:
        if arrivals_s is not None:
            delay = t0 + arrivals_s[index] - now()
            if delay > 0:
                await asyncio.sleep(delay)
        return await run_session(
            graph,
            req,
            sid,
            context=context,
            fanout=fanout,
            workspace=workspace,
            progress=progress,
            on_code_done=on_code_done,
            on_stage=on_stage,
        )

    if concurrent:
        return list(
            await asyncio.gather(*(one(i, sid, req) for i, (sid, req) in enumerate(requests)))
        )
    return [await one(i, sid, req) for i, (sid, req) in enumerate(requests)]


def format_table(results: Sequence[SessionResult]) -> str:
    """The final summary: per session, then per endpoint."""
    lines = [
        f"{'session':<22} {'status':<11} {'ok':>4} {'failed':>6} {'rounds':>6} "
        f"{'seconds':>9}  rejected",
    ]
    for r in results:
        lines.append(
            f"{r.session_id:<22} {r.status:<11} {r.files_ok:>4} {r.files_failed:>6} {r.rounds:>6} "
            f"{r.seconds:>9.1f}  {len(r.rejected)}"
        )
        if r.error:
            lines.append(f"{'':<22} error: {r.error}")
        lines.extend(f"{'':<22} warning: {w}" for w in r.warnings)
    produced_by = sorted({r.produced_by for r in results if r.produced_by})
    if produced_by:
        lines.append("")
        lines.extend(f"files by: {line}" for line in produced_by)
    totals: dict[str, dict[str, float]] = {}
    for r in results:
        for role, counts in r.usage.items():
            slot = totals.setdefault(role, {})
            for k, v in counts.items():
                slot[k] = slot.get(k, 0) + v
    lines.append("")
    lines.append(f"{'endpoint':<12} {'calls':>7} {'prompt tok':>11} {'output tok':>11}")
    for role in sorted(r for r in totals if r != "review_role"):
        c = totals[role]
        lines.append(
            f"{role:<12} {int(c.get('calls', 0)):>7} {int(c.get('prompt_tokens', 0)):>11} "
            f"{int(c.get('completion_tokens', 0)):>11}"
        )
    if totals.get("review_role"):
        reviews = ", ".join(f"{r} {int(n)}" for r, n in sorted(totals["review_role"].items()))
        lines.append(f"review rounds by role: {reviews}")
    return "\n".join(lines)


def read_request_file(path: str) -> str:
    """A request from a file (UTF-8)."""
    return Path(path).read_text(encoding="utf-8")
