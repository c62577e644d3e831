"""Running several sessions of the workflow concurrently, with progress events.

A session runs as one asyncio task. Cancelling that task ends the session as `interrupted`:
its manifest is written with the files finished so far and a result comes back, so a caller
that cancels every session (Ctrl-C) still has a summary and the checkpoints to resume from.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph

from nodes.context import RunContext, check_request
from nodes.finalize import write_interrupted
from nodes.review import is_done
from routing.fanout import FanoutPolicy
from serving.clock import now

Progress = Callable[[str], None]

INTERRUPTED = "interrupted by the user (Ctrl-C)"


@dataclass
class SessionResult:
    """How one session ended.

    `seconds` is on the run's clock (emulated seconds under the virtual clock); `wall_s` is
    real time.
    """

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
    wall_s: float = 0.0


@dataclass(frozen=True)
class SessionEvent:
    """One step of a session, for live progress.

    `kind` is "stage" when the session enters `stage`, "files" when a coder finishes a file
    (`done` of `total` in this round; `file` and `round` name it when the graph sends
    `file_done` events), "ended" when the session is over (`text` is its status).
    """

    session_id: str
    kind: Literal["stage", "files", "ended"]
    stage: str = ""
    done: int = 0
    total: int = 0
    text: str = ""
    file: str = ""
    round: int = 0


OnEvent = Callable[[SessionEvent], None]


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
    on_event: OnEvent | None = None,
    resume: bool = False,
) -> SessionResult:
    """Run (or resume) one session to its end; errors end this session only.

    Args:
        graph: The compiled workflow.
        request: What to build; None when resuming.
        session_id: The session's thread id and folder name.
        context: The run's limits.
        fanout: The coder fan-out policy.
        workspace: The graph's (`ServerOptions.workspace`): where an ended session's done
            files and manifest go.
        progress: Called with one readable line per stage.
        on_code_done: Called with (session_id, done, total) as coders finish files.
        on_stage: Called with (stage, seconds) for each timed stage.
        on_event: Called with each `SessionEvent`, for live progress.
        resume: Continue from the checkpoint instead of starting.

    Returns:
        The result; `status` is "interrupted" when the task was cancelled.

    A request over `MAX_REQUEST_CHARS` ends the session before the graph, so nothing of it
    is checkpointed.
    """
    say = progress or (lambda _msg: None)
    emit = on_event or (lambda _event: None)
    config: RunnableConfig = {
        "configurable": {"thread_id": session_id},
        "max_concurrency": fanout.max_concurrency(context.max_files),
        "metadata": {"session_id": session_id},
        "tags": [f"session:{session_id}"],
        "run_name": f"tandem:{session_id}",
    }
    started = now()
    wall_started = time.monotonic()
    result = SessionResult(session_id=session_id, status="running", started_at=started)
    inputs = None if resume else {"request": request, "session_id": session_id}
    files = _FileCount(session_id, emit, on_code_done)
    state: dict[str, Any] | None = None
    emit(SessionEvent(session_id, "stage", stage="resume" if resume else "plan"))
    try:
        if request is not None:
            check_request(request)
        async for mode, chunk in graph.astream(
            inputs,
            config,
            context=context,
            stream_mode=["updates", "values", "custom"],
        ):
            if not isinstance(chunk, dict):
                continue
            if mode == "values":
                state = chunk
                continue
            if mode == "custom":
                files.custom(chunk)
                continue
            for node, update in chunk.items():
                if not isinstance(update, dict):
                    continue
                if on_stage and node != "code":
                    for stage, seconds in (update.get("timings_s") or {}).items():
                        on_stage(stage, seconds)
                if node in ("plan", "review") and "pending" in update:
                    files.new_round(len(update.get("pending") or []))
                if node == "code":
                    files.code_update()
                    continue
                line = _describe(node, update)
                if line:
                    say(f"[{session_id}] {node}: {line}")
                emit(
                    SessionEvent(
                        session_id, "stage", stage=_next_stage(node, update), text=line or ""
                    )
                )
    except asyncio.CancelledError:
        # Cancelling this task is how a caller interrupts the session (Ctrl-C); what is
        # finished goes on disk and the result comes back, so the caller can summarise.
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        result.status = "interrupted"
        result.error = INTERRUPTED
        say(f"[{session_id}] interrupted (resume with: tandem resume {session_id})")
        state = await _saved_state(graph, config, state)
        _write_interrupted_manifest(
            workspace, session_id, state or {}, result.error, status="interrupted"
        )
    except Exception as exc:  # one session's failure must not stop the others
        result.status = "error"
        result.error = f"{type(exc).__name__}: {exc}"
        say(f"[{session_id}] error: {result.error} (resume with: tandem resume {session_id})")
        state = await _saved_state(graph, config, state)
        _write_interrupted_manifest(workspace, session_id, state or {}, result.error)
    result.finished_at = now()
    result.seconds = result.finished_at - started
    result.wall_s = time.monotonic() - wall_started
    if state:
        _fill(result, state)
    emit(SessionEvent(session_id, "ended", stage="done", text=result.status))
    return result


class _FileCount:
    """Files done in the current coder round, from custom `file_done` events when the graph
    sends them, else from the `code` node's updates."""

    def __init__(
        self,
        session_id: str,
        emit: OnEvent,
        on_code_done: Callable[[str, int, int], None] | None,
    ) -> None:
        self.session_id = session_id
        self.emit = emit
        self.on_code_done = on_code_done
        self.total = 0
        self.done = 0
        self.from_custom = False

    def new_round(self, total: int) -> None:
        """A new round of coders starts: count it from zero."""
        self.total, self.done = total, 0

    def code_update(self) -> None:
        """The `code` node finished a file (counted unless custom events count them)."""
        if not self.from_custom:
            self._count(self.done + 1, self.total)

    def custom(self, chunk: dict[str, Any]) -> None:
        """A custom stream event: `file_done` counts a file, `stage` names the next stage."""
        if chunk.get("event") == "file_done":
            self.from_custom = True
            self._count(
                int(chunk.get("done", self.done + 1)),
                int(chunk.get("total", self.total)),
                file=str(chunk.get("file") or ""),
                round_=int(chunk.get("round") or 0),
            )
        elif chunk.get("event") == "stage" and chunk.get("stage"):
            self.emit(SessionEvent(self.session_id, "stage", stage=str(chunk["stage"])))

    def _count(self, done: int, total: int, *, file: str = "", round_: int = 0) -> None:
        self.done = done
        total = max(total, done)
        if self.on_code_done:
            self.on_code_done(self.session_id, done, total)
        self.emit(
            SessionEvent(
                self.session_id,
                "files",
                stage="code",
                done=done,
                total=total,
                file=file,
                round=round_,
            )
        )


def _next_stage(node: str, update: dict[str, Any]) -> str:
    """The stage a session enters after `node` produced `update`."""
    if node in ("plan", "review"):
        return "code" if update.get("pending") else "finalize"
    if node == "finalize":
        return "done"
    return node


async def _saved_state(
    graph: CompiledStateGraph[Any, Any, Any, Any],
    config: RunnableConfig,
    streamed: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """The checkpointed state, or (without a checkpointer) the last streamed one."""
    if not graph.checkpointer:
        return streamed
    try:
        return dict((await graph.aget_state(config)).values)
    except Exception:
        return streamed


def _fill(result: SessionResult, state: dict[str, Any]) -> None:
    result.files_ok = sum(1 for p in state.get("files", {}) if is_done(p, state))
    result.files_failed = len(state.get("plan", {}).get("files", [])) - result.files_ok
    result.rounds = int(state.get("round", 0))
    result.rejected = list(state.get("rejected_paths", []))
    result.manifest_path = str(state.get("manifest_path", ""))
    result.usage = dict(state.get("usage", {}))
    result.produced_by = str(state.get("produced_by") or "")
    result.warnings = list(state.get("warnings") or [])
    if result.status not in ("error", "interrupted"):
        result.status = str(state.get("status", "unknown"))
        result.error = str(state.get("error") or "")


def _write_interrupted_manifest(
    workspace: Path,
    session_id: str,
    state: dict[str, Any],
    error: str,
    *,
    status: Literal["error", "interrupted"] = "error",
) -> None:
    try:
        write_interrupted(state, session_id, workspace, error, status=status)
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
    on_event: OnEvent | None = None,
    concurrent: bool = True,
    arrivals_s: Sequence[float] | None = None,
    stop: asyncio.Event | None = None,
) -> list[SessionResult]:
    """Run sessions `(session_id, request)` concurrently (or one after another).

    `arrivals_s`, one per request, delays each session's start to that many seconds after
    the call (a session due while an earlier one still runs starts when its turn comes).
    When `stop` is set, sessions not started yet are not started and running ones are
    cancelled; each comes back `interrupted` with its manifest written.
    """
    if arrivals_s is not None and len(arrivals_s) != len(requests):
        raise ValueError(f"{len(arrivals_s)} arrival times for {len(requests)} sessions")
    t0 = now()

    async def one(index: int, sid: str, req: str) -> SessionResult:
        if arrivals_s is not None:
            delay = t0 + arrivals_s[index] - now()
            if delay > 0:
                await asyncio.sleep(delay)
        if stop is not None and stop.is_set():
            return SessionResult(session_id=sid, status="interrupted", error=INTERRUPTED)
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
            on_event=on_event,
        )

    if not concurrent:
        results = []
        for index, (sid, req) in enumerate(requests):
            async with _cancelled_when(stop, []) as tasks:
                task = asyncio.create_task(one(index, sid, req))
                tasks.append(task)
                results.append(await task)
        return results
    async with _cancelled_when(stop, []) as tasks:
        tasks.extend(
            asyncio.create_task(one(index, sid, req)) for index, (sid, req) in enumerate(requests)
        )
        return list(await asyncio.gather(*tasks))


@contextlib.asynccontextmanager
async def _cancelled_when(
    stop: asyncio.Event | None, tasks: list[asyncio.Task[SessionResult]]
) -> Any:
    """Yield `tasks`, a list to fill; each of them is cancelled once `stop` is set."""
    if stop is None:
        yield tasks
        return

    async def watch() -> None:
        await stop.wait()
        for task in tasks:
            task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield tasks
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
