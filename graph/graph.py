"""Wiring of the plan → parallel code → check → review → finalize workflow.

The nodes are the module-level functions below; each agent's rules live with the agent in
`nodes/` (the verdict and round rules in `nodes.review`). `build_graph` binds the nodes to
their dependencies (`GraphDeps`) and wires them. Importing this module reads no environment:
`make_graph`, which `langgraph.json` names, reads the settings when the server first needs
the graph.

Besides state updates, the nodes emit LangGraph `custom` stream events (`stream_mode="custom"`):
`{"event": "stage", "stage", "session_id", "seconds"}` when a stage ends, and
`{"event": "file_done", "session_id", "file", "round", "done", "total", "ok"}` per coder.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, ParamSpec

from langchain_core.runnables import RunnableConfig
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Send

from graph.state import CodeTask, InputState, SessionState
from nodes.check import check_file
from nodes.code import run_code
from nodes.context import RunContext, ServerOptions
from nodes.finalize import describe_backend, run_finalize
from nodes.llm import ChatModels
from nodes.plan import run_plan
from nodes.review import review_round
from nodes.workspace import check_session_id
from routing.fanout import FanoutPolicy
from serving.clock import now

P = ParamSpec("P")
Update = dict[str, Any]


@dataclass
class GraphDeps:
    """What the nodes of one compiled graph share: models, defaults, server options.

    Attributes:
        models: The chat models per role, or a zero-argument callable that makes them on
            first use (so a server can build the graph before its endpoints are up).
        defaults: Run context for the fields a run's own context leaves unset.
        options: Server-side knobs (workspace, review prompt size).
    """

    models: ChatModels | Callable[[], ChatModels]
    defaults: RunContext
    options: ServerOptions
    _resolved: ChatModels | None = field(default=None, init=False)
    # Files finished per (session, round) in this process, for `file_done` events.
    _done: dict[tuple[str, int], int] = field(default_factory=dict, init=False)

    def chat_models(self) -> ChatModels:
        """The chat models, made on first use when given as a factory."""
        if self._resolved is None:
            models = self.models
            self._resolved = models() if not hasattr(models, "for_role") else models
        assert self._resolved is not None
        return self._resolved

    def context(self, runtime: Runtime[RunContext] | None) -> RunContext:
        """The run's context: the defaults with the fields the run set."""
        return self.defaults.merged(runtime.context if runtime is not None else None)

    def count_done(self, session_id: str, round_: int) -> int:
        """Count one more file finished in this round; return the count."""
        key = (session_id, round_)
        self._done[key] = self._done.get(key, 0) + 1
        return self._done[key]

    def forget_round(self, session_id: str, round_: int) -> None:
        """Drop the round's count once all its coders are back."""
        self._done.pop((session_id, round_), None)


def timed(
    stage: str, *, announce: bool = True
) -> Callable[[Callable[P, Awaitable[Update]]], Callable[P, Awaitable[Update]]]:
    """Add the node's seconds to `timings_s[stage]`; with `announce`, emit a `stage` event."""

    def wrap(node: Callable[P, Awaitable[Update]]) -> Callable[P, Awaitable[Update]]:
        @functools.wraps(node)
        async def run(*args: P.args, **kwargs: P.kwargs) -> Update:
            started = now()
            update = await node(*args, **kwargs)
            seconds = now() - started
            update["timings_s"] = {**update.get("timings_s", {}), stage: seconds}
            if announce:
                state = args[0] if args and isinstance(args[0], dict) else {}
                session_id = update.get("session_id") or state.get("session_id")
                get_stream_writer()(
                    {"event": "stage", "stage": stage, "session_id": session_id, "seconds": seconds}
                )
            return update

        return run

    return wrap


def session_id_of(state: SessionState, config: RunnableConfig) -> str:
    """The session id: the input's, else the thread id, else a fresh one."""
    sid = state.get("session_id") or (config.get("configurable") or {}).get("thread_id")
    return check_session_id(str(sid or uuid.uuid4().hex[:12]))


@timed("plan")
async def plan(
    state: SessionState, config: RunnableConfig, runtime: Runtime[RunContext], *, deps: GraphDeps
) -> Update:
    """Plan the files (reasoning model) and start round 0 with all of them pending."""
    session_id = session_id_of(state, config)
    if not (state.get("request") or "").strip():
        return {"session_id": session_id, "status": "failed", "error": "empty request"}
    update = await run_plan(deps.chat_models(), session_id, state["request"], deps.context(runtime))
    update["session_id"] = session_id
    update.setdefault("status", "running")
    update["round_started_at"] = now()
    return update


@timed("code_agents", announce=False)
async def code(task: CodeTask, runtime: Runtime[RunContext], *, deps: GraphDeps) -> Update:
    """One coder agent writes one file; a `file_done` event reports the round's progress."""
    update = await run_code(deps.chat_models(), dict(task), deps.context(runtime))
    result = update["files"][task["path"]]
    runtime.stream_writer(
        {
            "event": "file_done",
            "session_id": task["session_id"],
            "file": task["path"],
            "round": task["round"],
            "done": deps.count_done(task["session_id"], task["round"]),
            "total": task["total"],
            "ok": result["status"] == "written",
        }
    )
    return update


async def check(state: SessionState, *, deps: GraphDeps) -> Update:
    """Static checks of the round's files; the round's wall time is the `code` stage."""
    files = state.get("files", {})
    checks = dict(state.get("checks", {}))
    for path in state.get("pending", []):
        checks[path] = check_file(path, files.get(path, {}).get("content", ""))
    deps.forget_round(str(state.get("session_id")), int(state.get("round", 0)))
    code_wall = now() - float(state.get("round_started_at", now()))
    return {"checks": checks, "timings_s": {"code": code_wall}}


@timed("review")
async def review(state: SessionState, runtime: Runtime[RunContext], *, deps: GraphDeps) -> Update:
    """Review the round (`nodes.review.review_round`); a new round restarts the round clock."""
    update = await review_round(
        deps.chat_models(), state, deps.context(runtime), deps.options.review_batch_chars
    )
    if "round" in update:
        update["round_started_at"] = now()
    return update


@timed("finalize")
async def finalize(
    state: SessionState, config: RunnableConfig, runtime: Runtime[RunContext], *, deps: GraphDeps
) -> Update:
    """Write the files and the manifest under the workspace."""
    # Blocking file I/O off the event loop (langgraph dev refuses blocking calls in it);
    # on a virtual clock `serving.clock.run` makes the default executor run it inline.
    return await asyncio.to_thread(
        run_finalize,
        dict(state),
        session_id_of(state, config),
        deps.options.workspace,
        deps.context(runtime),
        describe_backend(deps.chat_models()),
    )


def fan_out(state: SessionState) -> list[Send] | Literal["finalize"]:
    """One `code` task per pending file, or on to finalize when none is pending."""
    pending = state.get("pending", [])
    if not pending or state.get("status") == "failed":
        return "finalize"
    files = state.get("files", {})
    verdicts = state.get("verdicts", {})
    fixing = bool(state.get("round"))
    return [
        Send(
            "code",
            CodeTask(
                session_id=str(state["session_id"]),
                request=state["request"],
                plan=state.get("plan", {}),
                path=path,
                round=int(state.get("round", 0)),
                total=len(pending),
                comments=verdicts.get(path, {}).get("comments", "") if fixing else "",
                previous=files.get(path, {}).get("content", "") if fixing else "",
            ),
        )
        for path in pending
    ]


def build_graph(
    models: ChatModels | Callable[[], ChatModels],
    *,
    defaults: RunContext | None = None,
    options: ServerOptions | None = None,
    checkpointer: Any = None,
    fanout: FanoutPolicy | None = None,
    name: str = "tandem",
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Compile the workflow.

    Args:
        models: The chat models per role (`nodes.llm.RoutedModels` in production, fakes in
            tests), or a zero-argument callable called on first use.
        defaults: Run context used where a run's own context leaves a field unset; the
            context schema (LangGraph Studio's form) shows these as its defaults.
        options: Server-side knobs: workspace, review prompt size.
        checkpointer: A LangGraph checkpointer (e.g. AsyncSqliteSaver) or None.
        fanout: Per-run fan-out policy; its cap becomes the run's `max_concurrency`.
        name: The compiled graph's name.
    """
    base = defaults or RunContext()
    deps = GraphDeps(models=models, defaults=base, options=options or ServerOptions())
    policy = fanout or FanoutPolicy(max_parallel=base.max_parallel_agents)
    builder = StateGraph(
        SessionState,
        context_schema=RunContext.with_defaults(base),
        input_schema=InputState,
    )
    builder.add_node("plan", functools.partial(plan, deps=deps))
    builder.add_node("code", functools.partial(code, deps=deps), input_schema=CodeTask)
    builder.add_node("check", functools.partial(check, deps=deps))
    builder.add_node("review", functools.partial(review, deps=deps))
    builder.add_node("finalize", functools.partial(finalize, deps=deps))
    builder.add_edge(START, "plan")
    builder.add_conditional_edges("plan", fan_out, ["code", "finalize"])
    builder.add_edge("code", "check")
    builder.add_edge("check", "review")
    builder.add_conditional_edges("review", fan_out, ["code", "finalize"])
    builder.add_edge("finalize", END)
    compiled = builder.compile(checkpointer=checkpointer, name=name)
    # The fan-out cap travels as the run's top-level max_concurrency (LangGraph ignores it
    # under `configurable`); callers may still pass their own.
    return compiled.with_config(max_concurrency=policy.max_concurrency(base.max_files))


@functools.cache
def make_graph() -> CompiledStateGraph[Any, Any, Any, Any]:
    """The server's graph (`langgraph.json`), built from `TANDEM_*` settings on first use.

    Its router and models are built on the first run; from then on its `tandem_` metrics are
    on the server's HTTP app at /tandem/metrics, and on `TANDEM_METRICS_PORT` when set.

    Raises:
        ValueError: a `TANDEM_*` setting is invalid, naming it (the server answers with it
            instead of exiting).
    """
    from graph.runtime import build_runtime, serve_runtime
    from graph.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise ValueError(str(exc)) from None

    def server_models() -> Any:
        runtime = build_runtime(settings)
        serve_runtime(runtime)
        return runtime.models

    return build_graph(
        server_models,
        defaults=settings.run_context(),
        options=ServerOptions(workspace=settings.workspace),
        name="tandem",
    )
