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

Hang detection: besides the request timeout (admission to last byte), a streamed call is cut
when the connection does not open within the connect timeout, when no body chunk arrives
within the first-token bound of sending, or when the stream falls silent for longer than the
idle timeout once it has started. The first-token bound is the configured floor or ten times
the time to first token measured on that replica, whichever is larger, so a replica whose
queue makes every first token slow is not cut while it is healthy. Every error raised here
names the role, the replica's URL (credentials redacted) and what went wrong; a cut call's
slot comes back at once, as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from routing.admission import Admission, Outcome, OutcomeKind, Slot
from routing.calls import CallInfo, Role, current_call
from routing.endpoints import Replica

_JSON_CAP_BYTES = 4 * 1024 * 1024
# The first-token bound grows to this many times a replica's measured time to first token.
FIRST_TOKEN_TTFT_FACTOR = 10.0
# Where a response says which replica answered it ("coder at http://h:8002/v1").
REPLICA_EXTENSION = "tandem.replica"
# The default bound on one call, from admission to its last byte: an hour. An R1-length
# answer (agentic-long's 13,334-token plan cap) on a full batch at 45 ms a token takes 10
# minutes; 600 s cut such calls, which were then retried from scratch. Hangs are caught by
# the first-token and idle bounds, not by this one.
REQUEST_TIMEOUT_S = 3600.0
_SHOWN_BODY_CHARS = 120
# The usage chunk is the last data event before [DONE]; this much tail always holds it.
_SSE_TAIL_BYTES = 16 * 1024
_SHED = (429, 503)
_EVENT_END = re.compile(rb"\r?\n\r?\n")
# Replica URLs per path kept parsed; past this many (a caller inventing paths) start over.
_MAX_TARGETS = 256


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


class FirstTokenTimeout(httpx.ReadTimeout):
    """A streamed call sent nothing back within its first-token bound."""


class StreamIdleTimeout(httpx.ReadTimeout):
    """A streamed answer fell silent between chunks for longer than the idle timeout."""


class NotAnEventStream(httpx.DecodingError):
    """A streamed call was answered 200 with neither an event stream nor JSON (e.g. HTML).

    Retrying does not help: something other than an OpenAI-compatible server answers there.
    """


def _output_cap(payload: dict[str, Any] | None) -> int | None:
    """The request's output cap (`max_completion_tokens`, else `max_tokens`), if a positive int."""
    if payload is None:
        return None
    for key in ("max_completion_tokens", "max_tokens"):
        value = payload.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


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
        where: str = "replica",
        first_chunk_by: float | None = None,
        stream_idle_s: float | None = None,
    ) -> None:
        self._on_ok = on_ok
        self._response = response
        self._slot = slot
        self._started_at = started_at
        self._deadline = deadline
        self._abandon_after_s = abandon_after_s
        self._where = where
        self._first_chunk_by = first_chunk_by
        self._stream_idle_s = stream_idle_s
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
        # One timer per call, not one per chunk: it bounds the read in progress (first-token,
        # idle or request deadline) or, between reads, the wait for the next one (abandon).
        # It is pushed back lazily: when it fires early it re-arms at the bound then due.
        self._reading = False
        self._read_by = 0.0
        self._reader: asyncio.Task[Any] | None = None
        self._expired = False
        self._idle_since = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._arm(self._idle_since + abandon_after_s)

    def _arm(self, at: float) -> None:
        """Make sure the timer fires no later than `at`."""
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._reading and self._slot.released:
            return
        now = self._loop.time()
        due = self._read_by if self._reading else self._idle_since + self._abandon_after_s
        if due > now:
            self._arm(due)
        elif self._reading:
            # The read in progress passed its bound: cut it, as asyncio.timeout would.
            if self._reader is not None and not self._expired:
                self._expired = True
                self._reader.cancel()
        else:
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
        received = 0
        task = asyncio.current_task()
        try:
            while True:
                read_by = self._read_by = self._read_bound()
                self._reader = task
                self._reading = True
                cancelling = task.cancelling() if task is not None else 0
                self._arm(read_by)
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    self._finish(self._kind)
                    return
                except asyncio.CancelledError:
                    if self._expired and task is not None:
                        self._expired = False
                        if task.uncancel() <= cancelling:
                            raise await self._timed_out(read_by, received) from None
                    self._finish("cancelled")
                    raise
                except httpx.TransportError as exc:
                    self._finish("error")
                    reason = f"stream cut after {received} bytes ({exc or type(exc).__name__})"
                    raise type(exc)(f"{self._where}: {reason}") from exc
                except Exception:
                    self._finish("error")
                    raise
                finally:
                    self._reading = False
                    self._reader = None
                received += len(chunk)
                self._on_chunk(chunk)
                self._idle_since = self._loop.time()
                yield chunk
        finally:
            # Closed early (aclose on a suspended generator) or garbage-collected.
            self._finish("cancelled")

    def _read_bound(self) -> float:
        """When the next chunk must have come: the first-token or idle bound, or the deadline."""
        if self._first_at is None and self._first_chunk_by is not None:
            return min(self._deadline, self._first_chunk_by)
        if self._first_at is not None and self._stream_idle_s is not None:
            return min(self._deadline, self._loop.time() + self._stream_idle_s)
        return self._deadline

    async def _timed_out(self, read_by: float, received: int) -> httpx.ReadTimeout:
        """Give the slot back, drop the connection, and say which bound was passed."""
        error: httpx.ReadTimeout
        if read_by >= self._deadline:
            self._finish("dropped")
            error = httpx.ReadTimeout(
                f"{self._where}: answer not complete within the request timeout "
                f"({self._deadline - self._started_at:g} s, request_timeout_s)"
            )
        elif self._first_at is None:
            self._finish("error")
            error = FirstTokenTimeout(
                f"{self._where}: no first token within "
                f"{read_by - self._started_at:.3g} s of sending (first_token_timeout_s)"
            )
        else:
            self._finish("error")
            error = StreamIdleTimeout(
                f"{self._where}: stream silent for {self._stream_idle_s:g} s after "
                f"{received} bytes (stream_idle_timeout_s)"
            )
        # The server stops generating for a client that hung up; its connection is not reused.
        with contextlib.suppress(Exception):
            await self._response.aclose()
        return error

    async def aclose(self) -> None:
        """Closing before the end counts as a client disconnect (an error answer stays one)."""
        self._finish("cancelled")
        await self._response.aclose()


# Engine priority units per slot-second of attained service: vLLM's priority is an integer.
PRIORITY_UNITS_PER_S = 10
_MAX_PRIORITY = 2**31 - 1


def engine_rank(attained_s: float, forgiven_s: float = 0.0) -> int:
    """vLLM's per-request `priority` for a call: its session's least-attained-service rank.

    A session that has held fewer GPU slot-seconds is served earlier inside the engine too
    (lower is earlier), as the router's LAS order admits it earlier; `forgiven_s` is the
    aging the call earned while it waited at the router. Tenths of a slot-second, so that
    sessions a fraction of a second apart are told apart; ties go by arrival, as vLLM does.
    """
    rank = max(0.0, attained_s - forgiven_s) * PRIORITY_UNITS_PER_S
    return min(int(rank), _MAX_PRIORITY)


_JSON_SPACE = re.compile(rb"[ \t\n\r]*")


def _space_end(body: bytes, at: int) -> int:
    """Where the JSON whitespace that starts at `at` ends."""
    match = _JSON_SPACE.match(body, at)
    return at if match is None else match.end()


def with_priority(body: bytes, payload: dict[str, Any], priority: int) -> bytes:
    """`body`, a JSON object (`payload` parsed), with its top-level `priority` set.

    Spliced in after the opening brace, so that the rest, often hundreds of KB of prompt,
    is neither encoded again nor changed (a 228 KB chat body: 1.2 ms of CPU to re-encode,
    12 us to splice). A body that names a priority itself, or does not start with `{`, is
    encoded anew: JSON parsers keep a repeated name's last value, which would be the
    caller's.
    """
    start = _space_end(body, 0)
    if "priority" in payload or body[start : start + 1] != b"{":
        return json.dumps({**payload, "priority": priority}, separators=(",", ":")).encode()
    end = _space_end(body, start + 1)
    comma = b"" if body[end : end + 1] == b"}" else b","
    return b"".join((b'{"priority":', str(priority).encode(), comma, memoryview(body)[start + 1 :]))


def stream_completion_tokens(tail: bytes) -> int | None:
    """`usage.completion_tokens` of the last SSE data event in `tail` that carries usage.

    OpenAI-style servers send `"usage": null` on every chunk but the last when usage is
    asked for; only a usage object counts. None when no event in `tail` has one.
    """
    if b'"usage"' not in tail:
        return None
    # Servers send each chunk on one data line: read the line of the last "usage" first.
    end = len(tail)
    while (at := tail.rfind(b'"usage"', 0, end)) >= 0:
        end = at
        line_end = tail.find(b"\n", at)
        line = tail[tail.rfind(b"\n", 0, at) + 1 : len(tail) if line_end < 0 else line_end]
        line = line.strip()
        if line.startswith(b"data:"):
            tokens = _usage_tokens(line[5:])
            if tokens is not None:
                return tokens
    # An event whose JSON spans several data lines: join each event's lines.
    for event in reversed(_EVENT_END.split(tail)):
        if b'"usage"' not in event:
            continue
        data = b"\n".join(
            line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")
        )
        tokens = _usage_tokens(data)
        if tokens is not None:
            return tokens
    return None


def _usage_tokens(data: bytes) -> int | None:
    """`usage.completion_tokens` of one event's data; None when it has no usage object."""
    try:
        usage = json.loads(data).get("usage")
    except (ValueError, AttributeError):
        return None
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
        connect_timeout_s: Bound on opening a connection to a replica (None: the client's).
        first_token_timeout_s: Floor of the bound from sending a streamed call to its first
            body chunk; None disables it.
        stream_idle_timeout_s: Most silence between chunks of a streamed answer; None
            disables it.
    """

    def __init__(
        self,
        role: Role,
        lanes: Sequence[Lane],
        *,
        synthetic_base: str,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        abandon_after_s: float = 60.0,
        connect_timeout_s: float | None = None,
        first_token_timeout_s: float | None = None,
        stream_idle_timeout_s: float | None = None,
    ) -> None:
        if not lanes:
            raise ValueError(f"role {role!r} has no replicas")
        self.role = role
        self.lanes = list(lanes)
        self._base_path = httpx.URL(synthetic_base).path.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.abandon_after_s = abandon_after_s
        self.connect_timeout_s = connect_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.stream_idle_timeout_s = stream_idle_timeout_s
        # Awaited before each call until it has run once (the router's lazy start).
        self.before_first_call: Callable[[], Awaitable[None]] | None = None
        # Told of each call answered with a success status, as its headers arrive.
        self.on_answered: Callable[[CallInfo], None] | None = None
        self._rr = itertools.count()
        # Parsing a URL costs more than the rest of a call's routing: each replica's URL for
        # each path is built once (a call goes to a handful of API paths).
        self._targets: dict[tuple[str, str, bytes], httpx.URL] = {}
        self._where: dict[Replica, str] = {}

    def pick(self) -> Lane:
        """The replica with the fewest outstanding calls (then most headroom, then turns)."""
        n = len(self.lanes)
        if n == 1:
            return self.lanes[0]
        turn = next(self._rr)
        return min(
            (self.lanes[(turn + i) % n] for i in range(n)),
            key=lambda lane: (
                lane.admission.outstanding,
                lane.admission.in_flight - lane.admission.limit,
            ),
        )

    def first_token_bound_s(self, lane: Lane) -> float | None:
        """Seconds a streamed call on `lane` may wait for its first chunk; None: no bound.

        The configured floor, raised to `FIRST_TOKEN_TTFT_FACTOR` times the lane's measured
        time to first token: a loaded server's queue delays every first token, and a call
        waiting in that queue is healthy.
        """
        if self.first_token_timeout_s is None:
            return None
        measured = lane.latency.ttft_s or 0.0
        return max(self.first_token_timeout_s, FIRST_TOKEN_TTFT_FACTOR * measured)

    def where(self, lane: Lane) -> str:
        """How errors name a replica: role and redacted URL."""
        shown = self._where.get(lane.replica)
        if shown is None:
            shown = self._where[lane.replica] = f"{self.role} at {lane.replica.shown_url}"
        return shown

    def _target(self, request: httpx.Request, replica: Replica) -> httpx.URL:
        key = (replica.url, request.url.path, request.url.query)
        target = self._targets.get(key)
        if target is None:
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            target = self._targets[key] = self._build_target(request, replica)
        return target

    def _build_target(self, request: httpx.Request, replica: Replica) -> httpx.URL:
        path = request.url.path
        if self._base_path and path.startswith(self._base_path):
            path = path[len(self._base_path) :]
        target = httpx.URL(replica.url)
        return target.copy_with(
            path=target.path.rstrip("/") + path, query=request.url.query or None
        )

    def _extensions(self, request: httpx.Request) -> dict[str, Any]:
        extensions = dict(request.extensions)
        if self.connect_timeout_s is not None:
            timeout = dict(extensions.get("timeout") or {})
            given = timeout.get("connect")
            timeout["connect"] = (
                self.connect_timeout_s if given is None else min(given, self.connect_timeout_s)
            )
            extensions["timeout"] = timeout
        return extensions

    def _priority_body(self, body: bytes, payload: dict[str, Any], lane: Lane, slot: Slot) -> bytes:
        """The request body with vLLM's `priority` set to the call's session rank (see
        `engine_rank`); `payload` is the body's JSON, parsed once by the caller."""
        admission = lane.admission
        now = asyncio.get_running_loop().time()
        attained = admission.ledger.attained(slot.session_id, now)
        aging = getattr(admission.order, "aging_rate", 0.0)
        return with_priority(body, payload, engine_rank(attained, aging * slot.waited_s))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Admit, forward and wrap the response body so the slot comes back."""
        if self.before_first_call is not None:
            await self.before_first_call()
        if request.method != "POST":
            return await self._pass_through(request)
        info = current_call.get()
        session_id = info.session_id if info is not None else "-"
        body = await request.aread()
        # Parsed once, and only when something reads it: the stream flag, the output cap,
        # or a priority field.
        wanted = (
            b'"stream"' in body
            or b"max_" in body
            or any(lane.replica.priority for lane in self.lanes)
        )
        payload = _json_object(body) if wanted else None
        streamed = payload is not None and payload.get("stream") is True
        lane = self.pick()
        where = self.where(lane)
        target = self._target(request, lane.replica)
        headers = _outgoing_headers(request, target, info.headers() if info is not None else None)
        extensions = self._extensions(request)
        slot = await lane.admission.acquire(session_id, _output_cap(payload))
        try:
            if lane.replica.priority and payload is not None:
                # Built after admission: the priority depends on the session's service.
                headers.pop("content-length", None)
                outgoing = httpx.Request(
                    request.method,
                    target,
                    headers=headers,
                    content=self._priority_body(body, payload, lane, slot),
                    extensions=extensions,
                )
            else:
                outgoing = _readdressed(request, target, headers, extensions)
        except BaseException:
            slot.release(Outcome("error"))
            raise
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        deadline = started_at + self.request_timeout_s
        bound_s = self.first_token_bound_s(lane) if streamed else None
        first_chunk_by = None if bound_s is None else started_at + bound_s
        answer_by = deadline if first_chunk_by is None else min(deadline, first_chunk_by)
        try:
            async with asyncio.timeout_at(answer_by):
                response = await lane.transport.handle_async_request(outgoing)
        except TimeoutError:
            if answer_by < deadline:
                slot.release(Outcome("error"))
                raise FirstTokenTimeout(
                    f"{where}: no answer within {answer_by - started_at:.3g} s of sending "
                    "(first_token_timeout_s)",
                    request=request,
                ) from None
            slot.release(Outcome("dropped"))
            raise self._request_timed_out(where, request) from None
        except httpx.TransportError as exc:
            # A slow answer says the server is loaded; a refused or unopened connection does not.
            overload = isinstance(exc, httpx.TimeoutException) and not isinstance(
                exc, httpx.ConnectTimeout
            )
            slot.release(Outcome("dropped" if overload else "error"))
            reason = _transport_reason(exc, self.connect_timeout_s)
            raise type(exc)(f"{where}: {reason}", request=request) from exc
        except asyncio.CancelledError:
            slot.release(Outcome("cancelled"))
            raise
        except BaseException:
            slot.release(Outcome("error"))
            raise
        if streamed and response.status_code == 200 and not _api_content(response):
            raise await _not_an_event_stream(response, slot, where, request, answer_by)
        if self.on_answered is not None and info is not None and response.is_success:
            try:
                self.on_answered(info)
            except BaseException:
                slot.release(Outcome("error"))
                await response.aclose()
                raise
        stream = MeteredStream(
            response,
            slot,
            started_at=started_at,
            deadline=deadline,
            abandon_after_s=self.abandon_after_s,
            on_ok=lane.latency.observe,
            where=where,
            first_chunk_by=first_chunk_by,
            stream_idle_s=self.stream_idle_timeout_s if streamed else None,
        )
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=stream,
            extensions={**response.extensions, REPLICA_EXTENSION: where},
        )

    async def _pass_through(self, request: httpx.Request) -> httpx.Response:
        """A read of the server's state (`GET /v1/models`): no GPU work, so it takes no
        admission slot, waits behind no prefix leader and says nothing about latency."""
        lane = self.pick()
        where = self.where(lane)
        target = self._target(request, lane.replica)
        headers = _outgoing_headers(request, target)
        outgoing = _readdressed(request, target, headers, self._extensions(request))
        try:
            async with asyncio.timeout(self.request_timeout_s):
                response = await lane.transport.handle_async_request(outgoing)
        except TimeoutError:
            raise self._request_timed_out(where, request) from None
        except httpx.TransportError as exc:
            reason = _transport_reason(exc, self.connect_timeout_s)
            raise type(exc)(f"{where}: {reason}", request=request) from exc
        response.extensions = {**response.extensions, REPLICA_EXTENSION: where}
        return response

    def _request_timed_out(self, where: str, request: httpx.Request) -> httpx.ReadTimeout:
        return httpx.ReadTimeout(
            f"{where}: no answer within the request timeout "
            f"({self.request_timeout_s:g} s, request_timeout_s)",
            request=request,
        )


def _outgoing_headers(
    request: httpx.Request, target: httpx.URL, tags: Mapping[str, str] | None = None
) -> httpx.Headers:
    """`request`'s headers, with the Host of the replica it goes to and the call's `tags`
    (replacing any of the same names), built in one pass: a copy, a set and an update would
    each parse every header again, which costs more than the rest of a call's routing."""
    host: bytes | None = target.netloc
    extra = [(k.encode("ascii"), v.encode("ascii")) for k, v in (tags or {}).items()]
    replaced = {k.lower() for k, _ in extra}
    raw: list[tuple[bytes, bytes]] = []
    for key, value in request.headers.raw:
        lower = key.lower()
        if lower == b"host":
            if host is not None:
                raw.append((key, host))
                host = None
        elif lower not in replaced:
            raw.append((key, value))
    if host is not None:
        raw.insert(0, (b"Host", host))
    raw.extend(extra)
    return httpx.Headers(raw)


def _readdressed(
    request: httpx.Request, url: httpx.URL, headers: httpx.Headers, extensions: dict[str, Any]
) -> httpx.Request:
    """`request` sent to `url` with `headers` and `extensions`, its body shared (read once).

    A shallow copy of its attributes rather than a new `httpx.Request`, which parses every
    header again, or `copy.copy`, which goes through the request's pickling hooks.
    """
    outgoing = httpx.Request.__new__(httpx.Request)
    outgoing.__dict__.update(request.__dict__)
    outgoing.url = url
    outgoing.headers = headers
    outgoing.stream = request.stream
    outgoing.extensions = extensions
    return outgoing


def _transport_reason(exc: httpx.TransportError, connect_timeout_s: float | None) -> str:
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectTimeout):
        within = "" if connect_timeout_s is None else f" within {connect_timeout_s:g} s"
        return f"no connection{within} (connect_timeout_s; {detail})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({detail})"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({detail})"
    return f"failed before answering ({detail})"


def _api_content(response: httpx.Response) -> bool:
    """An event stream, or JSON (left to the client, which reads OpenAI errors from it)."""
    content_type = str(response.headers.get("content-type", ""))
    return content_type.startswith(("text/event-stream", "application/json"))


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The request body as a JSON object; None for anything else (sent as it is)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


async def _not_an_event_stream(
    response: httpx.Response, slot: Slot, where: str, request: httpx.Request, read_by: float
) -> NotAnEventStream:
    """The error for a 200 answer to a streamed call that is not an event stream."""
    slot.release(Outcome("error"))
    head = b""
    with contextlib.suppress(Exception):
        async with asyncio.timeout_at(read_by):
            if isinstance(response.stream, httpx.AsyncByteStream):
                async for chunk in response.stream:
                    head += chunk
                    if len(head) >= _SHOWN_BODY_CHARS:
                        break
    with contextlib.suppress(Exception):
        await response.aclose()
    shown = " ".join(head.decode("utf-8", "replace").split())[:_SHOWN_BODY_CHARS]
    content_type = response.headers.get("content-type") or "no content type"
    return NotAnEventStream(
        f"{where}: answered a streamed call with {content_type!r}, not an event stream; "
        f"is this an OpenAI-compatible server? The body begins: {shown!r}",
        request=request,
    )
