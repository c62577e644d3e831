"""Record the LLM calls of a run against real servers, and replay them on the emulator.

A workflow run on real vLLM and the same workload on the emulator do different work when the
real model is not the emulator's content model (a random-weight model plans fewer files and
answers at other lengths). To ask "does the emulator predict this run's makespan?", the calls
the real run made are recorded at the HTTP layer (`RecordingTransport`, a replica transport
under the router) and replayed on emulated engines (`replay_makespan`):

- sessions start at their recorded offsets;
- a session's calls fall into phases: a call that starts after every earlier call of the
  session has ended opens a new phase (it depended on them: plan, then code, then review);
- a phase starts when the previous one ends on the emulator plus the client-side gap the real
  run had there (graph and client time between the answer and the next request), and its calls
  are submitted at their recorded offsets within the phase;
- each call has its recorded prompt and completion token counts (from the server's `usage`),
  with a prompt unique to the call (no prefix-cache hits: the real run's are not known), and
  is guided on the emulator when it asked the real server for structured output.

The replay's makespan is then compared with the real one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from routing.calls import Role
from serving.emulator.engine import CHARS_PER_TOKEN, Engine
from serving.emulator.profiles import Profile
from serving.protocol import SESSION_HEADER, STAGE_HEADER, is_guided


@dataclass(frozen=True)
class CallRecord:
    """One LLM call as the client saw it (loop-clock seconds)."""

    role: Role
    session_id: str
    stage: str
    start_s: float
    end_s: float
    prompt_tokens: int
    completion_tokens: int
    guided: bool = False


def usage_of(body: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from a JSON answer or the last SSE event with `usage`."""
    text = body.decode("utf-8", "replace")
    candidates = [text] if text.lstrip().startswith("{") else []
    if not candidates:
        candidates = [
            line[5:].strip()
            for line in reversed(text.splitlines())
            if line.startswith("data:") and '"usage"' in line
        ]
    for candidate in candidates:
        try:
            usage = json.loads(candidate).get("usage") or {}
            return int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


class _RecordedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, on_end: Any) -> None:
        self._inner = inner
        self._on_end = on_end
        self._body = bytearray()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._body += chunk
            yield chunk
        self._on_end(bytes(self._body))

    async def aclose(self) -> None:
        await self._inner.aclose()


class RecordingTransport(httpx.AsyncBaseTransport):
    """Forwards to `inner` and records each chat completion that ends with a `usage`."""

    def __init__(self, role: Role, inner: httpx.AsyncBaseTransport) -> None:
        self.role = role
        self.inner = inner
        self.records: list[CallRecord] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        loop = asyncio.get_running_loop()
        start = loop.time()
        response = await self.inner.handle_async_request(request)
        if not request.url.path.endswith("/chat/completions") or response.status_code != 200:
            return response
        session = request.headers.get(SESSION_HEADER, "-")
        stage = request.headers.get(STAGE_HEADER, "-")
        try:
            body = json.loads(request.content)
        except ValueError:
            body = {}
        guided = isinstance(body, dict) and is_guided(body)

        def on_end(body: bytes) -> None:
            usage = usage_of(body)
            if usage is not None:
                record = CallRecord(
                    self.role, session, stage, start, loop.time(), *usage, guided=guided
                )
                self.records.append(record)

        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        response.stream = _RecordedStream(stream, on_end)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class _Phase:
    gap_s: float  # client time between the previous phase's end and this phase's first call
    calls: list[tuple[float, CallRecord]]  # offset within the phase, call


def phases(calls: Sequence[CallRecord]) -> list[_Phase]:
    """One session's calls split where a call starts after all earlier ones ended."""
    ordered = sorted(calls, key=lambda c: c.start_s)
    out: list[_Phase] = []
    ended = float("-inf")
    for call in ordered:
        if not out or call.start_s >= ended:
            out.append(_Phase(max(0.0, call.start_s - ended) if out else 0.0, []))
            phase_start = call.start_s
        out[-1].calls.append((call.start_s - phase_start, call))
        ended = max(ended, call.end_s)
    return out


async def replay_makespan(
    calls: Sequence[CallRecord],
    profiles: Mapping[Role, Profile],
    *,
    one_server: bool = False,
    request_overhead_s: float = 0.0,
    spans: list[tuple[CallRecord, float, float]] | None = None,
) -> float:
    """Seconds the emulator takes for `calls`, issued as the real run issued them.

    `one_server`: every role was served by the same server, so one engine (the first
    profile's) serves them all, their calls batched together as the real server batched them.
    `request_overhead_s`: the HTTP server's time per request outside engine steps
    (`tandem calibrate`'s TTFT overhead: tokenising, detokenising, streaming), which the
    emulated engine does not spend; each call pays it before its engine sees it.
    `spans`, when given, gets each call with its start and end on the replay's clock
    (seconds from the replay's start), for a per-call comparison with the real run.
    """
    if request_overhead_s < 0:
        raise ValueError("request_overhead_s must be >= 0")
    if not calls:
        return 0.0
    loop = asyncio.get_running_loop()
    if one_server:
        shared = Engine(next(iter(profiles.values())))
        engines = dict.fromkeys(profiles, shared)
    else:
        engines = {role: Engine(profile) for role, profile in profiles.items()}
    t0_real = min(c.start_s for c in calls)
    by_session: dict[str, list[CallRecord]] = {}
    for call in calls:
        by_session.setdefault(call.session_id, []).append(call)
    t0 = loop.time()
    counter = 0

    async def one(offset_s: float, call: CallRecord) -> None:
        nonlocal counter
        await asyncio.sleep(offset_s)
        started = loop.time() - t0
        await asyncio.sleep(request_overhead_s)
        counter += 1
        chars = call.prompt_tokens * CHARS_PER_TOKEN
        prompt = f"{counter}:{call.session_id}:" + "x" * chars
        engine = engines[call.role]
        handle = engine.submit(
            prompt[:chars],
            call.completion_tokens,
            session_id=call.session_id,
            stage=call.stage,
            guided=call.guided,
        )
        await handle.result()
        if spans is not None:
            spans.append((call, started, loop.time() - t0))

    async def session(items: list[CallRecord]) -> None:
        start = min(c.start_s for c in items) - t0_real
        await asyncio.sleep(max(0.0, t0 + start - loop.time()))
        for phase in phases(items):
            await asyncio.sleep(phase.gap_s)
            await asyncio.gather(*(one(off, call) for off, call in phase.calls))

    try:
        await asyncio.gather(*(session(items) for items in by_session.values()))
    finally:
        for engine in {id(e): e for e in engines.values()}.values():
            await engine.aclose()
    return loop.time() - t0
