"""The one retry layer: each model call through the real ChatOpenAI -> router path, retried
on transport and server failures with full-jitter back-off (delays recorded, not slept),
never on a refused request or a non-API answer; the final error names role, URL and cause."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage

from nodes.llm import (
    CallRetry,
    ModelCallError,
    RoutedModels,
    Usage,
    complete_structured,
    complete_text,
)
from nodes.schemas import Plan
from routing.calls import CallInfo
from routing.endpoints import Replica
from routing.router import Router
from tests.fakes import ScriptedChatModel

INFO = CallInfo(session_id="s1", stage="code", role="coder", file="a.py")
MESSAGES = [HumanMessage(content="write a.py")]
PLAN = {"summary": "s", "files": [{"path": "a.py", "purpose": "p"}]}

Answer = Callable[[httpx.Request], httpx.Response]


def _sse_body(content: str, cut: bool = False) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': {'content': content}}]})}\n\n".encode()  # noqa: E501
        if cut:
            raise httpx.RemoteProtocolError("peer closed connection without sending complete body")
        done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(done)}\n\n".encode()
        usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return body()


def ok(content: str = "print('hi')\n") -> Answer:
    return lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=_sse_body(content)
    )


def status(code: int) -> Answer:
    return lambda request: httpx.Response(code, json={"error": {"message": f"status {code}"}})


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def cut(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=_sse_body("x", cut=True)
    )


def html(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/html"}, content=b"<h1>Login</h1>")


class Server:
    """Answers each call with the next scripted answer (the last one repeats)."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        return answer(request)


class Delays:
    """Records the back-off sleeps instead of sleeping."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def _models(server: Server, retry: CallRetry, **router_args: Any) -> tuple[RoutedModels, Router]:
    replica = Replica(
        url="http://10.0.0.2:8002/v1", model="m", gpu="gpu1", transport=httpx.MockTransport(server)
    )
    router = Router({"coder": [replica], "reasoning": [replica]}, limit="fixed-4", **router_args)
    return RoutedModels(router=router, call_retry=retry), router


def _policy(delays: Delays, retries: int = 3, draw: float = 1.0) -> CallRetry:
    return CallRetry(retries=retries, base_s=0.5, cap_s=8.0, sleep=delays, random=lambda: draw)


async def test_server_errors_are_retried_with_exponential_back_off() -> None:
    server = Server(status(503), status(500), status(429), ok("done\n"))
    delays = Delays()
    models, router = _models(server, _policy(delays))
    usage = Usage()
    text, _ = await complete_text(models.for_role("coder"), MESSAGES, INFO, usage)
    assert text == "done"
    assert server.calls == 4 and usage.calls == 1
    assert delays.seconds == [0.5, 1.0, 2.0]  # the jitter draw is at its top here
    assert all(s["in_flight"] == 0 for s in router.stats().values())
    await router.aclose()


def test_back_off_is_full_jitter_under_a_cap() -> None:
    policy = CallRetry(base_s=0.5, cap_s=8.0, random=lambda: 0.5)
    assert [policy.backoff_s(n) for n in (1, 2, 3, 4, 5, 6, 9)] == [
        0.25,
        0.5,
        1.0,
        2.0,
        4.0,
        4.0,
        4.0,
    ]
    assert CallRetry(random=lambda: 0.0).backoff_s(3) == 0.0


async def test_an_unreachable_replica_fails_naming_url_cause_and_attempts() -> None:
    server = Server(refused)
    delays = Delays()
    models, router = _models(server, _policy(delays))
    with pytest.raises(ModelCallError) as caught:
        await complete_text(models.for_role("coder"), MESSAGES, INFO, Usage())
    message = str(caught.value)
    assert message.startswith("coder at http://10.0.0.2:8002/v1: cannot connect")
    assert "Connection refused" in message and message.endswith("gave up after 4 attempts")
    assert server.calls == 4 and len(delays.seconds) == 3
    assert caught.value.attempts == 4 and caught.value.retryable
    await router.aclose()


async def test_a_cut_stream_is_retried() -> None:
    server = Server(cut, ok("whole\n"))
    delays = Delays()
    models, router = _models(server, _policy(delays))
    text, _ = await complete_text(models.for_role("coder"), MESSAGES, INFO, Usage())
    assert text == "whole" and server.calls == 2 and len(delays.seconds) == 1
    assert all(s["in_flight"] == 0 for s in router.stats().values())
    await router.aclose()


@pytest.mark.looptime
async def test_a_hung_call_is_cut_and_retried() -> None:
    class Hanging(Server):
        async def __call__(self, request: httpx.Request) -> httpx.Response:
            self.calls += 1
            if self.calls == 1:
                await asyncio.sleep(10_000)  # accepted, never answered
            return ok("late\n")(request)

    server = Hanging()
    delays = Delays()
    models, router = _models(server, _policy(delays), first_token_timeout_s=4.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    text, _ = await complete_text(models.for_role("coder"), MESSAGES, INFO, Usage())
    assert text == "late" and server.calls == 2
    assert loop.time() - started == pytest.approx(4.0, abs=0.05)  # sleeps are recorded only
    await router.aclose()


async def test_an_html_answer_is_not_retried_and_says_what_came_back() -> None:
    server = Server(html)
    delays = Delays()
    models, router = _models(server, _policy(delays))
    with pytest.raises(ModelCallError) as caught:
        await complete_text(models.for_role("coder"), MESSAGES, INFO, Usage())
    message = str(caught.value)
    assert "coder at http://10.0.0.2:8002/v1" in message and "text/html" in message
    assert "<h1>Login</h1>" in message and message.endswith("gave up after 1 attempt")
    assert server.calls == 1 and delays.seconds == [] and not caught.value.retryable
    await router.aclose()


async def test_a_refused_request_is_not_retried_nor_wrapped() -> None:
    server = Server(status(400))
    delays = Delays()
    models, router = _models(server, _policy(delays))
    with pytest.raises(openai.BadRequestError):
        await complete_text(models.for_role("coder"), MESSAGES, INFO, Usage())
    assert server.calls == 1 and delays.seconds == []
    await router.aclose()


async def test_a_server_error_that_persists_names_the_status() -> None:
    server = Server(status(503))
    models, router = _models(server, _policy(Delays(), retries=1))
    with pytest.raises(ModelCallError) as caught:
        await complete_text(models.for_role("coder"), MESSAGES, INFO, Usage())
    assert str(caught.value).startswith("coder at http://10.0.0.2:8002/v1: HTTP 503")
    assert caught.value.status_code == 503 and server.calls == 2
    await router.aclose()


async def test_structured_calls_retry_transport_failures_apart_from_bad_output() -> None:
    server = Server(status(502), ok("not json"), status(504), ok(json.dumps(PLAN)))
    delays = Delays()
    models, router = _models(server, _policy(delays))
    info = CallInfo(session_id="s1", stage="plan", role="reasoning")
    plan = await complete_structured(
        models.for_role("reasoning"), Plan, MESSAGES, info, Usage(), retries=1
    )
    assert [f.path for f in plan.files] == ["a.py"]
    assert server.calls == 4 and len(delays.seconds) == 2  # one back-off per transport retry
    await router.aclose()


async def test_models_built_outside_the_factory_are_not_retried() -> None:
    model = ScriptedChatModel(responder=lambda messages, kwargs: httpx.ConnectError("down"))
    with pytest.raises(ModelCallError, match="gave up after 1 attempt"):
        await complete_text(model, MESSAGES, INFO, Usage())
    assert len(model.calls) == 1
