"""The routing transport: pick a replica, take an admission slot, forward, measure, release.

An `httpx.AsyncBaseTransport` for one role. The slot is held until the response body is
fully read, closed, failed, timed out, cancelled, or left unread for `abandon_after_s`
(a body nobody reads must not hold a GPU slot forever); it is given back exactly once.
Time to the first body chunk (TTFT) and the inter-token latency (ITL) of each streamed
answer feed the replica's limit algorithm.

ITL is measured per generated token, never per SSE event: servers may carry many tokens in
one event (vLLM's stream interval, the emulator's coalesced steps). The token count comes
from the stream's final `usage` chunk (`stream_options.include_usage`); the first event's
arrival stands for the first token (servers send it as soon as prefill ends), so
ITL = (last event - first event) / (completion tokens - 1), whatever the tokens per event.
A stream without usage gives no ITL: the router cannot tell tokens from events, and an
event count would overstate ITL as many times as there are tokens per event.

An error answer (4xx, 5xx) gives its slot back as an error (429/503: dropped) whether or not
its body was read: a client that retries a 503 without reading it still reports overload.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import httpx

from routing.admission import Admission, Outcome, OutcomeKind, Slot
from routing.calls import Role, current_call
from routing.endpoints import Replica

_JSON_CAP_BYTES = 4 * 1024 * 1024
# The usage chunk is the last data event before [DONE]; this much tail always holds it.
_SSE_TAIL_BYTES = 16 * 1024
_SHED = (429, 503)
_EVENT_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class LaneLatency:
    """Moving averages of what the router measured on a replica's successful answers.

    Attributes:
        ttft_s: Time to first token (streamed answers).
        itl_s: Time per output token: inter-token latency, or TPOT for non-streamed answers.
        service_s: Time from admission to the end of the body.
        answers: Successful answers seen.
    """

    ttft_s: float | None = None
    itl_s: float | None = None
    service_s: float | None = None
    answers: int = 0
    weight: float = 0.2

    def observe(self, ttft_s: float | None, itl_s: float | None, service_s: float) -> None:
        """Fold one successful answer in."""
        self.answers += 1
        self.ttft_s = self._ewma(self.ttft_s, ttft_s)
        self.itl_s = self._ewma(self.itl_s, itl_s)
        self.service_s = self._ewma(self.service_s, service_s)

    def _ewma(self, old: float | None, new: float | None) -> float | None:
        if new is None or new < 0:
            return old
        return new if old is None else (1 - self.weight) * old + self.weight * new


@dataclass
class Lane:
    """One replica as the transport uses it."""

    name: str
    replica: Replica
    admission: Admission
    transport: httpx.AsyncBaseTransport
    latency: LaneLatency = field(default_factory=LaneLatency)


def _status_kind(status: int) -> OutcomeKind:
    if status in _SHED:
        return "dropped"
    return "error" if status >= 400 else "ok"


class MeteredStream(httpx.AsyncByteStream):
    """A response body that measures TTFT/ITL and gives its slot back exactly once."""

    def __init__(
        self,
        response: httpx.Response,
        slot: Slot,
        *,
        started_at: float,
        deadline: float,
        abandon_after_s: float,
        on_ok: Callable[[float | None, float | None, float], None] | None = None,
    ) -> None:
        self._on_ok = on_ok
        self._response = response
        self._slot = slot
        self._started_at = started_at
        self._deadline = deadline
        self._abandon_after_s = abandon_after_s
        self._kind = _status_kind(response.status_code)
        content_type = response.headers.get("content-type", "")
        self._sse = content_type.startswith("text/event-stream")
        self._json = content_type.startswith("application/json") and self._kind == "ok"
        self._body = bytearray()
        self._tail: deque[bytes] = deque()
        self._tail_bytes = 0
        self._first_at: float | None = None
        self._last_at: float | None = None
        self._loop = asyncio.get_running_loop()
        # One abandon timer per request, pushed back lazily, not one per chunk.
        self._reading = False
        self._idle_since = self._loop.time()
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(
            self._idle_since + abandon_after_s, self._check_abandoned
        )

    def _check_abandoned(self) -> None:
        self._timer = None
        if self._slot.released:
            return
        now = self._loop.time()
        # A read in progress waits on the server (the deadline bounds that): not abandoned.
        start = now if self._reading else self._idle_since
        if start + self._abandon_after_s > now:
            self._timer = self._loop.call_at(start + self._abandon_after_s, self._check_abandoned)
            return
        # Nobody has asked for the next chunk for a long while: the caller walked away.
        self._finish("cancelled")

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_chunk(self, chunk: bytes) -> None:
        if not chunk:
            return
        now = self._loop.time()
        if self._first_at is None:
            self._first_at = now
            if self._kind == "ok":
                self._slot.first_token()  # the prompt is computed: its prefix is cached
        else:
            self._last_at = now
        if self._sse:
            self._tail.append(chunk)
            self._tail_bytes += len(chunk)
            while self._tail_bytes - len(self._tail[0]) >= _SSE_TAIL_BYTES:
                self._tail_bytes -= len(self._tail.popleft())
        elif self._json and len(self._body) + len(chunk) <= _JSON_CAP_BYTES:
            self._body += chunk

    def _itl_s(self) -> float | None:
        """Seconds per token after the first, from the usage chunk; None without usage."""
        if self._first_at is None or self._last_at is None:
            return None
        tokens = stream_completion_tokens(b"".join(self._tail))
        if tokens is None or tokens < 2:
            return None
        return (self._last_at - self._first_at) / (tokens - 1)

    def _finish(self, kind: OutcomeKind) -> None:
        self._disarm()
        if self._slot.released:
            return
        if kind == "cancelled" and self._kind != "ok":
            kind = self._kind  # an error answer stays an error, read or not
        now = self._loop.time()
        ttft = itl = tpot = None
        if kind == "ok" and self._sse and self._first_at is not None:
            ttft = self._first_at - self._started_at
            itl = self._itl_s()
        elif kind == "ok" and self._json:
            tokens = _completion_tokens(bytes(self._body))
            if tokens:
                tpot = (now - self._started_at) / tokens
        self._slot.release(Outcome(kind, ttft_s=ttft, itl_s=itl, tpot_s=tpot))
        if kind == "ok" and self._on_ok is not None:
            self._on_ok(ttft, itl if itl is not None else tpot, now - self._started_at)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        inner = self._response.stream
        if not isinstance(inner, httpx.AsyncByteStream):
            raise TypeError("the replica transport returned a synchronous stream")
        chunks = inner.__aiter__()
        try:
            while True:
                self._reading = True
                try:
                    async with asyncio.timeout_at(self._deadline):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    self._finish(self._kind)
                    return
                except TimeoutError:
                    self._finish("dropped")
                    raise httpx.ReadTimeout("routing: request timeout while reading") from None
                except asyncio.CancelledError:
                    self._finish("cancelled")
                    raise
                except Exception:
                    self._finish("error")
                    raise
                finally:
                    self._reading = False
                self._on_chunk(chunk)
                self._idle_since = self._loop.time()
                yield chunk
        finally:
            # Closed early (aclose on a suspended generator) or garbage-collected.
            self._finish("cancelled")

    async def aclose(self) -> None:
        """Closing before the end counts as a client disconnect (an error answer stays one)."""
        self._finish("cancelled")
        await self._response.aclose()


def stream_completion_tokens(tail: bytes) -> int | None:
    """`usage.completion_tokens` of the last SSE data event in `tail` that carries usage.

    OpenAI-style servers send `"usage": null` on every chunk but the last when usage is
    asked for; only a usage object counts. None when no event in `tail` has one.
    """
    for event in reversed(_EVENT_END.split(tail)):
        if b'"usage"' not in event:
            continue
        data = b"\n".join(
            line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")
        )
        try:
            usage = json.loads(data).get("usage")
        except (ValueError, AttributeError):
            continue
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            return tokens
    return None


def _completion_tokens(body: bytes) -> int:
    try:
        usage = json.loads(body).get("usage") or {}
        return int(usage.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0


class RoutingTransport(httpx.AsyncBaseTransport):
    """Sends a role's requests to the least-outstanding replica through its admission.

    Args:
        role: The role served.
        lanes: Its replicas.
        synthetic_base: The base URL clients use (rewritten to the chosen replica).
        request_timeout_s: Bound from admission to the end of the body.
        abandon_after_s: Release the slot of a body left unread this long.
    """

    def __init__(
        self,
        role: Role,
        lanes: Sequence[Lane],
        *,
        synthetic_base: str,
        request_timeout_s: float = 600.0,
        abandon_after_s: float = 60.0,
    ) -> None:
        if not lanes:
            raise ValueError(f"role {role!r} has no replicas")
        self.role = role
        self.lanes = list(lanes)
        self._base_path = httpx.URL(synthetic_base).path.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.abandon_after_s = abandon_after_s
        self._rr = itertools.count()

    def pick(self) -> Lane:
        """The replica with the fewest outstanding calls (then most headroom, then turns)."""
        turn = next(self._rr)
        n = len(self.lanes)
        return min(
            (self.lanes[(turn + i) % n] for i in range(n)),
            key=lambda lane: (
                lane.admission.outstanding,
                lane.admission.in_flight - lane.admission.limit,
            ),
        )

    def _target(self, request: httpx.Request, replica: Replica) -> httpx.URL:
        path = request.url.path
        if self._base_path and path.startswith(self._base_path):
            path = path[len(self._base_path) :]
        target = httpx.URL(replica.url)
        return target.copy_with(
            path=target.path.rstrip("/") + path, query=request.url.query or None
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Admit, forward and wrap the response body so the slot comes back."""
        info = current_call.get()
        session_id = info.session_id if info is not None else "-"
        body = await request.aread()
        lane = self.pick()
        headers: list[tuple[str, str]] = [
            (k, v) for k, v in request.headers.multi_items() if k.lower() != "host"
        ]
        if info is not None:
            headers.extend(info.headers().items())
        outgoing = httpx.Request(
            request.method,
            self._target(request, lane.replica),
            headers=headers,
            content=body,
            extensions=dict(request.extensions),
        )
        slot = await lane.admission.acquire(session_id)
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        deadline = started_at + self.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                response = await lane.transport.handle_async_request(outgoing)
        except TimeoutError:
            slot.release(Outcome("dropped"))
            raise httpx.ReadTimeout("routing: request timeout", request=request) from None
        except httpx.TimeoutException:
            slot.release(Outcome("dropped"))
            raise
        except asyncio.CancelledError:
            slot.release(Outcome("cancelled"))
            raise
        except BaseException:
            slot.release(Outcome("error"))
            raise
        stream = MeteredStream(
            response,
            slot,
            started_at=started_at,
            deadline=deadline,
            abandon_after_s=self.abandon_after_s,
            on_ok=lane.latency.observe,
        )
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=stream,
            extensions=response.extensions,
        )
