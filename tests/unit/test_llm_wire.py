"""The real ChatOpenAI request path, socket-free through httpx.MockTransport."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from pydantic import SecretStr

from nodes.llm import (
    OutputError,
    Usage,
    VLLMChatOpenAI,
    complete_structured,
    complete_text,
    split_reasoning,
)
from nodes.schemas import Plan
from routing.calls import CallInfo

PLAN = {
    "summary": "s",
    "files": [{"path": "a.py", "purpose": "p", "depends_on": [], "interface": ""}],
}


def _sse(chunks: list[dict[str, Any]]) -> bytes:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return body.encode()


def _stream_chunks(
    content: str, reasoning: str = "", field: str = "reasoning"
) -> list[dict[str, Any]]:
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    if reasoning:
        chunks.append({**base, "choices": [{"index": 0, "delta": {field: reasoning}}]})
    for i in range(0, len(content), 7):
        chunks.append({**base, "choices": [{"index": 0, "delta": {"content": content[i : i + 7]}}]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append(
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        }
    )
    return chunks


class Server:
    """Records requests; answers from a queue of (content, reasoning) pairs."""

    def __init__(self, answers: list[tuple[str, str]], field: str = "reasoning") -> None:
        self.answers = answers
        self.field = field
        self.requests: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(
            {"url": str(request.url), "body": body, "headers": dict(request.headers)}
        )
        content, reasoning = self.answers.pop(0)
        if body.get("stream"):
            return httpx.Response(
                200,
                content=_sse(_stream_chunks(content, reasoning, self.field)),
                headers={"content-type": "text/event-stream"},
            )
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning:
            message[self.field] = reasoning
        return httpx.Response(
            200,
            json={
                "id": "c1",
                "object": "chat.completion",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            },
        )


def _model(server: Server, streaming: bool = True) -> VLLMChatOpenAI:
    transport = httpx.MockTransport(server)
    return VLLMChatOpenAI(
        model="tiny",
        base_url="http://vllm.test/v1",
        api_key=SecretStr("EMPTY"),
        http_client=httpx.Client(transport=transport),
        http_async_client=httpx.AsyncClient(transport=transport),
        streaming=streaming,
        stream_usage=True,
        max_retries=0,
        # The clients are given; skip ChatOpenAI's probe of TCP socket options.
        http_socket_options=(),
    )


INFO = CallInfo(session_id="s1", stage="plan", role="reasoning")


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
async def test_structured_call_sends_json_schema_and_keeps_reasoning(
    streaming: bool, field: str
) -> None:
    server = Server([(json.dumps(PLAN), "let me think")], field=field)
    model = _model(server, streaming)
    usage = Usage()
    plan = await complete_structured(
        model, Plan, [HumanMessage(content="hi")], INFO, usage, max_tokens=99
    )
    assert plan.files[0].path == "a.py"
    body = server.requests[0]["body"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "Plan"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["summary", "files"]
    assert body["max_completion_tokens"] == 99 and body["model"] == "tiny"
    assert server.requests[0]["url"] == "http://vllm.test/v1/chat/completions"
    if streaming:
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert usage.as_dict() == {"calls": 1, "prompt_tokens": 11, "completion_tokens": 7}


@pytest.mark.parametrize("streaming", [True, False])
async def test_reasoning_field_is_kept_on_the_message(streaming: bool) -> None:
    server = Server([("hello", "because")])
    message = await _model(server, streaming).ainvoke([HumanMessage(content="x")])
    assert message.additional_kwargs["reasoning"] == "because"
    assert split_reasoning(message) == ("hello", "because")


async def test_think_tags_are_stripped_when_the_server_has_no_parser() -> None:
    server = Server([("<think>step 1\nstep 2</think>\n```python\nx = 1\n```", "")])
    content, reasoning = await complete_text(
        _model(server), [HumanMessage(content="x")], INFO, Usage()
    )
    assert content == "```python\nx = 1\n```"
    assert reasoning == "step 1\nstep 2"
    # An opening tag sent by the chat template leaves only the closing one in the text.
    assert split_reasoning(AIMessage(content="hmm</think>{}")) == ("{}", "hmm")


async def test_malformed_json_is_fed_back_then_gives_up() -> None:
    server = Server([("{nope", ""), ('{"summary": 1}', ""), ("[]", "")])
    with pytest.raises(OutputError, match="invalid Plan JSON after 3 attempts"):
        await complete_structured(
            _model(server), Plan, [HumanMessage(content="hi")], INFO, Usage(), retries=2
        )
    second = server.requests[1]["body"]["messages"]
    assert second[-2] == {"role": "assistant", "content": "{nope"}
    assert "not valid Plan JSON" in second[-1]["content"]
    assert len(server.requests) == 3
