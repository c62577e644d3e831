"""What one Tandem process spends per streamed call and per event: `python -m bench.client_path`.

Two measurements, both against an instant upstream (an in-process transport that answers
with pre-built SSE bytes and never waits), so every microsecond counted is the client's:

- stream: `--calls` chat calls, `--concurrency` at once, of `--tokens` tokens each at one
  token per event, through the router, its transport and the chat model (`RoutedModels`,
  as the nodes call it). Reported: tokens per second of wall time and of CPU time, and CPU
  microseconds per event and per call (this process's CPU time, all of it, divided).
- admission: `--waiting` sessions queued on one replica whose limit (4) binds, and
  `--admitted` more calls by 8 callers, each making its next call when its last one ends,
  that the LAS order admits ahead of the waiting sessions (which have attained far more
  service); timed from the first call's start to the last one's end, while the waiting
  queue stays. Reported: microseconds per acquire+release
  through the router's admission, and per call through the router's HTTP client (a
  one-token stream), less the same calls sent straight to the upstream (the router's
  own share); and, apart, what the routing transport adds to a call sent through it
  without an HTTP client while nobody waits. CPU time, as the stream's per-event
  figures: on a shared machine wall time also counts other processes.

The figures are a benchmark's, reported, never asserted by a test: they vary with the
machine and whatever else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import statistics
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import httpx
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage
from rich.console import Console
from rich.table import Table

from nodes.llm import RoutedModels, Usage, complete_answer
from routing.admission import Admission, Outcome
from routing.calls import CallInfo, call_scope
from routing.endpoints import Replica
from routing.limits import FixedLimit
from routing.router import Router
from routing.transport import Lane, RoutingTransport

_URL = "http://upstream.test/v1"
_MODEL = "bench"


def sse_events(tokens: int, tokens_per_event: int = 1, text: str = "tok ") -> list[bytes]:
    """An OpenAI chat completion stream of `tokens` tokens, as the SSE events vLLM sends.

    A role event, one event per `tokens_per_event` tokens (each token is `text`), a finish
    event, the usage event (`stream_options.include_usage`) and `[DONE]`.
    """
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": _MODEL}

    def event(body: dict[str, object]) -> bytes:
        return b"data: " + json.dumps({**head, **body}).encode() + b"\n\n"

    events = [event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})]
    for start in range(0, tokens, tokens_per_event):
        piece = text * (min(tokens, start + tokens_per_event) - start)
        events.append(
            event(
                {
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": piece},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                }
            )
        )
    events.append(
        event({"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]})
    )
    usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
    events.append(event({"choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


class _Events(httpx.AsyncByteStream):
    def __init__(self, events: Sequence[bytes]) -> None:
        self._events = events

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self._events:
            yield event


class InstantUpstream(httpx.AsyncBaseTransport):
    """An OpenAI-compatible server that answers every chat call at once with `events`."""

    def __init__(self, events: Sequence[bytes]) -> None:
        self.events = list(events)
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        await request.aread()
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=_Events(self.events)
        )


def instant_router(upstream: httpx.AsyncBaseTransport, *, limit: str, order: str) -> Router:
    """A router with one coder replica served by `upstream` in process."""
    replica = Replica(url=_URL, model=_MODEL, gpu="gpu0", transport=upstream)
    return Router({"coder": [replica]}, limit=limit, order=order)


@dataclass(frozen=True)
class StreamResult:
    """Streaming through router, transport and chat model, one token per event."""

    calls: int
    concurrency: int
    tokens_per_call: int
    tokens_per_s: float
    tokens_per_cpu_s: float
    cpu_us_per_event: float
    cpu_us_per_call: float


@dataclass(frozen=True)
class AdmissionResult:
    """Per-call costs with `waiting` sessions queued on the replica."""

    waiting: int
    admitted: int
    acquire_release_us: float
    router_call_us: float
    direct_call_us: float
    router_overhead_us: float
    transport_alone_us: float


async def measure_stream(calls: int, concurrency: int, tokens: int) -> StreamResult:
    """Stream `calls` calls of `tokens` tokens, `concurrency` at once; tokens/s and CPU."""
    upstream = InstantUpstream(sse_events(tokens))
    router = instant_router(upstream, limit="unlimited", order="fifo")
    model = RoutedModels(router).for_role("coder")
    usage = Usage()
    messages = [HumanMessage(content="write it")]
    pending = iter(range(calls))

    async def worker() -> None:
        for i in pending:
            info = CallInfo(session_id=f"s{i % 64}", stage="code", role="coder")
            await complete_answer(model, messages, info, usage)

    async with router:
        await _warm(model, messages)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    if usage.completion_tokens != calls * tokens:
        raise RuntimeError(f"streamed {usage.completion_tokens} tokens, not {calls * tokens}")
    # Events per call: one per token plus role, finish, usage and [DONE].
    events = calls * (tokens + 4)
    return StreamResult(
        calls=calls,
        concurrency=concurrency,
        tokens_per_call=tokens,
        tokens_per_s=calls * tokens / wall_s,
        tokens_per_cpu_s=calls * tokens / cpu_s,
        cpu_us_per_event=cpu_s * 1e6 / events,
        cpu_us_per_call=cpu_s * 1e6 / calls,
    )


async def _warm(model: BaseChatModel, messages: list[HumanMessage]) -> None:
    """One call outside the measurement: imports and caches are warm when it starts."""
    info = CallInfo(session_id="warm", stage="code", role="coder")
    await complete_answer(model, messages, info, Usage())


async def _drain(response: httpx.Response) -> None:
    async for _ in response.aiter_raw():
        pass


async def _post(client: httpx.AsyncClient, session_id: str) -> None:
    info = CallInfo(session_id=session_id, stage="code", role="coder")
    body = {"model": _MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    with call_scope(info):
        request = client.build_request("POST", f"{_URL}/chat/completions", json=body)
        response = await client.send(request, stream=True)
        try:
            await _drain(response)
        finally:
            await response.aclose()


# Callers of the measured calls: twice the replica's limit, so that some always queue.
_CALLERS = 8
# Service each waiting session has attained: LAS admits the measured calls (none) first,
# and aging (one slot-second forgiven per second waited) does not close the gap meanwhile.
_WAITER_ATTAINED_S = 1_000.0


async def _behind_waiters(
    router: Router, waiting: int, admitted: int, call: Callable[[str], Coroutine[Any, Any, None]]
) -> float:
    """CPU seconds per call for `admitted` calls made by `_CALLERS` callers, each making its
    next call when its last one ends, on a replica whose limit binds (fewer slots than
    callers) with `waiting` sessions queued on it all along.

    Timed from the first call's start to the last one's end: each call's whole path,
    including its turn in the queue.
    """
    admission = router.lanes("coder")[0].admission
    if admission.limit >= _CALLERS:
        raise ValueError(f"the limit must bind: below {_CALLERS} callers")
    now = asyncio.get_running_loop().time()
    held = [await admission.acquire(f"holder{i}") for i in range(admission.limit)]
    for i in range(waiting):
        router.ledger.begin(f"w{i}", now - _WAITER_ATTAINED_S)
        router.ledger.end(f"w{i}", now - _WAITER_ATTAINED_S, now)
    waiters = [asyncio.create_task(admission.acquire(f"w{i}")) for i in range(waiting)]
    await _until(lambda: admission.queued >= waiting)
    pending = iter(range(admitted))

    async def caller() -> None:
        for i in pending:
            await call(f"s{i}")

    gc.collect()
    started = time.process_time()
    callers = [asyncio.create_task(caller()) for _ in range(_CALLERS)]
    await _until(lambda: admission.queued >= waiting + _CALLERS)
    for slot in held:
        slot.release(Outcome("ok"))
    await asyncio.gather(*callers)
    elapsed = time.process_time() - started
    # The last calls' releases admit waiting sessions: at most a limit's worth.
    if admission.queued < waiting - admission.limit:
        raise RuntimeError(f"only {admission.queued} of {waiting} sessions still waiting")
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    return elapsed / admitted


async def _until(ready: Callable[[], bool]) -> None:
    """Let the loop run until `ready()`: each call reaches the queue within a few turns."""
    for _ in range(1_000):
        if ready():
            return
        await asyncio.sleep(0)
    raise RuntimeError("the calls did not all reach the admission queue")


async def measure_admission(waiting: int, admitted: int, rounds: int = 5) -> AdmissionResult:
    """Per-call costs with `waiting` sessions queued on the replica (LAS order, limit 4).

    Each figure is the median of `rounds` runs, the routed and direct runs taking turns, so
    that a burst of load from elsewhere on the machine does not land on one side only; the
    router's overhead is the median of each round's routed minus direct, a pair run back to
    back (on a shared machine the two medians apart can come from different moments).
    """
    upstream = InstantUpstream(sse_events(1))
    acquire_s: list[float] = []
    routed_s: list[float] = []
    direct_s: list[float] = []
    for _ in range(rounds):
        router = instant_router(upstream, limit="fixed-4", order="las")
        admit = functools.partial(_acquire_release, router.lanes("coder")[0].admission)
        async with router:
            acquire_s.append(await _behind_waiters(router, waiting, admitted, admit))

        router = instant_router(upstream, limit="fixed-4", order="las")
        async with router:
            client = router.client("coder")
            await _post(client, "warm")
            post = functools.partial(_post, client)
            routed_s.append(await _behind_waiters(router, waiting, admitted, post))
        direct_s.append(await _direct(upstream, admitted))
    routed, direct = statistics.median(routed_s), statistics.median(direct_s)
    alone_s = [await _transport_alone(upstream, admitted) for _ in range(rounds)]
    return AdmissionResult(
        waiting=waiting,
        admitted=admitted,
        acquire_release_us=statistics.median(acquire_s) * 1e6,
        router_call_us=routed * 1e6,
        direct_call_us=direct * 1e6,
        router_overhead_us=statistics.median(
            [r - d for r, d in zip(routed_s, direct_s, strict=True)]
        )
        * 1e6,
        transport_alone_us=statistics.median(alone_s) * 1e6,
    )


async def _transport_alone(upstream: httpx.AsyncBaseTransport, calls: int) -> float:
    """CPU seconds per call that the routing transport adds, called without an HTTP client
    and with nobody waiting: one request sent `calls` times through it and straight to
    `upstream`, each body read to its end."""
    replica = Replica(url=_URL, model=_MODEL, gpu="gpu0", transport=upstream)
    lane = Lane("coder@gpu0", replica, Admission("coder@gpu0", FixedLimit(4)), upstream)
    routing = RoutingTransport("coder", [lane], synthetic_base="http://coder.test/v1")
    body = {"model": _MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    request = httpx.Request("POST", "http://coder.test/v1/chat/completions", json=body)

    async def send(transport: httpx.AsyncBaseTransport) -> float:
        gc.collect()
        started = time.process_time()
        for _ in range(calls):
            response = await transport.handle_async_request(request)
            assert isinstance(response.stream, httpx.AsyncByteStream)
            async for _ in response.stream:
                pass
            await response.aclose()
        return time.process_time() - started

    await send(routing)  # warm
    with call_scope(CallInfo(session_id="s", stage="code", role="coder")):
        return (await send(routing) - await send(upstream)) / calls


async def _acquire_release(admission: Admission, session_id: str) -> None:
    slot = await admission.acquire(session_id)
    slot.release(Outcome("ok"))


async def _direct(upstream: httpx.AsyncBaseTransport, calls: int) -> float:
    """CPU seconds per call for the same calls by as many callers, straight to `upstream`."""
    async with httpx.AsyncClient(transport=upstream) as client:
        await _post(client, "warm")
        pending = iter(range(calls))

        async def caller() -> None:
            for i in pending:
                await _post(client, f"s{i}")

        gc.collect()
        started = time.process_time()
        await asyncio.gather(*(caller() for _ in range(_CALLERS)))
        return (time.process_time() - started) / calls


def _table(stream: StreamResult, admission: AdmissionResult) -> Table:
    table = Table(title="Client path against an instant upstream (one process)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        f"stream: {stream.calls} calls x {stream.tokens_per_call} tokens, "
        f"{stream.concurrency} at once",
        "",
    )
    table.add_row("  tokens per second (one token per event)", f"{stream.tokens_per_s:,.0f}")
    table.add_row("  tokens per CPU second", f"{stream.tokens_per_cpu_s:,.0f}")
    table.add_row("  CPU us per event", f"{stream.cpu_us_per_event:.1f}")
    table.add_row("  CPU us per call", f"{stream.cpu_us_per_call:,.0f}")
    table.add_row(
        f"admission: {admission.waiting:,} sessions waiting (LAS), {admission.admitted:,} calls",
        "",
    )
    table.add_row("  CPU us per acquire+release", f"{admission.acquire_release_us:.1f}")
    table.add_row("  CPU us per call through the router", f"{admission.router_call_us:.1f}")
    table.add_row("  CPU us per call straight to the upstream", f"{admission.direct_call_us:.1f}")
    table.add_row("  router overhead, CPU us per call", f"{admission.router_overhead_us:.1f}")
    table.add_row(
        "transport alone (no client, none waiting), CPU us per call",
        f"{admission.transport_alone_us:.1f}",
    )
    return table


async def _run(args: argparse.Namespace) -> tuple[StreamResult, AdmissionResult]:
    stream = await measure_stream(args.calls, args.concurrency, args.tokens)
    admission = await measure_admission(args.waiting, args.admitted)
    return stream, admission


def main(argv: Sequence[str] | None = None) -> None:
    """Run both measurements; print a table, or JSON with `--json`."""
    parser = argparse.ArgumentParser(prog="python -m bench.client_path", description=__doc__)
    parser.add_argument("--calls", type=int, default=200, help="streamed calls")
    parser.add_argument("--tokens", type=int, default=500, help="tokens per streamed call")
    parser.add_argument("--concurrency", type=int, default=32, help="streamed calls at once")
    parser.add_argument("--waiting", type=int, default=10_000, help="sessions kept waiting")
    parser.add_argument("--admitted", type=int, default=2_000, help="calls admitted, timed")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    for name in ("calls", "tokens", "concurrency", "admitted"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.waiting < 0:
        parser.error("--waiting must not be negative")
    stream, admission = asyncio.run(_run(args))
    if args.json:
        print(json.dumps({"stream": asdict(stream), "admission": asdict(admission)}, indent=2))
    else:
        Console().print(_table(stream, admission))


if __name__ == "__main__":
    main()
