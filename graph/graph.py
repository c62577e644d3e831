"""Wiring of the plan → parallel code → check → review → finalize workflow."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, Literal

from langchain_core.exceptions import ModelInvalidRequestError
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import RetryPolicy, Send

from graph.state import CodeTask, InputState, SessionState, add_counts
from nodes.check import check_file
from nodes.code import run_code
from nodes.context import RunContext
from nodes.finalize import describe_backend, run_finalize
from nodes.llm import ChatModels, OutputError
from nodes.paths import UnsafePathError
from nodes.plan import run_plan
from nodes.review import merge_verdicts, run_review
from nodes.workspace import check_session_id
from routing.fanout import FanoutPolicy
from serving.clock import now


# Transient failures (HTTP errors after the client's own retries, a restarted server) are
# retried by LangGraph; bad model output is handled inside the nodes and never retried here.
def _transient(exc: Exception) -> bool:
    """Worth another attempt: not bad output, not a request the server refused as invalid."""
    if isinstance(exc, OutputError | UnsafePathError | ModelInvalidRequestError):
        return False
    status = getattr(exc, "status_code", None)
    # 4xx other than timeout/conflict/rate limit will fail the same way again.
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429))


LLM_RETRY = RetryPolicy(max_attempts=3, retry_on=_transient)


def _session_id(state: dict[str, Any], config: RunnableConfig) -> str:
    sid = state.get("session_id") or (config.get("configurable") or {}).get("thread_id")
    return check_session_id(str(sid or uuid.uuid4().hex[:12]))


def build_graph(
    models: ChatModels | Any,
    *,
    defaults: RunContext | None = None,
    checkpointer: Any = None,
    fanout: FanoutPolicy | None = None,
    name: str = "tandem",
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """Compile the workflow.

    Args:
        models: The chat models per role (`nodes.llm.RoutedModels` in production, fakes in
            tests). A zero-argument callable is accepted and called on first use, so that a
            server can import the module before its endpoints are up.
        defaults: Run context used where a run's own context leaves a field unset.
        checkpointer: A LangGraph checkpointer (e.g. AsyncSqliteSaver) or None.
        fanout: Per-run fan-out policy; its cap becomes the run's `max_concurrency`.
        name: The compiled graph's name.
    """
    base = defaults or RunContext()
    base.validate()
    policy = fanout or FanoutPolicy(max_parallel=base.max_parallel_agents)
    resolved: list[ChatModels] = []

    def get_models() -> ChatModels:
        if not resolved:
            resolved.append(
                models() if callable(models) and not hasattr(models, "for_role") else models
            )
        return resolved[0]

    def ctx_of(runtime: Runtime[RunContext] | None) -> RunContext:
        return base.merged(runtime.context if runtime is not None else None)

    async def plan(
        state: SessionState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        started = now()
        session_id = _session_id(dict(state), config)
        if not (state.get("request") or "").strip():
            return {"session_id": session_id, "status": "failed", "error": "empty request"}
        update = await run_plan(get_models(), session_id, state["request"], ctx_of(runtime))
        update["session_id"] = session_id
        update.setdefault("status", "running")
        update["timings_s"] = {"plan": now() - started}
        update["round_started_at"] = now()
        return update

    async def code(task: CodeTask, runtime: Runtime[RunContext]) -> dict[str, Any]:
        started = now()
        update = await run_code(get_models(), dict(task), ctx_of(runtime))
        update["timings_s"] = {"code_agents": now() - started}
        return update

    async def check(state: SessionState) -> dict[str, Any]:
        files = state.get("files", {})
        checks = dict(state.get("checks", {}))
        for path in state.get("pending", []):
            checks[path] = check_file(path, files.get(path, {}).get("content", ""))
        code_wall = now() - float(state.get("round_started_at", now()))
        return {"checks": checks, "timings_s": {"code": code_wall}}

    async def review(state: SessionState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        started = now()
        ctx = ctx_of(runtime)
        files = state.get("files", {})
        checks = state.get("checks", {})
        pending = list(state.get("pending", []))
        to_review = [p for p in pending if files.get(p, {}).get("status") == "written"]
        verdicts = dict(state.get("verdicts", {}))
        update: dict[str, Any] = {}
        if to_review:
            try:
                review_out, usage, role = await run_review(
                    get_models(), str(state["session_id"]), dict(state), to_review, ctx
                )
            except (OutputError, ModelInvalidRequestError) as exc:
                return {
                    "error": f"review: {exc}",
                    "pending": [],
                    "timings_s": {"review": now() - started},
                }
            # Usage per role, plus which role reviewed (review_on may be "auto").
            update["usage"] = {role: usage, "review_role": {role: 1}}
            update["review_summary"] = review_out.summary
            given = {v.path: v for v in review_out.verdicts}
            missing = [p for p in to_review if p not in given]
            if missing:
                # Asked once more for the files left out; still none: `unreviewed`, never ok.
                with contextlib.suppress(OutputError, ModelInvalidRequestError):
                    again, usage_again, role_again = await run_review(
                        get_models(), str(state["session_id"]), dict(state), missing, ctx
                    )
                    update["usage"] = add_counts(
                        update["usage"],
                        {role_again: dict(usage_again), "review_role": {role_again: 1}},
                    )
                    given.update({v.path: v for v in again.verdicts if v.path in missing})
            verdicts.update(merge_verdicts(to_review, given))
        for path in pending:
            problems = checks.get(path, [])
            if files.get(path, {}).get("status") != "written":
                verdicts[path] = {
                    "verdict": "needs-fix",
                    "comments": files.get(path, {}).get("error", "not written"),
                }
            elif problems and verdicts.get(path, {}).get("verdict") != "needs-fix":
                verdicts[path] = {"verdict": "needs-fix", "comments": "; ".join(problems)}
        needs_fix = [p for p in pending if verdicts.get(p, {}).get("verdict") == "needs-fix"]
        rounds_done = int(state.get("round", 0))
        if needs_fix and rounds_done < ctx.max_review_rounds:
            update.update(pending=needs_fix, round=rounds_done + 1, round_started_at=now())
        else:
            update["pending"] = []
        update["verdicts"] = verdicts
        update["timings_s"] = {"review": now() - started}
        return update

    async def finalize(
        state: SessionState, config: RunnableConfig, runtime: Runtime[RunContext]
    ) -> dict[str, Any]:
        started = now()
        session_id = _session_id(dict(state), config)
        # Blocking file I/O off the event loop (langgraph dev refuses blocking calls in it);
        # on a virtual clock `serving.clock.run` makes the default executor run it inline.
        backend = describe_backend(get_models())
        out = await asyncio.to_thread(
            run_finalize, dict(state), session_id, ctx_of(runtime), backend
        )
        out["timings_s"] = {"finalize": now() - started}
        return out

    def fan_out(state: SessionState) -> list[Send] | Literal["finalize"]:
        pending = state.get("pending", [])
        if not pending or state.get("status") == "failed":
            return "finalize"
        files = state.get("files", {})
        verdicts = state.get("verdicts", {})
        return [
            Send(
                "code",
                CodeTask(
                    session_id=str(state["session_id"]),
                    request=state["request"],
                    plan=state.get("plan", {}),
                    path=path,
                    round=int(state.get("round", 0)),
                    comments=verdicts.get(path, {}).get("comments", "")
                    if state.get("round")
                    else "",
                    previous=files.get(path, {}).get("content", "") if state.get("round") else "",
                ),
            )
            for path in pending
        ]

    builder = StateGraph(SessionState, context_schema=RunContext, input_schema=InputState)
    # LangGraph's add_node overloads do not cover (state, config, runtime) signatures.
    builder.add_node("plan", plan, retry_policy=LLM_RETRY)  # type: ignore[call-overload]
    builder.add_node("code", code, retry_policy=LLM_RETRY)  # type: ignore[call-overload]
    builder.add_node("check", check)
    builder.add_node("review", review, retry_policy=LLM_RETRY)
    builder.add_node("finalize", finalize)  # type: ignore[arg-type]
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


def _server_models() -> ChatModels:
    # Imported lazily: the server imports this module before any endpoint is reachable.
    from graph.runtime import build_runtime
    from graph.settings import load_settings

    return build_runtime(load_settings()).models


def _server_defaults() -> RunContext:
    from graph.settings import load_settings

    return load_settings().run_context()


graph = build_graph(_server_models, defaults=_server_defaults(), name="tandem")
