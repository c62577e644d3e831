"""`Router.preflight`: every replica asked for its models; each problem names the URL."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from routing.endpoints import Replica
from routing.router import Router
from serving.emulator.app import create_app
from serving.emulator.transport import InProcessTransport


def _emulator(model: str) -> InProcessTransport:
    return InProcessTransport(create_app("cpu-tiny", served_model_name=model))


async def test_replicas_that_serve_their_models_pass() -> None:
    router = Router(
        {
            "reasoning": [Replica("http://gpu0:8001/v1", "tiny-r", "gpu0", _emulator("tiny-r"))],
            "coder": [Replica("http://gpu1:8002/v1", "tiny-c", "gpu1", _emulator("tiny-c"))],
        }
    )
    assert await router.preflight() == []
    await router.aclose()


async def test_a_model_the_server_does_not_serve_lists_what_it_serves() -> None:
    router = Router(
        {"coder": [Replica("http://u:pw@gpu1:8002/v1", "qwen-coder", "gpu1", _emulator("tiny"))]}
    )
    (problem,) = await router.preflight()
    assert problem == (
        "coder at http://***@gpu1:8002/v1: model 'qwen-coder' is not served (served: 'tiny')"
    )
    await router.aclose()


@pytest.mark.looptime
async def test_each_replica_that_cannot_answer_is_named_with_its_problem() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "refused":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if host == "hung":
            await asyncio.sleep(10_000)
        if host == "locked":
            assert request.headers["authorization"] == "Bearer sk-secret"
            return httpx.Response(401, json={"error": "no"})
        if host == "html":
            return httpx.Response(200, html="<html>hello</html>")
        return httpx.Response(200, json={"data": [{"id": "m"}]})

    mock = httpx.MockTransport(handler)
    hosts = ["refused", "hung", "locked", "html", "fine"]
    router = Router(
        {
            "coder": [
                Replica(f"http://{h}:8002/v1", "m", f"gpu{i}", mock) for i, h in enumerate(hosts)
            ]
        },
        connect_timeout_s=3.0,
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    problems = await router.preflight(api_key="sk-secret")
    assert loop.time() - started == pytest.approx(3.0, abs=0.01)  # replicas asked together
    assert problems == [
        "coder at http://refused:8002/v1: does not answer ([Errno 111] Connection refused)",
        "coder at http://hung:8002/v1: no answer to GET /models within 3 s",
        "coder at http://locked:8002/v1: GET /models answered HTTP 401",
        "coder at http://html:8002/v1: GET /models did not answer an OpenAI model list",
    ]
    assert not any("sk-secret" in p for p in problems)
    await router.aclose()
