"""A fault-injecting HTTP proxy for tests: a real loopback server in front of one upstream.

Each POST (a model call) meets one fate, drawn from a seeded generator in arrival order:
an immediate 503 or 500 answer (the JSON error shape vLLM uses), a hang (the request is
accepted and never answered: no status line, until the client hangs up), a cut (the
upstream's answer starts streaming, then the connection is dropped without the end of the
body), or plain forwarding. Other requests (`/metrics`, `/v1/models`, `/health`) are always
forwarded: the faults are meant for model calls.

    proxy = FaultProxy("http://127.0.0.1:9001", FaultMix(error_503=0.05, hang=0.01), seed=1)
    base_url = await proxy.start()
    ...
    proxy.mix = FaultMix()  # no faults from now on
    await proxy.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import uvicorn

from bench.services import free_port

Fate = Literal["503", "500", "hang", "cut", "pass"]
Scope = dict[str, Any]
Message = dict[str, Any]

# Response headers that belong to one connection, not to the answer.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


class ConnectionCut(Exception):
    """Raised inside the proxy to make uvicorn drop a connection mid-answer."""


@dataclass(frozen=True)
class FaultMix:
    """Rates (0-1) of each fault among model calls; the rest are forwarded."""

    error_503: float = 0.0
    error_500: float = 0.0
    hang: float = 0.0
    cut: float = 0.0

    def fate(self, draw: float) -> Fate:
        """The fate of a call given a uniform draw in [0, 1)."""
        for fate, rate in (
            ("503", self.error_503),
            ("500", self.error_500),
            ("hang", self.hang),
            ("cut", self.cut),
        ):
            if draw < rate:
                return fate  # type: ignore[return-value]
            draw -= rate
        return "pass"


class FaultProxy:
    """An ASGI proxy to `upstream` (a base URL without path) served by uvicorn on loopback.

    Attributes:
        mix: The fault rates; may be changed while it runs.
        fates: How many calls met each fate.
        injected: (loop time, fate, session, stage) of each fault injected.
    """

    def __init__(self, upstream: str, mix: FaultMix, *, seed: int = 0, cut_after: int = 2) -> None:
        self.upstream = upstream.rstrip("/")
        self.mix = mix
        self.fates: Counter[str] = Counter()
        self.injected: list[tuple[float, str, str, str]] = []
        self._rng = random.Random(seed)
        self._cut_after = cut_after
        self._client = httpx.AsyncClient(base_url=self.upstream, timeout=None)
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self.port = free_port()

    @property
    def base_url(self) -> str:
        """Where the proxy listens."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> str:
        """Serve on a free loopback port; returns the proxy's base URL."""
        config = uvicorn.Config(
            self,
            host="127.0.0.1",
            port=self.port,
            log_level="critical",
            loop="asyncio",
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._serving = asyncio.create_task(self._server.serve())
        for _ in range(1000):  # uvicorn offers no started event
            if self._server.started:
                return self.base_url
            if self._serving.done():
                break
            await asyncio.sleep(0.01)
        raise RuntimeError(f"fault proxy did not start on {self.base_url}")

    async def stop(self) -> None:
        """Stop serving; hung calls still open are dropped."""
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            self._server.force_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving
        await self._client.aclose()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await _read_body(receive)
        fate: Fate = "pass"
        if scope["method"] == "POST":
            fate = self.mix.fate(self._rng.random())
        self.fates[fate] += 1
        if fate != "pass":
            headers = dict(scope["headers"])
            stage = headers.get(b"x-tandem-stage", b"-").decode("latin-1")
            session = headers.get(b"x-tandem-session", b"-").decode("latin-1")
            self.injected.append((asyncio.get_running_loop().time(), fate, session, stage))
        if fate in ("503", "500"):
            await _send_error(send, int(fate))
        elif fate == "hang":
            while (await receive())["type"] != "http.disconnect":
                pass
        else:
            await self._forward(scope, body, send, cut=fate == "cut")

    async def _forward(self, scope: Scope, body: bytes, send: Any, *, cut: bool) -> None:
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.lower() not in (b"host", b"content-length")
        ]
        path = scope["path"] + (
            f"?{scope['query_string'].decode()}" if scope["query_string"] else ""
        )
        request = self._client.build_request(scope["method"], path, headers=headers, content=body)
        response = await self._client.send(request, stream=True)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in response.headers.multi_items()
                        if k.lower() not in _HOP_BY_HOP
                    ],
                }
            )
            chunks = 0
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunks += 1
                if cut and chunks >= self._cut_after:
                    raise ConnectionCut("dropping the connection mid-answer")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


async def _read_body(receive: Any) -> bytes:
    body = bytearray()
    while True:
        message: Message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)


async def _send_error(send: Any, status: int) -> None:
    kind = "ServiceUnavailableError" if status == 503 else "InternalServerError"
    payload = (
        f'{{"error":{{"message":"injected {status}","type":"{kind}","param":null,'
        f'"code":{status}}}}}'
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})
