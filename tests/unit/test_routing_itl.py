"""The router's latency signal per generated token, and error answers released as errors.

Socket-free: replicas are `httpx.MockTransport`s whose bodies sleep on the test's virtual
clock, so token times are exact.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from langchain_core.messages import HumanMessage
from openai import InternalServerError
from pydantic import SecretStr

from nodes.llm import VLLMChatOpenAI
from routing.endpoints import Replica
from routing.limits import FixedLimit, Sample
from routing.router import Router
from routing.transport import stream_completion_tokens

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
URL = "http://coder.tandem.internal/v1/chat/completions"
TOKENS = 801
FIRST_S = 0.3
GAP_S = 0.005


def _event(payload: dict[str, object] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _answer(tokens_per_event: int, *, usage: bool = True, split: bool = False) -> httpx.Response:
    """`TOKENS` tokens at FIRST_S + i * GAP_S; the first alone, then `tokens_per_event` each.

    An event leaves when its last token exists, as a server that coalesces tokens sends it.
    With `split`, each event travels as two body chunks cut mid-JSON.
    """

    async def body() -> AsyncIterator[bytes]:
        await asyncio.sleep(FIRST_S)
        yield _event({"choices": [{"delta": {"role": "assistant", "content": "t0"}}]})
        sent, now_s = 1, FIRST_S
        while sent < TOKENS:
            last = min(TOKENS, sent + tokens_per_event) - 1
            await asyncio.sleep(FIRST_S + last * GAP_S - now_s)
            now_s = FIRST_S + last * GAP_S
            text = "".join(f"t{i}" for i in range(sent, last + 1))
            event = _event({"choices": [{"delta": {"content": text}}], "usage": None})
            if split:
                yield event[: len(event) // 2]
                yield event[len(event) // 2 :]
            else:
                yield event
            sent = last + 1
        yield _event({"choices": [{"delta": {}, "finish_reason": "stop"}]})
        if usage:
            yield _event({"choices": [], "usage": {"completion_tokens": TOKENS}})
        yield _event("[DONE]")

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


class Recording(FixedLimit):
    """A fixed limit that keeps every sample it is fed."""

    def __init__(self) -> None:
        super().__init__(8)
        self.samples: list[Sample] = []

    def on_sample(self, sample: Sample) -> None:
        self.samples.append(sample)


def _router(handler: httpx.MockTransport) -> tuple[Router, Recording]:
    router = Router(
        {"coder": [Replica(url="http://h/v1", model="m", gpu="gpu1", transport=handler)]},
        limit="fixed-8",
    )
    recording = Recording()
    router.lanes("coder")[0].admission.limit_algorithm = recording
    return router, recording


async def _stream_once(response: httpx.Response) -> tuple[Router, Sample]:
    router, recording = _router(httpx.MockTransport(lambda request: response))
    async with router.client("coder").stream("POST", URL, json=CHAT) as r:
        _ = [chunk async for chunk in r.aiter_bytes()]
    await router.aclose()
    (sample,) = recording.samples
    return router, sample


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("tokens_per_event", "split"), [(1, False), (200, False), (200, True), (37, True)]
)
async def test_itl_is_per_token_whatever_the_tokens_per_event(
    tokens_per_event: int, split: bool
) -> None:
    router, sample = await _stream_once(_answer(tokens_per_event, split=split))
    assert sample.ok and sample.ttft_s == pytest.approx(FIRST_S)
    assert sample.itl_s == pytest.approx(GAP_S)
    assert router.lanes("coder")[0].latency.itl_s == pytest.approx(GAP_S)


@pytest.mark.looptime
async def test_a_stream_without_usage_gives_ttft_but_no_itl() -> None:
    router, sample = await _stream_once(_answer(200, usage=False))
    assert sample.ok and sample.ttft_s == pytest.approx(FIRST_S)
    assert sample.itl_s is None
    latency = router.lanes("coder")[0].latency
    assert latency.answers == 1 and latency.itl_s is None
    assert router.estimate_finish_s("coder", 100) is None  # no ITL: no estimate either


def test_usage_is_read_from_the_last_event_that_has_one() -> None:
    tail = (
        b'data: {"choices": [{"delta": {"content": "x"}}], "usage": null}\n\n'
        b'data: {"choices": [], "usage": {"completion_tokens": 42}}\r\n\r\n'
        b"data: [DONE]\n\n"
    )
    assert stream_completion_tokens(tail) == 42
    assert stream_completion_tokens(tail[40:]) == 42  # a cut first event is skipped
    assert stream_completion_tokens(b'data: {"usage": null}\n\ndata: [DONE]\n\n') is None
    assert stream_completion_tokens(b'data: {"usage": {"completion_tokens": true}}\n\n') is None


@pytest.mark.looptime
@pytest.mark.parametrize(("status", "kind"), [(503, "dropped"), (429, "dropped"), (500, "error"),
                                              (400, "error")])  # fmt: skip
async def test_an_unread_error_answer_is_released_as_an_error(status: int, kind: str) -> None:
    router, recording = _router(
        httpx.MockTransport(lambda request: httpx.Response(status, json={"error": "no"}))
    )
    client = router.client("coder")
    response = await client.send(client.build_request("POST", URL, json=CHAT), stream=True)
    await response.aclose()  # as the OpenAI client does before it retries
    stats = router.stats()["coder@gpu1"]
    assert stats["failed"] == 1 and stats["cancelled"] == 0 and stats["in_flight"] == 0
    # The limit hears of overload (dropped), not of a plain error.
    assert [s.dropped for s in recording.samples] == ([True] if kind == "dropped" else [])
    await router.aclose()


@pytest.mark.looptime
async def test_openai_client_retries_of_503_all_count_as_failed() -> None:
    calls = [0]

    def handler(request: httpx.Request) -> httpx.Response:
        calls[0] += 1
        return httpx.Response(503, json={"error": {"message": "overloaded"}})

    router, recording = _router(httpx.MockTransport(handler))
    model = VLLMChatOpenAI(
        model="m",
        base_url=router.base_url("coder"),
        api_key=SecretStr("EMPTY"),
        http_async_client=router.client("coder"),
        streaming=True,
        stream_usage=True,
        max_retries=2,
        http_socket_options=(),
    )
    with pytest.raises(InternalServerError):
        await model.ainvoke([HumanMessage(content="x")])
    stats = router.stats()["coder@gpu1"]
    assert calls[0] == 3
    assert stats["failed"] == 3 and stats["cancelled"] == 0
    assert len(recording.samples) == 3 and all(s.dropped for s in recording.samples)
    await router.aclose()
