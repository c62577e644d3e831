"""The emulator's HTTP face: the routes and shapes of vLLM's OpenAI-compatible server.

POST /v1/chat/completions (JSON or SSE streaming), GET /v1/models, GET /health and
GET /metrics (vLLM V1 metric names, from a per-app registry so several emulators can live in
one process). Text comes from `content`, built before the request is submitted so that the
engine generates and times exactly the answer's tokens (`content`'s token spec); timing comes
from the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serving.emulator import content
from serving.emulator.engine import (
    Engine,
    Histogram,
    RequestHandle,
    SchedulingPolicy,
    count_tokens,
)
from serving.emulator.profiles import Profile, get_profile
from serving.protocol import FILE_HEADER, SESSION_HEADER, STAGE_HEADER, is_guided


def _error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def _sse(payload: Mapping[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class _VllmCollector(Collector):
    """Exposes the engine's state under vLLM V1's metric names and labels."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name

    def collect(self) -> Iterable[Metric]:
        engine = self._engine
        stats = engine.stats
        names = ["model_name", "engine"]
        values = [self._model_name, "0"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
            family = HistogramMetricFamily(name, doc, labels=names)
            family.add_metric(values, hist.cumulative(), hist.sum)
            return family

        yield gauge("vllm:num_requests_running", "Requests in model execution batches.",
                    engine.num_running)  # fmt: skip
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be processed.",
                    engine.num_waiting)  # fmt: skip
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    engine.kv_cache_usage)  # fmt: skip
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.",
                      stats.prefix_cache_queries)  # fmt: skip
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.",
                      stats.prefix_cache_hits)  # fmt: skip
        yield counter("vllm:num_preemptions", "Cumulative number of preemptions.",
                      stats.preemptions)  # fmt: skip
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                      stats.prompt_tokens)  # fmt: skip
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      stats.generation_tokens)  # fmt: skip
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.",
            labels=[*names, "finished_reason"],
        )  # fmt: skip
        for reason in ("stop", "length", "abort"):
            success.add_metric([*values, reason], stats.request_success.get(reason, 0))
        yield success
        yield histogram("vllm:time_to_first_token_seconds", "Time to first token.", stats.ttft)
        yield histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", stats.itl)
        yield histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.",
                        stats.e2e)  # fmt: skip
        yield histogram("vllm:request_queue_time_seconds", "Time spent waiting in the queue.",
                        stats.queue)  # fmt: skip
        yield histogram("vllm:iteration_tokens_total", "Number of tokens per engine step.",
                        stats.iteration_tokens)  # fmt: skip
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig.",
            labels=["engine", "num_gpu_blocks", "block_size", "enable_prefix_caching"],
        )  # fmt: skip
        profile = engine.profile
        info.add_metric(["0", str(profile.num_gpu_blocks), str(profile.block_size), "True"], 1)
        yield info


class _Server:
    """Route handlers bound to one engine and one served model name."""

    def __init__(self, engine: Engine, model_name: str, seed: int) -> None:
        self.engine = engine
        self.profile = engine.profile
        self.model_name = model_name
        self.seed = seed
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_VllmCollector(engine, model_name))
        self._requests = 0

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def models(self, request: Request) -> Response:
        card = {
            "id": self.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "vllm",
            "root": self.model_name,
            "parent": None,
            "max_model_len": self.profile.max_model_len,
            "permission": [],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return _error(400, f"Invalid JSON body: {exc}", "BadRequestError")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.", "BadRequestError")
        model = body.get("model", self.model_name)
        if model != self.model_name:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "`messages` must be a non-empty list.", "BadRequestError")
        if not all(isinstance(m, dict) for m in messages):
            return _error(400, "Each message must be an object.", "BadRequestError")

        prompt = content.render_prompt(messages)
        prompt_tokens = count_tokens(prompt)
        limit = self.profile.max_model_len
        if prompt_tokens >= limit:
            return _error(
                400,
                f"This model's maximum context length is {limit} tokens. However, your "
                f"request has {prompt_tokens} input tokens. Please reduce the length of the "
                "input messages.",
                "BadRequestError",
            )
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        if asked is not None and (not isinstance(asked, int) or asked < 1):
            return _error(400, "max_tokens must be a positive integer.", "BadRequestError")
        max_tokens = min(asked or self.profile.default_max_tokens, limit - prompt_tokens)
        priority = body.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            return _error(400, "priority must be an integer.", "BadRequestError")
        if priority and self.engine.scheduling_policy != "priority":
            return _error(
                400,
                f"Got priority {priority} but Priority scheduling is not enabled.",
                "BadRequestError",
            )
        # vLLM's `ignore_eos`: exactly max_tokens tokens (what benchmarks and calibration ask).
        ignore_eos = body.get("ignore_eos") is True
        target = (
            max_tokens
            if ignore_eos
            else content.output_token_count(
                self.seed, messages, max_tokens, self.profile.min_output_frac
            )
        )
        # The answer is built first and the engine charged its real size (the token spec).
        answer = content.build_answer(
            self.seed,
            messages,
            response_format=body.get("response_format"),
            file_header=request.headers.get(FILE_HEADER),
            target_tokens=target,
            reasoning_frac=self.profile.reasoning_frac if self.profile.reasoning else 0.0,
            max_tokens=max_tokens,
        )

        self._requests += 1
        request_id = f"chatcmpl-{content.short_hash(self.seed, 'id', self._requests)}"
        handle = self.engine.submit(
            prompt,
            answer.tokens,
            session_id=request.headers.get(SESSION_HEADER, "-"),
            stage=request.headers.get(STAGE_HEADER, "-"),
            request_id=request_id,
            priority=priority,
            guided=is_guided(body),
        )
        created = int(asyncio.get_running_loop().time())
        if body.get("stream"):
            options = body.get("stream_options") or {}
            usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
            return StreamingResponse(
                self._stream(handle, answer, request_id, created, usage),
                media_type="text/event-stream",
            )
        return await self._complete(request, handle, answer, request_id, created)

    def _usage(self, handle: RequestHandle) -> dict[str, Any]:
        record = handle.record
        return {
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.generated_tokens,
            "total_tokens": record.prompt_tokens + record.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": record.cached_tokens},
        }

    async def _complete(
        self, request: Request, handle: RequestHandle, answer: content.Answer, request_id: str,
        created: int,
    ) -> Response:  # fmt: skip
        done = asyncio.ensure_future(handle.result())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not done.done():
                done.cancel()
                handle.abort()
        if not done.done() or done.cancelled() or handle.record.finish_reason == "abort":
            return _error(499, "Client disconnected or server shut down.", "Aborted")
        message: dict[str, Any] = {
            "role": "assistant",
            "content": answer.content,
            "reasoning": answer.reasoning or None,
            "tool_calls": [],
        }
        return JSONResponse(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": created,
                "model": self.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": _finish_reason(handle, answer),
                        "stop_reason": None,
                    }
                ],
                "usage": self._usage(handle),
                "prompt_logprobs": None,
            }
        )

    async def _stream(
        self, handle: RequestHandle, answer: content.Answer, request_id: str, created: int,
        include_usage: bool,
    ) -> AsyncIterator[str]:  # fmt: skip
        def chunk(delta: Mapping[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse(
                {
                    "id": request_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": self.model_name,
                    "choices": [choice],
                }
            )

        try:
            seen = 0
            first = True
            while True:
                count = await handle.wait_tokens(seen)
                if first and count:
                    # vLLM sends the role with the first engine output, not before.
                    yield chunk({"role": "assistant", "content": ""})
                    first = False
                for delta in answer.deltas(seen, count):
                    yield chunk(delta)
                seen = count
                if handle.finished:
                    break
            if handle.record.finish_reason == "abort":
                return
            yield chunk({}, _finish_reason(handle, answer))
            if include_usage:
                yield _sse(
                    {
                        "id": request_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": self.model_name,
                        "choices": [],
                        "usage": self._usage(handle),
                    }
                )
            yield _sse("[DONE]")
        finally:
            if not handle.finished:
                handle.abort()


def _finish_reason(handle: RequestHandle, answer: content.Answer) -> str | None:
    """The engine's reason, or "length" where `max_tokens` cut the answer."""
    reason = handle.record.finish_reason
    return answer.finish_reason if reason == "stop" else reason


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(
    profile: str | Profile,
    *,
    seed: int = 0,
    served_model_name: str | None = None,
    max_coalesced_steps: int | None = None,
    scheduling_policy: SchedulingPolicy = "fcfs",
) -> Starlette:
    """An ASGI app that serves like vLLM with the timing of `profile`.

    Args:
        profile: A profile or the name of one in `PROFILES`.
        seed: Seeds output lengths, review verdicts and generated text.
        served_model_name: The model name clients must send (default: the profile's).
        max_coalesced_steps: See `Engine`; 1 streams tokens one step apart on a real clock.
        scheduling_policy: vLLM's `--scheduling-policy` (`fcfs` or `priority`): requests
            carry a `priority` field that only `priority` accepts when non-zero.

    The engine is `app.state.engine`; close it with `await app.state.engine.aclose()` (the
    app's lifespan does so when a server runs it).
    """
    resolved = get_profile(profile) if isinstance(profile, str) else profile
    engine = Engine(
        resolved, max_coalesced_steps=max_coalesced_steps, scheduling_policy=scheduling_policy
    )
    server = _Server(engine, served_model_name or resolved.served_model_name, seed)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await engine.aclose()

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", server.chat, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.profile = resolved
    app.state.registry = server.registry
    app.state.served_model_name = server.model_name
    return app
