"""Router and routing transport, socket-free: slots never leak, replicas share load,
TTFT/ITL are measured on streamed answers, scrapers feed the adaptive limit."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from pytest_socket import disable_socket, enable_socket

from routing.admission import Outcome
from routing.calls import CallInfo, Role, call_scope
from routing.endpoints import Replica
from routing.exporter import TandemMetrics
from routing.limits import AdaptiveLimit, FixedLimit, Sample
from routing.router import Router
from routing.vllm_metrics import ServerSnapshot, kv_capacity_tokens
from serving.protocol import SESSION_HEADER, STAGE_HEADER

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture(autouse=True)
def _no_network() -> Iterator[None]:
    disable_socket(allow_unix_socket=True)  # the event loop's self-pipe is a unix socketpair
    yield
    enable_socket()


def _sse(n_tokens: int, first_s: float, gap_s: float) -> AsyncIterator[bytes]:
    """One token per event, then the usage chunk and [DONE]."""

    async def body() -> AsyncIterator[bytes]:
        await asyncio.sleep(first_s)
        for i in range(n_tokens):
            if i:
                await asyncio.sleep(gap_s)
            delta = {"choices": [{"delta": {"content": f"t{i}"}}], "usage": None}
            yield f"data: {json.dumps(delta)}\n\n".encode()
        usage = {"choices": [], "usage": {"completion_tokens": n_tokens}}
        yield f"data: {json.dumps(usage)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return body()


def _replica(url: str, gpu: str, handler: httpx.MockTransport) -> Replica:
    return Replica(url=url, model="coder-8b", gpu=gpu, transport=handler)


async def _scraped_adaptive(handler: Any) -> tuple[Router, AdaptiveLimit]:
    """A started router with one adaptive reasoning replica served by `handler`, scraped
    every second, and its limit."""
    router = Router(
        {"reasoning": [_replica("http://h:8001/v1", "gpu0", httpx.MockTransport(handler))]},
        limit="adaptive",
        scrape_interval_s=1.0,
    )
    await router.start()
    limit = router.lanes("reasoning")[0].admission.limit_algorithm
    assert isinstance(limit, AdaptiveLimit)
    return router, limit


def _idle(router: Router) -> bool:
    return all(s["in_flight"] == 0 and s["queued"] == 0 for s in router.stats().values())


async def test_rewrites_url_and_tags_the_session() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"usage": {"completion_tokens": 4}})

    router = Router(
        {"coder": [_replica("http://10.0.0.2:8002/v1", "gpu1", httpx.MockTransport(handler))]},
        limit="fixed-4",
    )
    async with router:
        client = router.client("coder")
        assert client is router.client("coder")
        url = router.base_url("coder") + "/chat/completions?x=1"
        with call_scope(CallInfo("sess-1", "code", "coder", "a/b.py")):
            response = await client.post(url, json=CHAT)
        anonymous = await client.post(url, json=CHAT)
    assert response.status_code == 200 and anonymous.status_code == 200
    assert str(seen[0].url) == "http://10.0.0.2:8002/v1/chat/completions?x=1"
    assert seen[0].headers["host"] == "10.0.0.2:8002"
    assert seen[0].headers[SESSION_HEADER] == "sess-1"
    assert seen[0].headers[STAGE_HEADER] == "code"
    assert SESSION_HEADER not in seen[1].headers
    assert json.loads(seen[0].content) == CHAT
    assert router.model("coder") == "coder-8b"
    assert router.stats()["coder@gpu1"]["admitted"] == 2
    with pytest.raises(KeyError):
        router.model("reasoning")


@pytest.mark.looptime
async def test_no_slot_leaks_under_random_failures() -> None:
    rng = random.Random(7)

    async def handler(request: httpx.Request) -> httpx.Response:
        fate = rng.random()
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        if fate < 0.1:
            raise httpx.ConnectError("refused", request=request)
        if fate < 0.2:
            return httpx.Response(503, json={"error": "overloaded"})
        if fate < 0.3:
            return httpx.Response(500, json={"error": "boom"})
        if fate < 0.4:
            await asyncio.sleep(100.0)  # past the request timeout
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=_sse(rng.randint(1, 20), 0.1, 0.05),
        )

    transport = httpx.MockTransport(handler)
    router = Router(
        {"coder": [_replica(f"http://h{i}/v1", f"gpu{i}", transport) for i in range(2)]},
        limit="fixed-8",
        request_timeout_s=30.0,
    )
    client = router.client("coder")

    async def call(i: int) -> str:
        mode = i % 4
        with call_scope(CallInfo(f"s{i % 5}", "code", "coder")):
            try:
                if mode == 0:  # read everything
                    r = await client.post("http://coder.tandem.internal/v1/x", json=CHAT)
                    return str(r.status_code)
                async with client.stream(
                    "POST", "http://coder.tandem.internal/v1/x", json=CHAT
                ) as r:
                    async for _ in r.aiter_bytes():
                        if mode == 1:
                            break  # client disconnects early
                return "streamed"
            except httpx.HTTPError as exc:
                return type(exc).__name__

    tasks = [asyncio.create_task(call(i)) for i in range(200)]
    await asyncio.sleep(1.0)
    for task in tasks[3::10]:  # cancel some while queued or in flight
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert {"ConnectError", "ReadTimeout", "503", "500", "streamed"} <= {
        r for r in results if isinstance(r, str)
    }
    assert _idle(router)
    stats = router.stats()
    assert sum(s["admitted"] for s in stats.values()) > 150
    assert all(s["peak_in_flight"] <= 8 for s in stats.values())
    await router.aclose()


@pytest.mark.looptime
async def test_unread_body_gives_its_slot_back() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_sse(5, 0.1, 0.1)
        )

    router = Router({"coder": [_replica("http://h/v1", "gpu1", httpx.MockTransport(handler))]})
    client = router.client("coder")
    request = client.build_request("POST", "http://coder.tandem.internal/v1/x", json=CHAT)
    response = await client.send(request, stream=True)  # and never read nor closed
    assert router.stats()["coder@gpu1"]["in_flight"] == 1
    await asyncio.sleep(61.0)
    assert _idle(router)
    assert router.stats()["coder@gpu1"]["cancelled"] == 1
    await response.aclose()  # closing later is harmless
    await router.aclose()


@pytest.mark.looptime
async def test_least_outstanding_spreads_over_replicas() -> None:
    hits: dict[str, int] = {}

    async def handler(request: httpx.Request) -> httpx.Response:
        hits[request.url.host] = hits.get(request.url.host, 0) + 1
        await asyncio.sleep(1.0 if request.url.host == "slow" else 0.1)
        return httpx.Response(200, json={})

    transport = httpx.MockTransport(handler)
    router = Router(
        {
            "coder": [
                _replica("http://slow/v1", "gpu1", transport),
                _replica("http://fast/v1", "gpu2", transport),
            ]
        },
        limit="unlimited",
    )
    client = router.client("coder")

    async def call(delay: float) -> None:
        await asyncio.sleep(delay)
        await client.post("http://coder.tandem.internal/v1/x", json=CHAT)

    await asyncio.gather(*(call(i * 0.05) for i in range(100)))
    assert hits["fast"] > 2 * hits["slow"] > 0
    await router.aclose()


@pytest.mark.looptime
async def test_measures_ttft_and_itl_of_a_stream() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_sse(11, 0.5, 0.02)
        )

    samples: list[Sample] = []

    class Recording(FixedLimit):
        def on_sample(self, sample: Sample) -> None:
            samples.append(sample)

    metrics = TandemMetrics(gpu=False)
    router = Router(
        {"coder": [_replica("http://h/v1", "gpu1", httpx.MockTransport(handler))]},
        metrics=metrics,
    )
    router.lanes("coder")[0].admission.limit_algorithm = Recording(4)
    async with router:
        client = router.client("coder")
        async with client.stream("POST", "http://coder.tandem.internal/v1/x", json=CHAT) as r:
            chunks = [c async for c in r.aiter_bytes()]
    assert len(chunks) >= 1
    (sample,) = samples
    assert sample.ttft_s == pytest.approx(0.5, abs=0.01)
    assert sample.itl_s == pytest.approx(0.02)
    assert sample.in_flight == pytest.approx(1.0)
    page = generate_latest(metrics.registry).decode()
    labels = '{gpu="gpu1",replica="coder@gpu1",role="coder"}'
    assert f"tandem_endpoint_ttft_seconds_count{labels} 1.0" in page
    assert f"tandem_endpoint_admitted_total{labels} 1.0" in page


@pytest.mark.looptime
async def test_non_streamed_answer_gives_time_per_output_token() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(2.0)
        return httpx.Response(200, json={"usage": {"completion_tokens": 100}})

    samples: list[Sample] = []

    class Recording(FixedLimit):
        def on_sample(self, sample: Sample) -> None:
            samples.append(sample)

    router = Router({"coder": [_replica("http://h/v1", "gpu1", httpx.MockTransport(handler))]})
    router.lanes("coder")[0].admission.limit_algorithm = Recording(4)
    await router.client("coder").post("http://coder.tandem.internal/v1/x", json={})
    assert samples[0].tpot_s == pytest.approx(0.02) and samples[0].itl_s is None
    await router.aclose()


@pytest.mark.looptime
async def test_scrapers_feed_the_adaptive_limit_and_stale_means_saturated() -> None:
    page = (FIXTURES / "vllm_metrics_v1.txt").read_text()
    up = [True]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(200, text=page) if up[0] else httpx.Response(502)
        return httpx.Response(200, json={})

    router, limit = await _scraped_adaptive(handler)
    await router.start()  # idempotent
    await asyncio.sleep(0.5)
    assert limit.server_state(asyncio.get_running_loop().time()) == "hold"  # waiting=3
    before = limit.limit
    up[0] = False
    await asyncio.sleep(10.0)
    assert limit.server_state(asyncio.get_running_loop().time()) == "saturated"
    assert limit.limit < before
    await router.aclose()


@pytest.mark.looptime
async def test_a_server_slow_to_answer_its_metrics_is_not_taken_for_a_stale_one() -> None:
    """Each /metrics page takes 1.8 s (inside the 2 s scrape timeout): a snapshot then starts
    1.8 s old, and the next arrives 2.8 s after it. Stamped at the send, one would read as
    stale (over 3 intervals) between pages and the limit would back off; stamped when the page
    came, the server stays "spare". A scraper that stops getting pages still ends "saturated"."""
    page = (
        (FIXTURES / "vllm_metrics_v1.txt").read_text().replace('engine="0"} 3.0', 'engine="0"} 0.0')
    )  # no queue
    answering = [True]

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            await asyncio.sleep(1.8 if answering[0] else 3600.0)
            return httpx.Response(200, text=page)
        return httpx.Response(200, json={})

    router, limit = await _scraped_adaptive(handler)
    loop = asyncio.get_running_loop()
    before = limit.limit
    states = []
    for _ in range(60):  # 30 s, polled every half second
        await asyncio.sleep(0.5)
        states.append(limit.server_state(loop.time()))
    assert "saturated" not in states[4:], states
    assert limit.limit >= before  # never backed off (the page's 42 running let it grow)
    answering[0] = False
    await asyncio.sleep(10.0)  # timed-out scrapes: failed snapshots
    assert limit.server_state(loop.time()) == "saturated"
    await router.aclose()


def test_bad_policy_strings_fail_fast() -> None:
    eps: dict[Role, list[Replica]] = {"coder": [Replica("http://h/v1", "m", "gpu1")]}
    with pytest.raises(ValueError):
        Router(eps, limit="fixed-")
    with pytest.raises(ValueError):
        Router(eps, order="lifo")


def test_exporter_series_and_absent_gpu() -> None:
    metrics = TandemMetrics()
    metrics.stage_latency("plan", 3.5)
    metrics.session_progress("s1", 3, 12)
    metrics.parallel_tasks(7)
    page = generate_latest(metrics.registry).decode()
    assert 'tandem_stage_latency_seconds_count{stage="plan"} 1.0' in page
    assert 'tandem_session_progress_ratio{session="s1"} 0.25' in page
    assert "tandem_parallel_tasks 7.0" in page
    if metrics.nvml is not None and not metrics.nvml.present:
        assert "tandem_gpu_utilization_percent" not in page  # absent, never 0


def test_kv_capacity_from_cache_config_info() -> None:
    page = (FIXTURES / "vllm_metrics_v1.txt").read_text()
    assert kv_capacity_tokens(page) == 41524 * 16
    assert kv_capacity_tokens("vllm:num_requests_running 1\n") is None
    assert kv_capacity_tokens("not { a page") is None


@pytest.mark.looptime
async def test_scraper_gives_the_adaptive_limit_its_kv_capacity() -> None:
    page = (FIXTURES / "vllm_metrics_v1.txt").read_text()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=page)

    router = Router(
        {"reasoning": [_replica("http://h:8001/v1", "gpu0", httpx.MockTransport(handler))]},
        limit="adaptive",
    )
    async with router:
        await asyncio.sleep(2.5)
        limit = router.lanes("reasoning")[0].admission.limit_algorithm
        assert isinstance(limit, AdaptiveLimit)
        assert limit.kv_capacity_tokens == 41524 * 16


@pytest.mark.looptime
async def test_scrapes_go_to_any_limit_that_watches_the_server_and_to_no_other() -> None:
    page = (FIXTURES / "vllm_metrics_v1.txt").read_text()
    scraped: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            scraped.append(request.url.host)
        return httpx.Response(200, text=page)

    class Watching(FixedLimit):
        """Not an AdaptiveLimit: a fixed limit that has the watcher and KV pieces."""

        def __init__(self) -> None:
            super().__init__(4)
            self.snapshots: list[float] = []
            self.kv_tokens: list[int] = []

        def watch_server(self, now: float, stale_after_s: float) -> None:
            self.snapshots.clear()

        def on_snapshot(self, snapshot: ServerSnapshot, now: float) -> None:
            self.snapshots.append(now)

        def set_kv_capacity(self, tokens: int) -> None:
            self.kv_tokens.append(tokens)

    router = Router(
        {
            "reasoning": [_replica("http://watched:8001/v1", "gpu0", httpx.MockTransport(handler))],
            "coder": [_replica("http://fixed:8002/v1", "gpu1", httpx.MockTransport(handler))],
        },
        limit="fixed-4",
        scrape_interval_s=1.0,
    )
    watching = Watching()
    router.lanes("reasoning")[0].admission.limit_algorithm = watching
    async with router:
        await asyncio.sleep(2.5)
    assert watching.snapshots == [0.0, 1.0, 2.0]
    assert watching.kv_tokens == [41524 * 16] * 3
    assert set(scraped) == {"watched"}  # the fixed coder limit reads nothing from its server


@pytest.mark.looptime
async def test_finish_estimate_from_measured_latency_and_queue() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_sse(11, 0.5, 0.02)
        )

    router = Router(
        {"coder": [_replica("http://h/v1", "gpu1", httpx.MockTransport(handler))]},
        limit="fixed-2",
    )
    assert router.estimate_finish_s("coder", 100) is None  # nothing measured yet
    assert router.estimate_finish_s("reasoning", 100) is None  # no such role
    client = router.client("coder")
    async with client.stream("POST", "http://coder.tandem.internal/v1/x", json=CHAT) as r:
        _ = [c async for c in r.aiter_bytes()]
    lane = router.lanes("coder")[0]
    itl = 0.02
    assert lane.latency.ttft_s == pytest.approx(0.5, abs=0.01)
    assert lane.latency.itl_s == pytest.approx(itl)
    idle = router.estimate_finish_s("coder", 100)
    assert idle == pytest.approx(0.5 + 100 * itl, abs=0.2)
    # Both slots held and three calls queued: wait for 2 of them to clear 2 slots.
    slots = [await lane.admission.acquire("s") for _ in range(2)]
    waiters = [asyncio.ensure_future(lane.admission.acquire("s")) for _ in range(3)]
    await asyncio.sleep(0)
    service = lane.latency.service_s
    assert service is not None and idle is not None
    busy = router.estimate_finish_s("coder", 100)
    assert busy == pytest.approx(idle + 4 * service / 2)
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    for slot in slots:
        slot.release(Outcome("cancelled"))
    await router.aclose()


@pytest.mark.looptime
async def test_a_router_nobody_started_starts_on_its_first_call() -> None:
    # Under LangGraph Server the graph's router is never entered with `async with`: its
    # first call starts it, so the adaptive limit's /metrics scrapers run there too.
    page = (FIXTURES / "vllm_metrics_v1.txt").read_text()
    scraped: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            scraped.append(asyncio.get_running_loop().time())
            return httpx.Response(200, text=page)
        return httpx.Response(200, json={"choices": [], "usage": {"completion_tokens": 1}})

    transport = httpx.MockTransport(handler)
    router = Router(
        {
            "reasoning": [_replica("http://a:8001/v1", "gpu0", transport)],
            "coder": [_replica("http://b:8002/v1", "gpu1", transport)],
        },
        limit="adaptive",
        scrape_interval_s=1.0,
    )
    await asyncio.sleep(5.0)
    assert not scraped  # nothing runs before a call
    client = router.client("coder")
    calls = [
        client.post(f"{router.base_url('coder')}/chat/completions", json=CHAT) for _ in range(3)
    ]
    answers = await asyncio.gather(*calls)
    assert all(a.status_code == 200 for a in answers)
    await asyncio.sleep(3.5)
    assert len(scraped) >= 6  # both replicas, every second since the first call
    await router.aclose()


@pytest.mark.looptime
async def test_a_models_read_takes_no_slot_and_waits_behind_no_call() -> None:
    """GET /v1/models (the context window lookup) is not GPU work: with the one slot held by
    a streaming call, it is answered at once and counts as no admitted call."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url}")
        if request.method == "GET":
            return httpx.Response(200, json={"data": [{"id": "coder-8b", "max_model_len": 8}]})
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=_sse(5, 0.5, 0.5)
        )

    router = Router(
        {"coder": [_replica("http://h/v1", "gpu1", httpx.MockTransport(handler))]},
        limit="fixed-1",
    )
    async with router:
        client = router.client("coder")
        base = router.base_url("coder")
        with call_scope(CallInfo("s", "code", "coder", "a.py")):
            streaming = await client.send(
                client.build_request("POST", f"{base}/chat/completions", json=CHAT), stream=True
            )
            loop = asyncio.get_running_loop()
            start = loop.time()
            models = await client.get(f"{base}/models")
            took = loop.time() - start
        assert models.json()["data"][0]["max_model_len"] == 8
        assert took < 0.01  # the one slot is the stream's, and the read did not wait for it
        assert router.stats()["coder@gpu1"]["admitted"] == 1
        await streaming.aread()
        await streaming.aclose()
    assert seen == ["POST http://h/v1/chat/completions", "GET http://h/v1/models"]
    assert _idle(router)


async def test_a_calls_output_cap_reaches_the_limit_with_its_stage() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"usage": {"completion_tokens": 4}})

    router = Router(
        {"reasoning": [_replica("http://h:8001/v1", "gpu0", httpx.MockTransport(handler))]},
        limit="adaptive",
    )
    noted: list[tuple[str, int]] = []
    limit = router.lanes("reasoning")[0].admission.limit_algorithm
    assert isinstance(limit, AdaptiveLimit)
    limit.note_output_cap = lambda kind, tokens: noted.append((kind, tokens))  # type: ignore[method-assign]
    async with router:
        client = router.client("reasoning")
        url = router.base_url("reasoning") + "/chat/completions"
        with call_scope(CallInfo("s", "plan", "reasoning")):
            await client.post(url, json={**CHAT, "stream": False, "max_tokens": 8_000})
            await client.post(url, json={**CHAT, "max_completion_tokens": 900, "max_tokens": 5})
            await client.post(url, json=CHAT)  # no cap
            await client.post(url, json={**CHAT, "max_tokens": "many"})  # not a count
        with call_scope(CallInfo("s", "review", "reasoning")):
            await client.post(url, json={**CHAT, "max_tokens": 6_000})
    assert noted == [("plan", 8_000), ("plan", 900), ("review", 6_000)]
