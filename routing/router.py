"""The router: one admission per replica shared by every graph run, and an HTTP client per role.

router = Router(load_endpoints_file("endpoints.yaml"), limit="adaptive", order="las")
async with router:
    llm = ChatOpenAI(base_url=router.base_url("coder"), model=router.model("coder"),
                     http_async_client=router.client("coder"))
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from routing.admission import PREFIX_HOLD_S, Admission, AdmissionObserver
from routing.calls import CallInfo, Role
from routing.endpoints import Endpoints, Replica, redact
from routing.exporter import TandemMetrics
from routing.limits import KvBounded, ServerWatcher, make_limit
from routing.orders import ServiceLedger, make_order

if TYPE_CHECKING:
    from routing.shared_admission import SharedAdmission
from routing.transport import REQUEST_TIMEOUT_S, Lane, RoutingTransport
from routing.vllm_metrics import ServerSnapshot, scrape

# A snapshot is stamped when its page arrived; the next one arrives at most one interval
# plus one scrape timeout (two intervals) later from a server that still answers. Older than
# that, the scraper itself has stopped (a failed or timed-out scrape is reported at once).
SCRAPE_TIMEOUT_INTERVALS = 2
STALE_AFTER_INTERVALS = 1 + SCRAPE_TIMEOUT_INTERVALS + 1


def lane_finish_s(lane: Lane, expected_output_tokens: int) -> float | None:
    """When a call sent to `lane` now would end, from what the router measured; None if unknown.

    Wait for a slot (calls queued ahead past the free slots, each slot freeing every mean
    service time / limit), then the measured TTFT, then the tokens at the measured ITL.
    """
    latency = lane.latency
    if latency.itl_s is None:
        return None
    admission = lane.admission
    limit = admission.limit
    free = limit - admission.in_flight
    ahead = admission.queued
    wait_s = 0.0
    if ahead >= free:
        wait_s = (ahead - free + 1) * (latency.service_s or 0.0) / max(1, limit)
    return wait_s + (latency.ttft_s or 0.0) + max(0, expected_output_tokens) * latency.itl_s


class Router:
    """Routes each role's calls over its replicas with per-replica admission.

    Args:
        endpoints: Replicas per role.
        limit: "unlimited", "fixed-N" or "adaptive" (one limit per replica).
        order: "fifo", "las" (least attained service per session, with aging) or "oldest"
            (the session that arrived first); "las" and "oldest" also hold a session's calls
            behind its prefix leader, see `routing.admission`.
        metrics: Where to export `tandem_*` series.
        scrape_interval_s: How often adaptive limits read each server's `/metrics`.
        request_timeout_s: Bound on one call from admission to the end of its body.
        connect_timeout_s: Bound on opening a connection to a replica (also the preflight's).
        first_token_timeout_s: Floor of the bound from sending a streamed call to its first
            chunk (raised per replica with its measured TTFT); None: no such bound.
        stream_idle_timeout_s: Most silence between chunks of a streamed answer; None: no
            such bound.
        admission_url: A Redis URL: every process whose router names it shares each
            replica's admission budget (`routing.shared_admission`); None: this process only.
    """

    def __init__(
        self,
        endpoints: Endpoints,
        *,
        limit: str = "adaptive",
        order: str = "fifo",
        metrics: TandemMetrics | None = None,
        scrape_interval_s: float = 1.0,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        connect_timeout_s: float = 5.0,
        first_token_timeout_s: float | None = None,
        stream_idle_timeout_s: float | None = None,
        admission_url: str | None = None,
    ) -> None:
        make_limit(limit)  # fail fast on a bad policy string
        self.metrics = metrics
        self.scrape_interval_s = scrape_interval_s
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.ledger = ServiceLedger()
        self._network: httpx.AsyncHTTPTransport | None = None
        self._lanes: dict[Role, list[Lane]] = {}
        self._clients: dict[Role, httpx.AsyncClient] = {}
        self._scrapers: list[asyncio.Task[None]] = []
        self._scrape_client: httpx.AsyncClient | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._transports: list[RoutingTransport] = []
        self._shared: list[SharedAdmission] = []  # admissions whose budget lives in Redis
        names: set[str] = set()
        for role, replicas in endpoints.items():
            if not replicas:
                raise ValueError(f"role {role!r} has no replicas")
            lanes = []
            for replica in replicas:
                name = f"{role}@{replica.gpu}"
                n = 2
                while name in names:
                    name, n = f"{role}@{replica.gpu}#{n}", n + 1
                names.add(name)
                observer: AdmissionObserver | None = (
                    metrics.endpoint(role, name, replica.gpu) if metrics is not None else None
                )
                admission: Admission
                if admission_url is not None:
                    # One budget per replica across every process that names it the same
                    # (imported here: redis is needed only then).
                    from routing.shared_admission import SharedAdmission

                    admission = SharedAdmission(
                        name,
                        make_limit(limit),
                        url=admission_url,
                        order=order,
                        ledger=self.ledger,
                        observer=observer,
                        prefix_hold_s=PREFIX_HOLD_S if order != "fifo" else None,
                    )
                    self._shared.append(admission)
                else:
                    admission = Admission(
                        name,
                        make_limit(limit),
                        make_order(order, self.ledger),
                        self.ledger,
                        observer,
                        # Program-aware orders keep a session's prefix computed once.
                        prefix_hold_s=PREFIX_HOLD_S if order != "fifo" else None,
                    )
                if observer is not None:
                    observer.on_state(admission.limit, 0, 0)
                lanes.append(Lane(name, replica, admission, self._transport_for(replica)))
            self._lanes[role] = lanes
            transport = RoutingTransport(
                role,
                lanes,
                synthetic_base=self.base_url(role),
                request_timeout_s=request_timeout_s,
                connect_timeout_s=connect_timeout_s,
                first_token_timeout_s=first_token_timeout_s,
                stream_idle_timeout_s=stream_idle_timeout_s,
            )
            transport.before_first_call = self._start_on_first_call
            transport.on_answered = functools.partial(self._count_review, role)
            self._transports.append(transport)
            # The routing transport owns the timeouts; httpx's own covers connect/IO only.
            self._clients[role] = httpx.AsyncClient(
                transport=transport,
                timeout=httpx.Timeout(request_timeout_s, connect=connect_timeout_s),
            )

    def _count_review(self, role: Role, info: CallInfo) -> None:
        """Count a review call `role` answered (told by its transport, not by an httpx
        response hook: a hook costs each call more than a tenth of the router's own time)."""
        if self.metrics is not None and info.stage == "review":
            self.metrics.review_answered(role)

    def _transport_for(self, replica: Replica) -> httpx.AsyncBaseTransport:
        if replica.transport is not None:
            return replica.transport
        if self._network is None:
            self._network = httpx.AsyncHTTPTransport(
                # vLLM's uvicorn closes idle keep-alive connections after 5 s; expiring ours
                # first avoids reusing one the server is closing (a spurious ReadError).
                limits=httpx.Limits(
                    max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0
                )
            )
        return self._network

    def _role_lanes(self, role: Role) -> list[Lane]:
        try:
            return self._lanes[role]
        except KeyError:
            raise KeyError(f"no endpoints configured for role {role!r}") from None

    def client(self, role: Role) -> httpx.AsyncClient:
        """The HTTP client whose transport routes `role`'s calls (one per role)."""
        self._role_lanes(role)
        return self._clients[role]

    def base_url(self, role: Role) -> str:
        """The synthetic OpenAI base URL of `role`; the transport rewrites it."""
        return f"http://{role}.tandem.internal/v1"

    def model(self, role: Role) -> str:
        """The served model name of `role` (its first replica's)."""
        return self._role_lanes(role)[0].replica.model

    def lanes(self, role: Role) -> list[Lane]:
        """The replicas of `role` with their admissions."""
        return list(self._role_lanes(role))

    def estimate_finish_s(self, role: Role, expected_output_tokens: int) -> float | None:
        """Seconds until a call of `role` sent now would finish, on its best replica.

        Built only from what the router observes (its in-flight and queued counts, limits,
        and the TTFT/ITL it measured per replica). None when the role has no replicas or
        none has answered yet: the caller should then fall back to its default.
        """
        estimates = [
            e
            for lane in self._lanes.get(role, [])
            if (e := lane_finish_s(lane, expected_output_tokens)) is not None
        ]
        return min(estimates, default=None)

    async def preflight(self, api_key: str | None = None) -> list[str]:
        """Ask every replica for its model list; describe each one that cannot serve.

        One `GET {url}/models` per replica, concurrently, each bounded by the connect
        timeout (for the whole answer, so a server that accepts and never answers is found
        as fast as one that refuses).

        Args:
            api_key: Sent as a bearer token (vLLM started with `--api-key` asks for one).

        Returns:
            One line per problem, naming the role, the replica's URL (credentials redacted)
            and what is wrong: no answer, an HTTP status, or the model not served (with the
            models that are). Empty when every replica serves its model.
        """
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        found = await asyncio.gather(
            *(
                self._check_replica(role, lane, headers)
                for role, lanes in self._lanes.items()
                for lane in lanes
            )
        )
        secrets = [api_key] if api_key else []
        return [redact(problem, secrets) for problem in found if problem is not None]

    async def _check_replica(self, role: Role, lane: Lane, headers: dict[str, str]) -> str | None:
        replica = lane.replica
        url = f"{replica.url.rstrip('/')}/models"
        where = f"{role} at {replica.shown_url}"
        timeout_s = self.connect_timeout_s
        async with httpx.AsyncClient(
            transport=_Unclosed(lane.transport), timeout=httpx.Timeout(timeout_s)
        ) as client:
            try:
                async with asyncio.timeout(timeout_s):
                    response = await client.get(url, headers=headers)
            except (TimeoutError, httpx.TimeoutException):
                return f"{where}: no answer to GET /models within {timeout_s:g} s"
            except httpx.HTTPError as exc:
                return f"{where}: does not answer ({exc or type(exc).__name__})"
        if response.status_code != 200:
            return f"{where}: GET /models answered HTTP {response.status_code}"
        try:
            cards = response.json().get("data")
            served = [str(card["id"]) for card in cards]
        except (ValueError, AttributeError, TypeError, KeyError):
            return f"{where}: GET /models did not answer an OpenAI model list"
        if replica.model not in served:
            listed = ", ".join(repr(name) for name in served) or "none"
            return f"{where}: model {replica.model!r} is not served (served: {listed})"
        return None

    async def _start_on_first_call(self) -> None:
        """Start on the first call when nobody did (a graph under LangGraph Server, whose
        runs never enter `async with router`): scrapers and shared admission then run too."""
        if self._started:
            for transport in self._transports:
                transport.before_first_call = None
            return
        async with self._start_lock:
            await self.start()

    async def start(self) -> None:
        """Start a `/metrics` scraper for each replica whose limit reads the server (idempotent)."""
        if self._started:
            return
        for shared in self._shared:
            await shared.start()  # raises AdmissionStoreUnavailable
        self._started = True
        now = asyncio.get_running_loop().time()
        stale_after_s = STALE_AFTER_INTERVALS * self.scrape_interval_s
        for lanes in self._lanes.values():
            for lane in lanes:
                watcher = lane.admission.limit_algorithm
                if not isinstance(watcher, ServerWatcher):
                    continue
                watcher.watch_server(now, stale_after_s)
                self._scrapers.append(
                    asyncio.create_task(
                        self._scrape_loop(lane, watcher), name=f"scrape {lane.name}"
                    )
                )

    async def _scrape_loop(self, lane: Lane, watcher: ServerWatcher) -> None:
        loop = asyncio.get_running_loop()
        url = lane.replica.scrape_url()
        timeout_s = SCRAPE_TIMEOUT_INTERVALS * self.scrape_interval_s
        async with httpx.AsyncClient(
            transport=_Unclosed(lane.transport), timeout=timeout_s
        ) as client:
            while True:
                sent_at = loop.time()
                try:
                    async with asyncio.timeout(timeout_s):
                        snapshot = await scrape(client, url, sent_at)
                except TimeoutError:
                    snapshot = ServerSnapshot.failed(sent_at, "scrape timed out")
                if snapshot.ok:
                    # The page says how the server was when it answered: a server slow to
                    # answer (its API process busy) is not thereby out of date.
                    snapshot = dataclasses.replace(snapshot, taken_at=loop.time())
                # The page that gives the load also gives the KV cache size.
                if snapshot.kv_capacity_tokens is not None and isinstance(watcher, KvBounded):
                    watcher.set_kv_capacity(snapshot.kv_capacity_tokens)
                lane.admission.on_snapshot(snapshot)
                await asyncio.sleep(self.scrape_interval_s)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per replica: role, url, limit, in_flight, queued, admitted, failed, peak_in_flight."""
        out: dict[str, dict[str, Any]] = {}
        for role, lanes in self._lanes.items():
            for lane in lanes:
                out[lane.name] = {
                    "role": role,
                    "url": lane.replica.url,
                    **lane.admission.stats(),
                }
        return out

    async def aclose(self) -> None:
        """Stop scrapers and close the clients and the shared network transport."""
        for task in self._scrapers:
            task.cancel()
        for task in self._scrapers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._scrapers.clear()
        self._started = False
        for shared in self._shared:
            await shared.aclose()
        for client in self._clients.values():
            await client.aclose()
        if self._network is not None:
            await self._network.aclose()

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Unclosed(httpx.AsyncBaseTransport):
    """Lends a transport to a short-lived client without letting the client close it."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        return None
