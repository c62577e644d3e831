"""The emulator's HTTP API through the in-process streaming transport, on a virtual clock."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from nodes.schemas import Plan, Review
from serving.clock import run
from serving.emulator import content
from serving.emulator.app import create_app
from serving.emulator.engine import Engine
from serving.emulator.profiles import PROFILES
from serving.emulator.transport import InProcessTransport
from serving.protocol import RETRY_FEEDBACK_PREFIX

T = TypeVar("T")
BASE = "http://emulator.test"


def _with_client(
    profile: str, scenario: Callable[[httpx.AsyncClient, Engine], Awaitable[T]], **kwargs: Any
) -> T:
    async def main() -> T:
        app = create_app(profile, **kwargs)
        async with httpx.AsyncClient(transport=InProcessTransport(app), base_url=BASE) as client:
            try:
                return await scenario(client, app.state.engine)
            finally:
                await app.state.engine.aclose()

    return run(main(), virtual=True)


def _chat(model: str, text: str = "FILE: pkg/util.py\nWrite it.", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def _events(body: str) -> list[Any]:
    out: list[Any] = []
    for block in body.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_non_streaming_completion_has_openai_shape_and_usage() -> None:
    async def scenario(client: httpx.AsyncClient, engine: Engine) -> dict[str, Any]:
        response = await client.post(
            "/v1/chat/completions",
            json=_chat("coder", max_tokens=100),
            headers={"x-tandem-session": "s7", "x-tandem-stage": "code"},
        )
        assert response.status_code == 200
        record = engine.records[0]
        assert (record.session_id, record.stage) == ("s7", "code")
        return dict(response.json())

    body = _with_client("cpu-tiny", scenario, served_model_name="coder")
    assert body["object"] == "chat.completion"
    assert body["model"] == "coder"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    file_text = choice["message"]["content"].split("\n", 1)[1].rsplit("```", 1)[0]
    compile(file_text, "pkg/util.py", "exec")
    usage = body["usage"]
    assert 50 <= usage["completion_tokens"] <= 100
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_sends_role_deltas_finish_usage_and_done_over_time() -> None:
    async def scenario(client: httpx.AsyncClient, engine: Engine) -> tuple[list[Any], list[float]]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        body, times = "", []
        request = _chat("tandem-tiny", max_tokens=64, stream=True,
                        stream_options={"include_usage": True})  # fmt: skip
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for text in response.aiter_text():
                body += text
                times.append(loop.time() - start)
        record = engine.records[0]
        assert times[0] == pytest.approx(record.first_token_s - record.arrival_s, abs=1e-5)  # type: ignore[operator]
        return _events(body), times

    events, times = _with_client("cpu-tiny", scenario, max_coalesced_steps=1)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.startswith("```python\n") and text.endswith("```\n")
    assert [c["choices"][0]["finish_reason"] for c in chunks[-2:-1]] == ["stop"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] >= 32
    # Tokens arrive spread over virtual time: the first well before the last.
    assert times[-1] > times[0] + 30 * PROFILES["cpu-tiny"].base_s


def test_reasoning_profile_streams_reasoning_then_json() -> None:
    async def scenario(client: httpx.AsyncClient, engine: Engine) -> tuple[list[Any], Any]:
        fmt = {"type": "json_schema",
               "json_schema": {"name": "Plan", "schema": Plan.model_json_schema()}}  # fmt: skip
        request = _chat("tandem-tiny-reasoning", "Write app/a.py and app/b.py",
                        response_format=fmt, max_tokens=200)  # fmt: skip
        plain = (await client.post("/v1/chat/completions", json=request)).json()
        streamed = await client.post("/v1/chat/completions", json={**request, "stream": True})
        return _events(streamed.text), plain

    events, plain = _with_client("cpu-tiny-reasoning", scenario)
    message = plain["choices"][0]["message"]
    assert message["reasoning"]
    assert [f.path for f in Plan.model_validate_json(message["content"]).files] == [
        "app/a.py",
        "app/b.py",
    ]
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    kinds = [k for d in deltas for k in d if k in ("reasoning", "content") and d[k]]
    assert kinds[0] == "reasoning" and kinds[-1] == "content"
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # all reasoning first
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    assert "".join(d.get("reasoning", "") for d in deltas) == message["reasoning"]


def test_errors_look_like_vllm() -> None:
    async def scenario(client: httpx.AsyncClient, engine: Engine) -> list[httpx.Response]:
        return [
            await client.post("/v1/chat/completions", json=_chat("nope")),
            await client.post("/v1/chat/completions", content=b"{not json"),
            await client.post("/v1/chat/completions", json={"model": "tandem-tiny"}),
            await client.post("/v1/chat/completions", json=_chat("tandem-tiny", "x" * 4 * 5000)),
        ]

    missing, bad_json, no_messages, too_long = _with_client("cpu-tiny", scenario)
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "NotFoundError"
    assert "nope" in missing.json()["error"]["message"]
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == 400
    assert no_messages.status_code == 400
    assert too_long.status_code == 400 and "maximum context length" in too_long.text


def test_models_health_and_metrics() -> None:
    async def scenario(client: httpx.AsyncClient, engine: Engine) -> tuple[Any, int, str]:
        shared = "You are a careful coder. " * 100
        for i in range(3):
            await client.post("/v1/chat/completions", json=_chat("tandem-tiny", shared + f"{i}"))
        models = (await client.get("/v1/models")).json()
        health = (await client.get("/health")).status_code
        return models, health, (await client.get("/metrics")).text

    models, health, text = _with_client("cpu-tiny", scenario)
    assert models["data"][0]["id"] == "tandem-tiny"
    assert models["data"][0]["max_model_len"] == 4096
    assert health == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions",
        "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
        "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
        "vllm:cache_config_info",
    ):  # fmt: skip
        assert name in families, name
    samples = {
        (s.name, s.labels.get("finished_reason")): s for f in families.values() for s in f.samples
    }
    success = samples[("vllm:request_success_total", "stop")]
    assert success.value == 3
    assert success.labels["model_name"] == "tandem-tiny" and success.labels["engine"] == "0"
    assert samples[("vllm:prefix_cache_hits_total", None)].value > 0
    assert samples[("vllm:time_to_first_token_seconds_count", None)].value == 3
    assert samples[("vllm:num_requests_running", None)].value == 0
    info = samples[("vllm:cache_config_info", None)]
    assert info.labels["block_size"] == "16" and int(info.labels["num_gpu_blocks"]) > 0


def test_two_apps_in_one_process_keep_separate_metrics() -> None:
    a, b = create_app("cpu-tiny"), create_app("h100-coder-8b")
    assert a.state.registry is not b.state.registry
    assert a.state.engine is not b.state.engine


def test_closing_a_stream_early_aborts_the_request_and_frees_kv() -> None:
    async def scenario(client: httpx.AsyncClient, engine: Engine) -> tuple[int, int, Any]:
        request = _chat("Qwen/Qwen3-8B", "y" * 4000, max_tokens=2000, stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=request) as response:
            async for _ in response.aiter_text():
                break  # first token seen: hang up
            used = engine.pool.num_used
        await asyncio.sleep(0.1)
        return used, engine.pool.num_used, engine.records[0]

    used, after, record = _with_client("h100-coder-8b", scenario)
    assert used > 0 and after == 0
    assert record.finish_reason == "abort"
    assert record.generated_tokens < record.output_tokens


def test_cancelling_a_non_streaming_call_aborts_the_request() -> None:
    async def scenario(client: httpx.AsyncClient, engine: Engine) -> tuple[Any, int]:
        call = asyncio.ensure_future(
            client.post("/v1/chat/completions", json=_chat("Qwen/Qwen3-8B", max_tokens=2000))
        )
        await asyncio.sleep(1.0)
        assert engine.num_running == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.1)
        return engine.records[0], engine.num_running

    record, running = _with_client("h100-coder-8b", scenario)
    assert record.finish_reason == "abort" and running == 0


def test_same_seed_same_answers_and_timings() -> None:
    async def scenario(client: httpx.AsyncClient, engine: Engine) -> list[Any]:
        calls = [
            client.post("/v1/chat/completions", json=_chat("tandem-tiny", f"FILE: m{i}.py"))
            for i in range(8)
        ]
        bodies = [r.json() for r in await asyncio.gather(*calls)]
        return [(b["choices"][0]["message"]["content"], b["usage"]) for b in bodies] + [
            [(r.first_token_s, r.finish_s) for r in engine.records]
        ]

    assert _with_client("cpu-tiny", scenario, seed=3) == _with_client("cpu-tiny", scenario, seed=3)


def _json_schema(model: type[Plan] | type[Review]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": model.__name__, "schema": model.model_json_schema()},
    }


_KINDS: dict[str, dict[str, Any] | None] = {
    "coder": None,
    "plan": _json_schema(Plan),
    "review": _json_schema(Review),
    "object": {"type": "json_object"},
}
_REVIEW_PROMPT = "\n".join(f"### FILE: pkg/m{i}.py\n```\nX = {i}\n```" for i in range(12))


def _text_of(kind: str) -> str:
    if kind == "review":
        return _REVIEW_PROMPT
    return "FILE: pkg/util.py\nWrite pkg/util.py and pkg/core.py."


@settings(max_examples=40, deadline=None)
@given(
    profile=st.sampled_from(["cpu-tiny", "cpu-tiny-reasoning"]),
    kind=st.sampled_from(sorted(_KINDS)),
    max_tokens=st.integers(1, 3000),
    seed=st.integers(0, 1000),
)
def test_charged_tokens_are_the_text_sent_streamed_or_not(
    profile: str, kind: str, max_tokens: int, seed: int
) -> None:
    model = PROFILES[profile].served_model_name
    request = _chat(model, _text_of(kind), max_tokens=max_tokens)
    if _KINDS[kind] is not None:
        request["response_format"] = _KINDS[kind]

    async def scenario(client: httpx.AsyncClient, engine: Engine) -> tuple[Any, list[Any], Any]:
        plain = (await client.post("/v1/chat/completions", json=request)).json()
        stream = {**request, "stream": True, "stream_options": {"include_usage": True}}
        streamed = await client.post("/v1/chat/completions", json=stream)
        return plain, _events(streamed.text), engine.records

    plain, events, records = _with_client(profile, scenario, seed=seed)
    message = plain["choices"][0]["message"]
    reasoning, text = message["reasoning"] or "", message["content"]
    charged = content.part_tokens(reasoning) + content.part_tokens(text)
    assert plain["usage"]["completion_tokens"] == charged
    assert [r.output_tokens for r in records] == [charged, charged]
    assert [r.generated_tokens for r in records] == [charged, charged]
    deltas = [e["choices"][0]["delta"] for e in events[:-1] if e["choices"]]
    assert events[-2]["usage"]["completion_tokens"] == charged
    assert "".join(d.get("content", "") for d in deltas) == text
    assert "".join(d.get("reasoning", "") for d in deltas) == reasoning
    # Deltas split on 4-character token boundaries: only a part's last piece may be shorter.
    for part, whole in (("reasoning", reasoning), ("content", text)):
        pieces = [d[part] for d in deltas if d.get(part)]
        assert all(len(p) % 4 == 0 for p in pieces[:-1]), part
        assert not pieces or whole.endswith(pieces[-1])
    # Never past max_tokens, as vLLM: what does not fit is cut there, JSON included.
    assert charged <= max_tokens
    finish = plain["choices"][0]["finish_reason"]
    assert finish == "stop" or (finish == "length" and charged == max_tokens)
    if kind == "coder" and max_tokens >= 8 and profile == "cpu-tiny":
        compile(text.split("\n", 1)[1].rsplit("```", 1)[0], "pkg/util.py", "exec")
    if kind == "plan" and finish == "stop":
        Plan.model_validate_json(text)
    if kind == "review" and finish == "stop":
        assert len(Review.model_validate_json(text).verdicts) == 12


def test_a_structured_answer_stops_at_max_tokens_as_vllm_does() -> None:
    """vLLM stops at `max_tokens` under guided decoding too: the reasoning gives way first, and
    a JSON answer that alone is longer is cut there, unterminated, with "length"."""
    paths = ", ".join(f"pkg/module_{i}.py" for i in range(40))
    request = _chat("tandem-tiny-reasoning", f"Files: {paths}", response_format=_KINDS["plan"])
    # The smallest plan for 40 files, in tokens: a cap a little above it leaves less room
    # than the reasoning (60% of the answer) plus that plan.
    smallest = content.part_tokens(
        content.content_text(0, request["messages"], _KINDS["plan"], None, 0)
    )
    caps = (smallest * 6 // 5, smallest // 2)

    async def scenario(client: httpx.AsyncClient, engine: Engine) -> list[Any]:
        bodies = []
        for cap in caps:
            body = {**request, "max_tokens": cap}
            bodies.append((await client.post("/v1/chat/completions", json=body)).json())
        return bodies

    fits, cut = _with_client("cpu-tiny-reasoning", scenario)
    (choice,) = fits["choices"]
    assert choice["finish_reason"] == "stop"
    assert fits["usage"]["completion_tokens"] == caps[0]  # reasoning shrank to fit
    assert 0 < content.part_tokens(choice["message"]["reasoning"]) < caps[0] - smallest + 1
    assert len(Plan.model_validate_json(choice["message"]["content"]).files) == 40
    (choice,) = cut["choices"]
    assert choice["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == caps[1]
    assert choice["message"]["reasoning"] is None
    assert len(choice["message"]["content"]) == 4 * caps[1]
    with pytest.raises(ValueError):
        Plan.model_validate_json(choice["message"]["content"])


def test_a_structured_retry_answers_the_task_not_the_feedback() -> None:
    """A retry goes on the same conversation: the task, the bad answer, then feedback. The
    emulated model answers the task (its files), as a real one does, not the feedback; a
    worked example before the task (the planner's prompt has one) is not the task."""
    task = "Write app/a.py and app/b.py"
    retry = {
        "model": "tandem-tiny-reasoning",
        "messages": [
            {"role": "user", "content": "Example: write lib/x.py"},
            {"role": "assistant", "content": '{"summary": "example", "files": []}'},
            {"role": "user", "content": task},
            {"role": "assistant", "content": '{"summary": "x", "fi'},
            {"role": "user", "content": RETRY_FEEDBACK_PREFIX + "is not valid Plan JSON."},
        ],
        "response_format": _KINDS["plan"],
        "max_tokens": 2000,
    }

    async def scenario(client: httpx.AsyncClient, engine: Engine) -> Any:
        return (await client.post("/v1/chat/completions", json=retry)).json()

    body = _with_client("cpu-tiny-reasoning", scenario)
    plan = Plan.model_validate_json(body["choices"][0]["message"]["content"])
    assert [f.path for f in plan.files] == ["app/a.py", "app/b.py"]


def test_an_answer_longer_than_the_context_is_cut_with_length() -> None:
    paths = ", ".join(f"pkg/module_{i}.py" for i in range(200))
    text = f"Files: {paths}\n" + "z" * (4 * 3600 - len(paths))
    request = _chat("tandem-tiny-reasoning", text, response_format=_KINDS["plan"],
                    max_tokens=4096)  # fmt: skip

    async def scenario(client: httpx.AsyncClient, engine: Engine) -> tuple[Any, Any]:
        body = (await client.post("/v1/chat/completions", json=request)).json()
        return body, engine.records[0]

    body, record = _with_client("cpu-tiny-reasoning", scenario)
    (choice,) = body["choices"]
    room = PROFILES["cpu-tiny-reasoning"].max_model_len - record.prompt_tokens
    assert choice["finish_reason"] == "length"
    assert choice["message"]["reasoning"] is None  # reasoning gave way first
    assert body["usage"]["completion_tokens"] == room == record.output_tokens
    assert len(choice["message"]["content"]) == 4 * room


def test_ignore_eos_gives_exactly_max_tokens_as_vllm_does() -> None:
    """vLLM's `ignore_eos` runs every request to `max_tokens` (what calibration relies on),
    even where the emulator's content model would end sooner or, for 1 token, later."""

    async def scenario(client: httpx.AsyncClient, engine: Engine) -> list[int]:
        counts = []
        for max_tokens in (1, 8, 300):
            for extra in ({}, {"response_format": content_format()}):
                body = _chat("coder", max_tokens=max_tokens, ignore_eos=True, **extra)
                response = await client.post("/v1/chat/completions", json=body)
                counts.append(response.json()["usage"]["completion_tokens"])
        plain = await client.post("/v1/chat/completions", json=_chat("coder", max_tokens=300))
        counts.append(plain.json()["usage"]["completion_tokens"])
        return counts

    def content_format() -> dict[str, Any]:
        return {
            "type": "json_schema",
            "json_schema": {"name": "Plan", "schema": Plan.model_json_schema()},
        }

    counts = _with_client("h100-nvl-coder-8b", scenario, served_model_name="coder")
    assert counts[:6] == [1, 1, 8, 8, 300, 300]
    assert counts[6] < 300  # without it, answers end where the content model ends them
