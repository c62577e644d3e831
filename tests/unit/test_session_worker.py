"""`cli.worker.SessionWorker`: what a worker does with the sessions it claims, on a fake queue.

The queue's Redis scripts are exercised by tests/integration/test_scaleout.py; here the
queue is a list, the models are fakes and the checkpointer is in memory.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from langgraph.checkpoint.memory import InMemorySaver

from cli.worker import SessionWorker
from graph.graph import build_graph
from graph.queue import Claim, QueueState, SessionOutcome, SessionRequest
from nodes.context import RunContext, ServerOptions
from nodes.llm import StaticModels
from routing.fanout import FanoutPolicy
from tests.fakes import ScriptedChatModel, file_of, standard_models

PATHS = ["a.py", "b.py"]


class FakeQueue:
    """The `SessionQueue` surface a worker uses, over a list of claims."""

    worker_id = "w-1"
    heartbeat_ttl_s = 6.0

    def __init__(self, claims: list[Claim]) -> None:
        self.waiting = list(claims)
        self.completed: list[SessionOutcome] = []
        self.released: list[str] = []
        self.coded_files: list[tuple[str, int, str]] = []
        self.a_coded = asyncio.Event()

    async def claim(self) -> Claim | None:
        return self.waiting.pop(0) if self.waiting else None

    async def complete(self, outcome: SessionOutcome) -> None:
        self.completed.append(outcome)

    async def release(self, session_ids: list[str]) -> int:
        self.released += session_ids
        return len(session_ids)

    async def tick(self) -> QueueState:
        return QueueState(0, len(self.waiting), 0, len(self.completed), 0, 1)

    async def record_coded(self, session_id: str, round_: int, path: str) -> None:
        self.coded_files.append((session_id, round_, path))
        if path == "a.py":
            self.a_coded.set()


def _hold(coder: ScriptedChatModel, path: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Make `coder` wait before writing `path`: (set when it starts waiting, set to let it go)."""
    waiting, go = asyncio.Event(), asyncio.Event()
    original = coder._agenerate

    async def gated(messages: Any, *args: Any, **kwargs: Any) -> Any:
        if file_of(messages) == path:
            waiting.set()
            await go.wait()
        return await original(messages, *args, **kwargs)

    object.__setattr__(coder, "_agenerate", gated)
    return waiting, go


def _claim(sid: str, attempts: int = 1) -> Claim:
    return Claim(sid, attempts, SessionRequest(session_id=sid, request="Create a.py and b.py"))


def _worker(queue: FakeQueue, tmp_path: Path) -> tuple[SessionWorker, ScriptedChatModel]:
    reasoning, coder = standard_models(PATHS)
    context = RunContext()
    graph = build_graph(
        StaticModels(reasoning, coder),
        defaults=context,
        options=ServerOptions(workspace=tmp_path),
        checkpointer=InMemorySaver(),
    )
    worker = SessionWorker(
        queue,  # type: ignore[arg-type]
        graph,
        context=context,
        fanout=FanoutPolicy(max_parallel=4),
        workspace=tmp_path,
        concurrency=2,
    )
    return worker, coder


async def test_claimed_sessions_run_to_their_end_and_each_coded_file_is_journaled(
    tmp_path: Path,
) -> None:
    queue = FakeQueue([_claim("s-1"), _claim("s-2")])
    worker, _ = _worker(queue, tmp_path)
    tally = await worker.serve(asyncio.Event(), until_empty=True)
    assert sorted((o.session_id, o.status, o.resumed) for o in queue.completed) == [
        ("s-1", "ok", False),
        ("s-2", "ok", False),
    ]
    assert tally.ended == {"ok": 2} and queue.released == []
    assert sorted(queue.coded_files) == [(s, 0, p) for s in ("s-1", "s-2") for p in PATHS]
    for sid in ("s-1", "s-2"):
        assert (tmp_path / sid / "a.py").is_file() and (tmp_path / sid / "b.py").is_file()


async def test_an_invalid_or_too_often_claimed_session_is_recorded_without_running(
    tmp_path: Path,
) -> None:
    queue = FakeQueue([Claim("s-bad", 1, None, "session s-bad: invalid request"), _claim("s-x", 6)])
    worker, coder = _worker(queue, tmp_path)
    tally = await worker.serve(asyncio.Event(), until_empty=True)
    outcomes = {o.session_id: o for o in queue.completed}
    assert outcomes["s-bad"].status == "rejected" and "invalid" in outcomes["s-bad"].error
    assert outcomes["s-x"].status == "error" and "6 times" in outcomes["s-x"].error
    assert tally.failed == 2
    assert coder.calls == []
    assert not (tmp_path / "s-bad").exists()


async def test_stop_interrupts_the_sessions_in_hand_and_gives_them_back(tmp_path: Path) -> None:
    queue = FakeQueue([_claim("s-1")])
    worker, coder = _worker(queue, tmp_path)
    coding, _ = _hold(coder, "a.py")
    stop = asyncio.Event()
    serving = asyncio.create_task(worker.serve(stop))
    await asyncio.wait_for(coding.wait(), 10)
    stop.set()
    tally = await asyncio.wait_for(serving, 10)
    assert queue.released == ["s-1"] and queue.completed == []
    assert tally.released == 1 and tally.ended == {}
    manifest = json.loads((tmp_path / "s-1" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"


async def test_a_session_given_back_is_resumed_and_finished_files_are_not_coded_again(
    tmp_path: Path,
) -> None:
    reasoning, coder = standard_models(PATHS)
    context = RunContext()
    graph = build_graph(
        StaticModels(reasoning, coder),
        defaults=context,
        options=ServerOptions(workspace=tmp_path),
        checkpointer=InMemorySaver(),
    )

    def make(queue: FakeQueue) -> SessionWorker:
        return SessionWorker(
            queue,  # type: ignore[arg-type]
            graph,
            context=context,
            fanout=FanoutPolicy(max_parallel=4),
            workspace=tmp_path,
            concurrency=1,
        )

    # b.py's coder hangs: stop once a.py is done, as a worker stopped mid-round would.
    b_waiting, release_b = _hold(coder, "b.py")
    first = FakeQueue([_claim("s-1")])
    stop = asyncio.Event()
    serving = asyncio.create_task(make(first).serve(stop))
    await asyncio.wait_for(first.a_coded.wait(), 10)
    await asyncio.wait_for(b_waiting.wait(), 10)
    stop.set()
    await asyncio.wait_for(serving, 10)
    assert first.released == ["s-1"]

    release_b.set()
    coder.calls.clear()
    second = FakeQueue([_claim("s-1", attempts=2)])
    await make(second).serve(asyncio.Event(), until_empty=True)
    [outcome] = second.completed
    assert outcome.status == "ok" and outcome.resumed and outcome.attempts == 2
    assert [file_of(c["messages"]) for c in coder.calls] == ["b.py"]
