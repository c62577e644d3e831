"""The client path: the chat model's own stream reader, and slots under mass cancellation.

Socket-free: replicas are in-process transports that answer with pre-built SSE events.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import openai
import pytest
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from bench.client_path import main, sse_events
from nodes.chat_stream import SseDecoder, StreamFormatError
from nodes.llm import RoutedModels, Usage, VLLMChatOpenAI, complete_answer, finish_reason
from routing.calls import CallInfo, call_scope
from routing.endpoints import Replica
from routing.router import Router
from routing.transport import stream_completion_tokens
from serving.protocol import FILE_HEADER

HEAD = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "served-8b"}
USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 9,
    "total_tokens": 49,
    "prompt_tokens_details": {"cached_tokens": 32},
    "completion_tokens_details": {"reasoning_tokens": 4},
}


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps({**HEAD, **body}).encode() + b"\n\n"


def _delta(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _event({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


CANNED = [
    _delta({"role": "assistant", "content": ""}),
    _delta({"reasoning": "think "}),
    _delta({"reasoning": "hard"}),
    _delta({"content": "def f():"}),
    _delta({"content": "\n    return 1"}),
    _delta({"content": "\n"}, finish="length"),
    b": a comment line, skipped\n\n",
    _event({"choices": [], "usage": USAGE}),
    b"data: [DONE]\n\n",
]


def _answering(chunks: Sequence[bytes]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=b"".join(chunks)
        )

    return httpx.MockTransport(handler)


def _chunked(chunks: Sequence[bytes]) -> httpx.MockTransport:
    """Answers with `chunks` as separate body chunks (cut wherever the test cut them)."""

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    return httpx.MockTransport(handler)


def _model(transport: httpx.AsyncBaseTransport, cls: type[ChatOpenAI] = VLLMChatOpenAI) -> Any:
    return cls(
        model="served-8b",
        base_url="http://vllm.test/v1",
        api_key=SecretStr("EMPTY"),
        http_async_client=httpx.AsyncClient(transport=transport),
        streaming=True,
        stream_usage=True,
        max_retries=0,
        http_socket_options=(),
    )


async def test_a_canned_stream_gives_what_chatopenai_gives_plus_the_reasoning() -> None:
    ours = await _model(_answering(CANNED)).ainvoke([HumanMessage(content="x")])
    stock = await _model(_answering(CANNED), ChatOpenAI).ainvoke([HumanMessage(content="x")])
    assert ours.content == stock.content == "def f():\n    return 1\n"
    assert ours.usage_metadata == stock.usage_metadata
    assert ours.usage_metadata["input_token_details"] == {"cache_read": 32}
    assert ours.usage_metadata["output_token_details"] == {"reasoning": 4}
    assert ours.response_metadata == stock.response_metadata
    assert finish_reason(ours) == "length"
    assert ours.response_metadata["model_name"] == "served-8b"
    # Stock ChatOpenAI drops vLLM's reasoning; ours keeps it whole.
    assert ours.additional_kwargs == {"reasoning": "think hard"}
    assert "reasoning" not in stock.additional_kwargs


async def test_events_cut_anywhere_and_crlf_line_ends_read_the_same() -> None:
    body = b"".join(CANNED).replace(b"\n", b"\r\n")
    rng = random.Random(7)
    # Random cuts, and one between the CR and LF that end an event.
    cuts = sorted({*rng.sample(range(1, len(body)), 40), body.index(b"\r\n\r\n") + 3})
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    cut = await _model(_chunked(pieces)).ainvoke([HumanMessage(content="x")])
    whole = await _model(_answering(CANNED)).ainvoke([HumanMessage(content="x")])
    assert (cut.content, cut.additional_kwargs, cut.usage_metadata) == (
        whole.content,
        whole.additional_kwargs,
        whole.usage_metadata,
    )


def test_sse_decoder_joins_data_lines_and_holds_a_split_crlf() -> None:
    decoder = SseDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata:b\r\n\r\nevent: x\ndata: c\n") == [b"a\nb"]
    assert decoder.feed(b"\n: note\n\ndata: [DONE]\n\n") == [b"c", b"[DONE]"]


async def test_two_hundred_tokens_per_event_give_the_same_text_and_usage() -> None:
    one = await _model(_answering(sse_events(1000, 1))).ainvoke([HumanMessage(content="x")])
    many = await _model(_answering(sse_events(1000, 200))).ainvoke([HumanMessage(content="x")])
    assert many.content == one.content == "tok " * 1000
    assert many.usage_metadata == one.usage_metadata
    assert many.usage_metadata is not None and many.usage_metadata["output_tokens"] == 1000


class _Tokens(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.pieces: list[str] = []

    async def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.pieces.append(token)


async def test_token_callbacks_and_chunk_streams_still_see_every_piece() -> None:
    handler = _Tokens()
    model = _model(_answering(CANNED))
    answer = await model.ainvoke([HumanMessage(content="x")], {"callbacks": [handler]})
    assert "".join(handler.pieces) == answer.content and len(handler.pieces) == 3
    chunks = [c async for c in model.astream([HumanMessage(content="x")])]
    assert "".join(str(c.content) for c in chunks) == answer.content
    assert "".join(c.additional_kwargs.get("reasoning", "") for c in chunks) == "think hard"
    # A handler that taps the chunks (astream_events, LangGraph's "messages" mode) gets them.
    streamed = [
        event["data"]["chunk"].content
        async for event in model.astream_events([HumanMessage(content="x")], version="v2")
        if event["event"] == "on_chat_model_stream"
    ]
    assert "".join(streamed) == answer.content and len(streamed) > 3


async def test_an_error_event_is_the_sdks_api_error_and_garbage_names_the_event() -> None:
    error = b'data: {"error": {"message": "engine died", "code": 500}}\n\n'
    with pytest.raises(openai.APIError, match="engine died"):
        await _model(_answering([CANNED[0], error])).ainvoke([HumanMessage(content="x")])
    with pytest.raises(StreamFormatError, match="not JSON: '<html>"):
        await _model(_answering([b"data: <html>\n\n"])).ainvoke([HumanMessage(content="x")])
    with pytest.raises(StreamFormatError, match="delta is not an object"):
        await _model(_answering([_delta(["x"])])).ainvoke(  # type: ignore[arg-type]
            [HumanMessage(content="x")]
        )


async def test_an_error_answer_is_the_sdks_status_error_with_the_server_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "prompt too long", "code": 400}})

    with pytest.raises(openai.BadRequestError, match="prompt too long") as caught:
        await _model(httpx.MockTransport(handler)).ainvoke([HumanMessage(content="x")])
    assert caught.value.status_code == 400 and caught.value.body["message"] == "prompt too long"


def test_the_router_reads_usage_from_the_last_usage_line_or_a_multi_line_event() -> None:
    # Every chunk but the last says `"usage": null`; text may hold the word in quotes.
    null_usage = b'data: {"choices": [{"delta": {"content": "a \\"usage\\""}}], "usage": null}\n\n'
    final = b'data: {"choices": [], "usage": {"completion_tokens": 9}}\n\ndata: [DONE]\n\n'
    assert stream_completion_tokens(null_usage * 3 + final) == 9
    assert stream_completion_tokens(null_usage + b"data: [DONE]\n\n") is None
    multi_line = b'data: {"choices": [],\r\ndata: "usage": {"completion_tokens": 5}}\r\n\r\n'
    assert stream_completion_tokens(multi_line + null_usage) == 5


class _Paced(httpx.AsyncBaseTransport):
    """Answers at once, giving the loop a turn between events as a socket would; the caller
    of a call named in `walk_away` goes away (`hang_up(name)`) at the event named."""

    def __init__(
        self,
        events: Sequence[bytes],
        walk_away: dict[str, int],
        hang_up: Callable[[str], None],
    ) -> None:
        self.events = list(events)
        self.walk_away = walk_away
        self.hang_up = hang_up
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        await request.aread()
        name = request.headers.get(FILE_HEADER, "")
        leave_at = self.walk_away.get(name, -1)

        async def body() -> AsyncIterator[bytes]:
            for n, event in enumerate(self.events):
                if n == leave_at:
                    self.hang_up(name)
                await asyncio.sleep(0)
                yield event

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


async def _post(client: httpx.AsyncClient, info: CallInfo) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    body["stream_options"] = {"include_usage": True}
    with call_scope(info):
        request = client.build_request("POST", f"{URL}/chat/completions", json=body)
        response = await client.send(request, stream=True)
        try:
            async for _ in response.aiter_raw():
                pass
        finally:
            await response.aclose()


URL = "http://coder.tandem.internal/v1"


async def test_ten_thousand_calls_thirty_percent_cancelled_leave_every_replica_idle() -> None:
    """A seeded 30% of the calls are cancelled: two in three mid-stream (the caller's task
    at a random event), the rest at a random loop turn (most while queued for a slot).
    One call in ten goes through the chat model, the rest through the router's client."""
    calls, tokens = 10_000, 4
    rng = random.Random(13)
    doomed = rng.sample(range(calls), int(calls * 0.3))
    mid_stream = doomed[: len(doomed) * 2 // 3]
    walk_away = {f"call{i}": rng.randrange(1, tokens + 4) for i in mid_stream}
    at_turn: dict[int, list[int]] = {}
    for i in doomed[len(mid_stream) :]:
        at_turn.setdefault(rng.randrange(3_000), []).append(i)
    tasks: list[asyncio.Task[None]] = []

    def hang_up(name: str) -> None:
        tasks[int(name.removeprefix("call"))].cancel()  # the caller's own task goes away

    upstreams = [_Paced(sse_events(tokens), walk_away, hang_up) for _ in range(2)]
    router = Router(
        {
            "coder": [
                Replica(url=f"http://gpu{i}.test/v1", model="m", gpu=f"gpu{i}", transport=up)
                for i, up in enumerate(upstreams)
            ]
        },
        limit="fixed-16",
        order="las",
    )
    model = RoutedModels(router).for_role("coder")
    client = router.client("coder")
    usage = Usage()
    messages = [HumanMessage(content="x")]

    async def call(i: int) -> None:
        info = CallInfo(session_id=f"s{i % 500}", stage="code", role="coder", file=f"call{i}")
        if i % 10 == 0:
            await complete_answer(model, messages, info, usage)
        else:
            await _post(client, info)

    async with router:
        tasks.extend(asyncio.create_task(call(i)) for i in range(calls))
        pending = set(tasks)
        for task in tasks:
            task.add_done_callback(pending.discard)
        turn = 0
        while pending:
            for i in at_turn.pop(turn, []):
                tasks[i].cancel()
            turn += 1
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        stats = router.stats()
        lanes = router.lanes("coder")

    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    answered = sum(r is None for r in results)
    assert cancelled + answered == calls, [r for r in results if isinstance(r, Exception)][:3]
    assert cancelled <= len(doomed)
    for name, replica in stats.items():
        assert replica["in_flight"] == 0 and replica["queued"] == 0, (name, replica)
        assert replica["failed"] == 0, (name, replica)
    # Every admitted call gave its slot back once: answered, or cancelled holding it.
    for lane in lanes:
        replica = stats[lane.name]
        assert replica["admitted"] == lane.latency.answers + replica["cancelled"], replica
    admitted = sum(s["admitted"] for s in stats.values())
    cancelled_holding = sum(s["cancelled"] for s in stats.values())
    answers = sum(lane.latency.answers for lane in lanes)
    # A call cancelled after its answer ended counts as answered by the replica.
    assert answered <= answers <= answered + cancelled
    model_calls = sum(1 for i, r in enumerate(results) if r is None and i % 10 == 0)
    assert usage.calls == model_calls and usage.completion_tokens == model_calls * tokens
    assert sum(up.calls for up in upstreams) <= admitted
    # Both kinds of cancellation happened: holding a slot, and before one was granted.
    never_admitted = calls - admitted
    assert never_admitted <= cancelled
    assert cancelled_holding >= len(mid_stream), (cancelled_holding, len(mid_stream))
    assert never_admitted > 100, never_admitted


def test_the_client_path_benchmark_runs_and_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--calls", "3", "--tokens", "5", "--waiting", "20", "--admitted", "10"])
    assert "tokens per CPU second" in capsys.readouterr().out
    args = ["--calls", "3", "--tokens", "5", "--waiting", "20", "--admitted", "10", "--json"]
    main(args)
    figures = json.loads(capsys.readouterr().out)
    assert figures["stream"]["tokens_per_call"] == 5 and figures["stream"]["calls"] == 3
    assert figures["admission"]["waiting"] == 20 and figures["admission"]["admitted"] == 10
    with pytest.raises(SystemExit):
        main(["--calls", "0"])


async def test_the_router_forwards_a_readdressed_copy_and_leaves_the_request_alone() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b"")

    upstream = httpx.MockTransport(handler)
    replica = Replica(url="http://gpu0.test:8002/v1", model="m", gpu="gpu0", transport=upstream)
    async with Router({"coder": [replica]}, limit="fixed-2") as router:
        client = router.client("coder")
        request = client.build_request(
            "POST",
            f"{URL}/chat/completions?x=1",
            json={"stream": True, "model": "m"},
            headers={"X-Tandem-Session": "other", "X-Custom": "kept"},
        )
        with call_scope(CallInfo(session_id="s9", stage="code", role="coder")):
            response = await client.send(request)
    sent = seen[0]
    assert str(sent.url) == "http://gpu0.test:8002/v1/chat/completions?x=1"
    assert sent.headers.get_list("host") == ["gpu0.test:8002"]
    assert sent.headers.get_list("x-tandem-session") == ["s9"]  # the call's, not the caller's
    assert sent.headers["x-custom"] == "kept"
    assert next(iter(sent.headers)) == "host"  # where the client put it
    assert json.loads(sent.content) == {"stream": True, "model": "m"}
    # The client's own request still names the synthetic URL and its own headers.
    assert response.request is request and request.url.host == "coder.tandem.internal"
    assert request.headers["host"] == "coder.tandem.internal"
    assert request.headers.get_list("x-tandem-session") == ["other"]


class _Slow(httpx.AsyncBaseTransport):
    """Answers each call after `seconds` (of the loop's clock), in one piece."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        await request.aread()
        await asyncio.sleep(self.seconds)
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=b"".join(CANNED)
        )


def test_time_waiting_for_an_admission_slot_does_not_count_against_the_call_timeout() -> None:
    """Three calls of 4 s each behind a limit of one, with a 6 s timeout: the last waits 8 s
    for its slot and must be answered on its first attempt (the timeout bounds a call from
    its send, not from when it started to wait)."""
    from serving.clock import run

    upstream = _Slow(4.0)

    async def main() -> list[str]:
        replica = Replica(url="http://gpu0.test/v1", model="m", gpu="gpu0", transport=upstream)
        router = Router({"coder": [replica]}, limit="fixed-1", order="fifo")
        model = RoutedModels(router, timeout_s=6.0).for_role("coder")
        usage = Usage()

        async def call(i: int) -> str:
            info = CallInfo(session_id=f"s{i}", stage="code", role="coder", file=f"f{i}")
            answer = await complete_answer(model, [HumanMessage(content="x")], info, usage)
            return str(answer.content)

        async with router:
            return await asyncio.gather(*(call(i) for i in range(3)))

    assert run(main(), virtual=True) == ["def f():\n    return 1\n"] * 3
    assert upstream.calls == 3  # nothing timed out and was sent again
