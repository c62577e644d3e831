"""Hang detection in the routing transport, on a virtual clock: a hung first token or a
stalled stream is cut at its configured bound, its slot comes back at once, and the error
names the role, the replica's URL and the timeout; healthy slow calls are never cut."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from routing.endpoints import Replica
from routing.limits import AdaptiveLimit, Sample
from routing.router import Router
from routing.transport import FirstTokenTimeout, NotAnEventStream, StreamIdleTimeout
from routing.vllm_metrics import ServerSnapshot

URL = "http://coder.tandem.internal/v1/chat/completions"
STREAMED = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
PLAIN = {**STREAMED, "stream": False}


def _events(n_tokens: int, first_s: float, gap_s: float, stall_after: int | None = None):
    """An SSE body: first event after `first_s`, then one every `gap_s`; may stall forever."""

    async def body() -> AsyncIterator[bytes]:
        await asyncio.sleep(first_s)
        for i in range(n_tokens):
            if i:
                await asyncio.sleep(gap_s)
            if stall_after is not None and i == stall_after:
                await asyncio.sleep(10_000)
            yield f"data: {json.dumps({'choices': [{'delta': {'content': 't'}}]})}\n\n".encode()
        usage = {"choices": [], "usage": {"completion_tokens": n_tokens}}
        yield f"data: {json.dumps(usage)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return body()


def _router(handler: httpx.MockTransport, url: str = "http://10.0.0.2:8002/v1") -> Router:
    return Router(
        {"coder": [Replica(url=url, model="m", gpu="gpu1", transport=handler)]},
        limit="fixed-4",
        first_token_timeout_s=3.0,
        stream_idle_timeout_s=2.0,
    )


def _lane_stats(router: Router) -> dict[str, int]:
    return router.stats()["coder@gpu1"]


async def _read_stream(router: Router, body: dict[str, object]) -> bytes:
    async with router.client("coder").stream("POST", URL, json=body) as response:
        return await response.aread()


@pytest.mark.looptime
async def test_a_server_that_never_answers_is_cut_at_the_first_token_bound() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10_000)  # accepted, never answered
        return httpx.Response(200)

    router = _router(httpx.MockTransport(handler))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(FirstTokenTimeout) as caught:
        await _read_stream(router, STREAMED)
    assert loop.time() - started == pytest.approx(3.0, abs=0.01)
    assert _lane_stats(router)["in_flight"] == 0
    assert _lane_stats(router)["failed"] == 1
    message = str(caught.value)
    assert "coder at http://10.0.0.2:8002/v1" in message and "first_token_timeout_s" in message
    await router.aclose()


@pytest.mark.looptime
async def test_headers_without_a_first_chunk_are_cut_at_the_same_bound() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_events(5, 10_000, 0.1)
        )

    router = _router(httpx.MockTransport(handler))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(FirstTokenTimeout, match="no first token within 3 s"):
        await _read_stream(router, STREAMED)
    assert loop.time() - started == pytest.approx(3.0, abs=0.01)
    assert _lane_stats(router)["in_flight"] == 0
    await router.aclose()


@pytest.mark.looptime
async def test_a_stalled_stream_is_cut_after_the_idle_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=_events(50, 0.5, 0.1, stall_after=10),
        )

    router = _router(httpx.MockTransport(handler))
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = 0
    with pytest.raises(StreamIdleTimeout) as caught:
        async with router.client("coder").stream("POST", URL, json=STREAMED) as response:
            async for chunk in response.aiter_bytes():
                received += len(chunk)
    # First event at 0.5 s, nine more 0.1 s apart, then 2 s of silence after the last.
    assert loop.time() - started == pytest.approx(0.5 + 9 * 0.1 + 2.0, abs=0.01)
    assert received > 0
    assert _lane_stats(router)["in_flight"] == 0 and _lane_stats(router)["failed"] == 1
    assert "stream_idle_timeout_s" in str(caught.value)
    assert "coder at http://10.0.0.2:8002/v1" in str(caught.value)
    await router.aclose()


@pytest.mark.looptime
async def test_a_long_healthy_generation_is_never_cut() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        # First token just inside the bound, then 300 tokens each just inside the idle bound.
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_events(300, 2.9, 1.9)
        )

    router = _router(httpx.MockTransport(handler))
    body = await _read_stream(router, STREAMED)
    assert body.endswith(b"data: [DONE]\n\n")
    stats = _lane_stats(router)
    assert stats["in_flight"] == 0 and stats["failed"] == 0
    await router.aclose()


@pytest.mark.looptime
async def test_non_streamed_calls_wait_for_their_whole_answer() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(50.0)  # a long generation answered in one piece
        return httpx.Response(200, json={"usage": {"completion_tokens": 500}})

    router = _router(httpx.MockTransport(handler))
    response = await router.client("coder").post(URL, json=PLAIN)
    assert response.status_code == 200
    assert _lane_stats(router)["failed"] == 0
    await router.aclose()


@pytest.mark.looptime
async def test_the_first_token_bound_grows_with_the_measured_time_to_first_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_events(5, 2.0, 0.1)
        )

    router = _router(httpx.MockTransport(handler))
    (lane,) = router.lanes("coder")
    transport = router.client("coder")._transport
    assert transport.first_token_bound_s(lane) == 3.0  # type: ignore[attr-defined]
    await _read_stream(router, STREAMED)  # TTFT 2 s measured
    assert transport.first_token_bound_s(lane) == pytest.approx(20.0)  # type: ignore[attr-defined]
    await router.aclose()


async def test_an_html_answer_to_a_streamed_call_is_a_clear_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"content-type": "text/html; charset=utf-8"},
            content=b"<html><body>Welcome to nginx!</body></html>",
        )

    router = _router(httpx.MockTransport(handler), url="http://user:hunter2@10.0.0.9:80/v1")
    with pytest.raises(NotAnEventStream) as caught:
        await _read_stream(router, STREAMED)
    message = str(caught.value)
    assert "coder at http://***@10.0.0.9:80/v1" in message and "hunter2" not in message
    assert "text/html" in message and "Welcome to nginx!" in message
    assert _lane_stats(router)["in_flight"] == 0 and _lane_stats(router)["failed"] == 1
    await router.aclose()


async def test_a_refused_connection_names_the_replica_and_uses_the_connect_timeout() -> None:
    seen: list[dict[str, float | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    router = _router(httpx.MockTransport(handler), url="http://10.0.0.3:8002/v1?api_key=s3cret")
    with pytest.raises(httpx.ConnectError) as caught:
        await router.client("coder").post(URL, json=STREAMED)
    message = str(caught.value)
    assert message.startswith("coder at http://10.0.0.3:8002/v1?api_key=***: cannot connect")
    assert "Connection refused" in message and "s3cret" not in message
    assert seen[0]["connect"] == 5.0
    assert _lane_stats(router)["in_flight"] == 0
    await router.aclose()


def test_a_shed_call_shrinks_the_adaptive_limit_only_when_the_server_agrees() -> None:
    limit = AdaptiveLimit(initial=16)
    limit.watch_server(0.0, stale_after_s=3.0)
    limit.on_snapshot(ServerSnapshot(taken_at=1.0, running=8, waiting=0, kv_usage=0.3), 1.0)
    before = limit.limit
    limit.on_sample(Sample(at=1.5, in_flight=8, ok=False, dropped=True))
    assert limit.limit == before  # no queue, KV room: a fault, not overload
    queued = AdaptiveLimit(initial=16)
    queued.watch_server(0.0, stale_after_s=3.0)
    queued.on_snapshot(ServerSnapshot(taken_at=1.0, running=8, waiting=4, kv_usage=0.5), 1.0)
    before = queued.limit
    queued.on_sample(Sample(at=1.5, in_flight=8, ok=False, dropped=True))
    assert queued.limit < before  # the server has a queue: overload
    stale = AdaptiveLimit(initial=16)
    stale.watch_server(0.0, stale_after_s=3.0)
    stale.on_snapshot(ServerSnapshot(taken_at=1.0, running=8, kv_usage=0.3), 1.0)
    before = stale.limit
    stale.on_sample(Sample(at=9.0, in_flight=8, ok=False, dropped=True))
    assert stale.limit < before  # an old scrape says nothing: the drop counts
