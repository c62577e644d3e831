"""Three calls of one session sent together through a router to a scripted streaming server:
when each reached the server. Shared by the in-process and the Redis-budget prefix-hold tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx

from routing.calls import CallInfo, call_scope
from routing.endpoints import Replica
from routing.router import Router


def first_token_stream(first_token_s: float) -> AsyncIterator[bytes]:
    """An SSE answer whose first token comes after `first_token_s` (the server's prefill)."""

    async def body() -> AsyncIterator[bytes]:
        await asyncio.sleep(first_token_s)
        yield b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n'
        await asyncio.sleep(1.0)
        yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': 2}})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return body()


async def sibling_send_times(
    router_for: Callable[[Replica], Router], first_token_s: float = 0.5
) -> list[float]:
    """Seconds from the start at which each of three calls of session "s1", sent together
    (as a plan's coders are), reached the server behind `router_for(replica)`."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(loop.time() - t0)
        headers = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=headers, content=first_token_stream(first_token_s))

    replica = Replica("http://h/v1", "m", "gpu1", transport=httpx.MockTransport(handler))
    async with router_for(replica) as router:
        client = router.client("coder")

        async def call() -> None:
            with call_scope(CallInfo("s1", "code", "coder")):
                url = "http://coder.tandem.internal/v1/chat/completions"
                response = await client.post(url, json={"stream": True})
            assert response.status_code == 200

        await asyncio.gather(*(call() for _ in range(3)))
    return sent
