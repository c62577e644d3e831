"""What one Tandem process spends per streamed call and per event: `python -m bench.client_path`.

Two measurements, both against an instant upstream (an in-process transport that answers
with pre-built SSE bytes and never waits), so every microsecond counted is the client's:

- stream: `--calls` chat calls, `--concurrency` at once, of `--tokens` tokens each at one
  token per event, through the router, its transport and the chat model (`RoutedModels`,
  as the nodes call it). Reported: tokens per second of wall time, and CPU microseconds
  per event and per call (this process's CPU time, all of it, divided).
- admission: `--waiting` sessions queued on one replica whose limit binds, then
  `--admitted` more calls admitted and released one after another while that queue stays
  behind them. Reported: microseconds per acquire+release through the router's
  admission, and per call through the router's HTTP client (a one-event stream), less
  the same call sent straight to the upstream (the router's own share). CPU time, as the
  stream's per-event figures: on a shared machine wall time also counts other processes.

The figures are a benchmark's, reported, never asserted by a test: they vary with the
machine and whatever else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass

import httpx
from langchain_core.messages import HumanMessage
from rich.console import Console
from rich.table import Table

from nodes.llm import RoutedModels, Usage, complete_answer
from routing.admission import Outcome
from routing.calls import CallInfo, call_scope
from routing.endpoints import Replica
from routing.router import Router

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
    order: str
    acquire_release_us: float
    router_call_us: float
    direct_call_us: float
    router_overhead_us: float


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
        await worker_round(model, messages)  # warm the imports and caches
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


async def worker_round(model: object, messages: list[HumanMessage]) -> None:
    """One call outside the measurement."""
    info = CallInfo(session_id="warm", stage="code", role="coder")
    await complete_answer(model, messages, info, Usage())  # type: ignore[arg-type]


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


async def _queue_then_time(
    router: Router, waiting: int, admitted: int, call: object, limit: int
) -> float:
    """Queue `waiting + admitted` calls behind held slots; CPU seconds per call while the
    first `admitted` of them are admitted and finish."""
    admission = router.lanes("coder")[0].admission
    held = [await admission.acquire(f"holder{i}") for i in range(limit)]
    done = 0
    enough = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal done
        await call(f"s{i}")  # type: ignore[operator]
        done += 1
        if done == admitted:
            enough.set()

    # The measured calls queue first, so `waiting` sessions stay queued behind them.
    tasks = [asyncio.create_task(one(i)) for i in range(admitted + waiting)]
    for _ in range(1_000):  # each call reaches the queue within a few loop turns
        if admission.queued >= admitted + waiting:
            break
        await asyncio.sleep(0)
    else:
        raise RuntimeError(f"only {admission.queued} of {admitted + waiting} calls queued")
    gc.collect()
    started = time.process_time()
    for slot in held:
        slot.release(Outcome("ok"))
    await enough.wait()
    elapsed = time.process_time() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return elapsed / admitted


async def measure_admission(waiting: int, admitted: int, order: str) -> AdmissionResult:
    """Per-call costs with `waiting` sessions queued behind the calls measured."""
    limit = 4
    upstream = InstantUpstream(sse_events(1))

    router = instant_router(upstream, limit=f"fixed-{limit}", order=order)
    admission = router.lanes("coder")[0].admission

    async def acquire_release(session_id: str) -> None:
        slot = await admission.acquire(session_id)
        slot.release(Outcome("ok"))

    async with router:
        acquire_s = await _queue_then_time(router, waiting, admitted, acquire_release, limit)

    router = instant_router(upstream, limit=f"fixed-{limit}", order=order)
    async with router:
        client = router.client("coder")
        await _post(client, "warm")
        routed_s = await _queue_then_time(
            router, waiting, admitted, lambda sid: _post(client, sid), limit
        )

    direct_s = await _direct(upstream, admitted, limit)
    return AdmissionResult(
        waiting=waiting,
        admitted=admitted,
        order=order,
        acquire_release_us=acquire_s * 1e6,
        router_call_us=routed_s * 1e6,
        direct_call_us=direct_s * 1e6,
        router_overhead_us=(routed_s - direct_s) * 1e6,
    )


async def _direct(upstream: httpx.AsyncBaseTransport, calls: int, concurrency: int) -> float:
    """CPU seconds per call for the same calls sent straight to `upstream`."""
    async with httpx.AsyncClient(transport=upstream) as client:
        await _post(client, "warm")
        pending = iter(range(calls))

        async def worker() -> None:
            for i in pending:
                await _post(client, f"s{i}")

        started = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
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
        f"admission: {admission.waiting:,} sessions waiting ({admission.order}), "
        f"{admission.admitted:,} calls",
        "",
    )
    table.add_row("  CPU us per acquire+release", f"{admission.acquire_release_us:.1f}")
    table.add_row("  CPU us per call through the router", f"{admission.router_call_us:.1f}")
    table.add_row("  CPU us per call straight to the upstream", f"{admission.direct_call_us:.1f}")
    table.add_row("  router overhead, CPU us per call", f"{admission.router_overhead_us:.1f}")
    return table


async def _run(args: argparse.Namespace) -> tuple[StreamResult, AdmissionResult]:
    stream = await measure_stream(args.calls, args.concurrency, args.tokens)
    admission = await measure_admission(args.waiting, args.admitted, args.order)
    return stream, admission


def main(argv: Sequence[str] | None = None) -> None:
    """Run both measurements; print a table, or JSON with `--json`."""
    parser = argparse.ArgumentParser(prog="python -m bench.client_path", description=__doc__)
    parser.add_argument("--calls", type=int, default=200, help="streamed calls")
    parser.add_argument("--tokens", type=int, default=500, help="tokens per streamed call")
    parser.add_argument("--concurrency", type=int, default=32, help="streamed calls at once")
    parser.add_argument("--waiting", type=int, default=10_000, help="sessions kept waiting")
    parser.add_argument("--admitted", type=int, default=2_000, help="calls admitted, timed")
    parser.add_argument("--order", choices=["fifo", "las"], default="las")
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
