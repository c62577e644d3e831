"""The one LLM client factory, and the structured-call helper every agent uses.

All model calls go through `ChatModels`: the seam where the routing layer's per-GPU
admission is plugged in (the factory builds `VLLMChatOpenAI` clients on top of a
`routing.Router`'s HTTP clients). Tests inject fake chat models instead.

Retries of failed calls happen here and only here (the OpenAI client's own are off): each
model call of `complete_text` and `complete_structured` is tried again after a refused or
dropped connection, a timeout, a cut stream, or an HTTP 408/429/500/502/503/504 answer, at
most `CallRetry.retries` more times, with full-jitter exponential back-off. An answer that is
not an event stream, and any other HTTP error, is not retried. The final error names the
role, the replica's URL and the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import json
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import httpx
import openai
from langchain_core.callbacks import (
    AsyncCallbackHandler,
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
)
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    BaseMessageChunk,
    HumanMessage,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_openai import ChatOpenAI

# The usage shape ChatOpenAI gives its messages (token details included), kept identical.
from langchain_openai.chat_models.base import _create_usage_metadata
from pydantic import BaseModel, Field, SecretStr, ValidationError

from nodes.chat_stream import DONE, SseDecoder, StreamedAnswer, StreamFormatError, reasoning_of
from routing.calls import CallInfo, Role, call_scope
from routing.transport import REPLICA_EXTENSION, REQUEST_TIMEOUT_S, NotAnEventStream
from serving.protocol import RETRY_FEEDBACK_PREFIX

T = TypeVar("T", bound=BaseModel)

_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)(?:\n```|```|$)", re.DOTALL)


class OutputError(Exception):
    """The model's output stayed invalid after the retries allowed.

    Attributes:
        cut_at_max_tokens: The last answer stopped at `max_tokens` (finish_reason "length")
            before its JSON ended: a larger cap, or less to answer, would fix it.
    """

    def __init__(self, message: str, *, cut_at_max_tokens: bool = False) -> None:
        super().__init__(message)
        self.cut_at_max_tokens = cut_at_max_tokens


class ModelCallError(Exception):
    """A model call failed in transport or with a server error, after the retries allowed.

    Attributes:
        attempts: Calls made.
        retryable: Whether the last failure was of a kind worth trying again later.
        status_code: The HTTP status of the last answer, None when none came back.
    """

    def __init__(
        self, message: str, *, attempts: int, retryable: bool, status_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.retryable = retryable
        self.status_code = status_code


# Statuses worth another attempt: a timeout, rate limit or a server-side failure.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class CallRetry:
    """The retry policy of model calls: how many more attempts, and the back-off between.

    Back-off is full-jitter exponential: before retry n (1, 2, ...) wait a uniformly random
    time in [0, min(cap_s, base_s * 2 ** (n - 1))], so calls that failed together (a
    server restart) do not come back together.

    Attributes:
        retries: Extra attempts after the first.
        base_s: The back-off bound before the first retry.
        cap_s: The largest back-off bound.
        sleep: How to wait (tests record the delays instead).
        random: A uniform draw in [0, 1).
    """

    retries: int = 3
    base_s: float = 0.5
    cap_s: float = 8.0
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    random: Callable[[], float] = random.random

    def backoff_s(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        return self.random() * min(self.cap_s, self.base_s * 2.0 ** (retry - 1))


NO_RETRY = CallRetry(retries=0)


@dataclass(frozen=True)
class _Failure:
    """What a failed call says about itself: its text, and whether to try again."""

    text: str
    retryable: bool
    status_code: int | None = None


def describe_failure(exc: BaseException, role: Role) -> _Failure | None:
    """The transport or server failure behind `exc`; None for anything else (e.g. HTTP 400).

    The OpenAI client wraps transport errors (`APIConnectionError`, `APITimeoutError`) with
    the router's error as the cause; that error already names role and replica URL.
    """
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status < 500 and status not in RETRY_STATUSES:
            return None
        where = exc.response.extensions.get(REPLICA_EXTENSION) or f"{role} at {exc.request.url}"
        return _Failure(f"{where}: HTTP {status} ({exc.message})", status in RETRY_STATUSES, status)
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, NotAnEventStream):
            return _Failure(str(cause), retryable=False)
        if isinstance(cause, httpx.TransportError):
            return _Failure(str(cause) or type(cause).__name__, retryable=True)
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, openai.APIError):
        # A connection problem the router did not see, or an error event inside a stream.
        return _Failure(f"{role}: {exc}", retryable=True)
    return None


def retry_policy_of(model: BaseChatModel) -> CallRetry:
    """The retry policy a chat model was built with (the factory's); none for other models."""
    policy = getattr(model, "call_retry", None)
    return policy if isinstance(policy, CallRetry) else NO_RETRY


async def invoke_with_retry(
    model: BaseChatModel,
    messages: Sequence[BaseMessage],
    info: CallInfo,
    config: RunnableConfig | None,
    **kwargs: Any,
) -> BaseMessage:
    """`model.ainvoke` under `info`'s call scope, retried by the model's `CallRetry`.

    Raises:
        ModelCallError: a transport or server failure that outlasted the retries (or one
            not worth retrying), naming role, replica URL, cause and attempts.
    """
    policy = retry_policy_of(model)
    attempt = 1
    while True:
        try:
            with call_scope(info):
                return await model.ainvoke(list(messages), _trace_config(info, config), **kwargs)
        except Exception as exc:
            failure = describe_failure(exc, info.role)
            if failure is None:
                raise
            if not failure.retryable or attempt > policy.retries:
                tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
                raise ModelCallError(
                    f"{failure.text}; gave up after {tries}",
                    attempts=attempt,
                    retryable=failure.retryable,
                    status_code=failure.status_code,
                ) from exc
        await policy.sleep(policy.backoff_s(attempt))
        attempt += 1


class VLLMChatOpenAI(ChatOpenAI):
    """ChatOpenAI that reads vLLM's event stream itself and keeps its reasoning text.

    A streamed `ainvoke` sends one POST through `http_async_client` (the router's client)
    and folds the event stream into one `AIMessage` (`nodes.chat_stream`): one JSON parse
    per event, no SDK object per event, and one deadline per call (the `timeout`) instead
    of a timer per chunk. LangChain's callbacks see each piece of text only when a handler
    asks for tokens (a tracer does; none does by default); the run itself is traced as any
    call is. Chunk by chunk (`astream`, `astream_events`, tool calls, a top-level
    `response_format`) it is the stock ChatOpenAI path.

    The answer has the shape ChatOpenAI gives: `response_metadata` with `finish_reason`
    and `model_name`, `usage_metadata`, and vLLM's reasoning (which stock ChatOpenAI drops)
    in `additional_kwargs["reasoning"]`. Errors are the OpenAI SDK's: `APIStatusError`
    subclasses for error answers (read and closed), `APIConnectionError`/`APITimeoutError`
    caused by the transport's error before an answer, the transport's own error during
    the body, `APIError` for an error event. `max_retries` retries what the SDK retries
    (408, 409, 429, 5xx, connection failures), before any answer body is read.
    `call_retry` is the retry policy `complete_text` and `complete_structured` apply.
    """

    call_retry: CallRetry = Field(default=NO_RETRY, exclude=True)

    def _should_stream(
        self,
        *,
        async_api: bool,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> bool:
        # Chunk objects only for a caller that reads chunks; `_agenerate` streams the wire.
        if async_api and not kwargs.get("stream") and not _reads_chunks(run_manager):
            return False
        return super()._should_stream(async_api=async_api, run_manager=run_manager, **kwargs)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._wire_request(messages, stop, dict(kwargs)) if self.streaming else None
        if request is None:
            return await super()._agenerate(messages, stop, run_manager, **kwargs)
        answer = StreamedAnswer()
        wants_tokens = _wants_tokens(run_manager)
        # No deadline around the whole call here: under the router it would count the time a
        # call waits for its admission slot. The request carries httpx's own timeouts (as the
        # SDK sends them), and the routing transport bounds a routed call from when it is sent
        # (first token, idle stream, whole request).
        try:
            async with contextlib.aclosing(self._wire_events(request)) as stream:
                async for events in stream:
                    for event in events:
                        piece = answer.add(event)
                        if wants_tokens and piece and run_manager is not None:
                            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                            await run_manager.on_llm_new_token(piece, chunk=chunk)
        except httpx.TimeoutException:
            raise openai.APITimeoutError(request=_sdk(request)) from None
        return self._result_of(answer)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._wire_request(messages, stop, dict(kwargs))
        if request is None:
            async for generation in super()._astream(messages, stop, run_manager, **kwargs):
                yield generation
            return
        chunk_class: type[BaseMessageChunk] = AIMessageChunk
        async with contextlib.aclosing(self._wire_events(request)) as stream:
            async for events in stream:
                for event in events:
                    piece = self._convert_chunk_to_generation_chunk(event, chunk_class, None)
                    if piece is None:
                        continue
                    chunk_class = type(piece.message)
                    if run_manager is not None:
                        await run_manager.on_llm_new_token(piece.text, chunk=piece)
                    yield piece

    def _wire_request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> httpx.Request | None:
        """The streamed chat completion request for this call; None where the SDK must send
        it (no HTTP client given, tools, a top-level response_format, the Responses API)."""
        client = self.http_async_client
        api_key = self.openai_api_key
        if not isinstance(client, httpx.AsyncClient) or not isinstance(api_key, SecretStr | None):
            return None
        if self.include_response_headers or kwargs.get("tools"):
            return None
        stream_usage = self._should_stream_usage(kwargs.pop("stream_usage", None), **kwargs)
        kwargs["stream"] = True
        if stream_usage:
            kwargs["stream_options"] = {"include_usage": True}
        payload = self._get_request_payload(messages, stop=stop, **kwargs)
        if "response_format" in payload or self._use_responses_api(payload):
            return None
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key.get_secret_value()}"
        if self.openai_organization:
            headers["OpenAI-Organization"] = self.openai_organization
        headers.update(self.default_headers or {})
        headers.update(payload.pop("extra_headers", None) or {})
        query = {**(self.default_query or {}), **(payload.pop("extra_query", None) or {})}
        payload.update(payload.pop("extra_body", None) or {})
        base = self.openai_api_base or "https://api.openai.com/v1"
        timeout = self.request_timeout
        return client.build_request(
            "POST",
            f"{base.rstrip('/')}/chat/completions",
            params=query or None,
            headers=headers,
            content=json.dumps(payload, separators=(",", ":")).encode(),
            timeout=timeout if isinstance(timeout, float | int | httpx.Timeout) else None,
        )

    async def _wire_events(self, request: httpx.Request) -> AsyncGenerator[list[Any]]:
        """Send `request` (retried as the SDK would) and yield its parsed events, a list per
        body chunk, up to `[DONE]`; the body is read to its end, so its slot comes back
        as answered."""
        client = self.http_async_client
        assert isinstance(client, httpx.AsyncClient)
        response = await self._send(client, request)
        try:
            decoder = SseDecoder()
            done = False
            async for body in response.aiter_bytes():
                if done:
                    continue
                events: list[Any] = []
                for data in decoder.feed(body):
                    if data == DONE:
                        done = True
                        break
                    events.append(_parse_event(data, request))
                if events:
                    yield events
        finally:
            await response.aclose()

    async def _send(self, client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
        """The answer to `request`, once it is a success; error answers become the SDK's
        errors, and what the SDK retries is retried up to `max_retries` times."""
        retries = 2 if self.max_retries is None else self.max_retries
        for attempt in itertools.count():
            delay_s: float | None = None
            try:
                response = await client.send(request, stream=True)
            except httpx.TimeoutException as exc:
                error: openai.APIError = openai.APITimeoutError(request=_sdk(request))
                cause: BaseException = exc
            except httpx.HTTPError as exc:
                error, cause = openai.APIConnectionError(request=_sdk(request)), exc
            else:
                if response.is_success:
                    return response
                error = await _status_error(response)
                cause = error
                delay_s = _retry_after_s(response)
                if not _sdk_retries(response):
                    raise error
            if attempt >= retries:
                if cause is error:
                    raise error
                raise error from cause
            backoff_s = min(0.5 * 2.0**attempt, 8.0) * (1 - 0.25 * random.random())
            await asyncio.sleep(backoff_s if delay_s is None else delay_s)
        raise AssertionError("unreachable")

    def _result_of(self, answer: StreamedAnswer) -> ChatResult:
        """One generation holding the whole answer, as ChatOpenAI builds it from chunks."""
        additional: dict[str, Any] = {}
        if answer.reasoning:
            additional["reasoning"] = answer.reasoning
        message = AIMessage(
            content=answer.content,
            additional_kwargs=additional,
            response_metadata={"model_provider": "openai"},
        )
        if answer.usage is not None:
            message.usage_metadata = _create_usage_metadata(answer.usage, answer.service_tier)
        info: dict[str, Any] = {}
        if answer.finish_reason is not None:
            info["finish_reason"] = answer.finish_reason
            info["model_name"] = answer.model or self.model_name
        if answer.system_fingerprint:
            info["system_fingerprint"] = answer.system_fingerprint
        if answer.service_tier:
            info["service_tier"] = answer.service_tier
        # No llm_output: the message carries it all, as in ChatOpenAI's streamed answers.
        generation = ChatGeneration(message=message, generation_info=info or None)
        return ChatResult(generations=[generation])

    def _convert_chunk_to_generation_chunk(
        self,
        chunk: dict[str, Any],
        default_chunk_class: type,
        base_generation_info: dict[str, Any] | None,
    ) -> ChatGenerationChunk | None:
        out = super()._convert_chunk_to_generation_chunk(
            chunk, default_chunk_class, base_generation_info
        )
        choices = chunk.get("choices") or []
        if out is not None and choices and isinstance(choices[0].get("delta"), dict):
            reasoning = reasoning_of(choices[0]["delta"])
            if reasoning and isinstance(out.message, AIMessageChunk):
                out.message.additional_kwargs["reasoning"] = reasoning
        return out

    def _create_chat_result(
        self, response: Any, generation_info: dict[str, Any] | None = None
    ) -> ChatResult:
        result = super()._create_chat_result(response, generation_info)
        raw = response if isinstance(response, dict) else response.model_dump()
        for gen, choice in zip(result.generations, raw.get("choices") or [], strict=False):
            reasoning = reasoning_of(choice.get("message") or {})
            if reasoning:
                gen.message.additional_kwargs["reasoning"] = reasoning
        return result


def _reads_chunks(run_manager: Any) -> bool:
    """Whether a handler consumes the chunks themselves (`astream_events`, `astream_log`,
    LangGraph's "messages" stream mode): they implement `tap_output_aiter`."""
    handlers = getattr(run_manager, "handlers", None) or []
    return any(hasattr(handler, "tap_output_aiter") for handler in handlers)


# The hooks a handler inherits when it does not listen for tokens.
_NO_TOKEN_HOOKS = (BaseCallbackHandler.on_llm_new_token, AsyncCallbackHandler.on_llm_new_token)


def _wants_tokens(run_manager: AsyncCallbackManagerForLLMRun | None) -> bool:
    """Whether a callback handler of this run listens for each new token."""
    if run_manager is None:
        return False
    return any(
        not handler.ignore_llm and type(handler).on_llm_new_token not in _NO_TOKEN_HOOKS
        for handler in run_manager.handlers
    )


def _sdk(request: httpx.Request | httpx.Response) -> Any:
    # The SDK's errors are typed for its own HTTP package; they read only common fields.
    return request


def _parse_event(data: bytes, request: httpx.Request) -> Any:
    """One event's JSON; an error event becomes the SDK's `APIError`, as the SDK raises it."""
    try:
        event = json.loads(data)
    except ValueError:
        shown = data[:_SHOWN_EVENT_BYTES].decode("utf-8", "replace")
        raise StreamFormatError(f"an event of the stream is not JSON: {shown!r}") from None
    if isinstance(event, dict) and event.get("error"):
        error = event["error"]
        message = error.get("message") if isinstance(error, dict) else None
        raise openai.APIError(
            str(message or error or "an error event in the stream"), _sdk(request), body=error
        )
    return event


async def _status_error(response: httpx.Response) -> openai.APIStatusError:
    """The SDK's error for an error answer (its body read, the response closed)."""
    try:
        await response.aread()
    finally:
        await response.aclose()
    text = response.text.strip()
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = text
    shown = body if body is not None else (response.reason_phrase or "no body")
    message = f"Error code: {response.status_code} - {shown}"
    data = body.get("error", body) if isinstance(body, dict) else body
    kind = _STATUS_ERRORS.get(response.status_code)
    if kind is None:
        kind = openai.InternalServerError if response.status_code >= 500 else openai.APIStatusError
    return kind(message, response=_sdk(response), body=data)


_STATUS_ERRORS: dict[int, type[openai.APIStatusError]] = {
    400: openai.BadRequestError,
    401: openai.AuthenticationError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    409: openai.ConflictError,
    422: openai.UnprocessableEntityError,
    429: openai.RateLimitError,
}
_SHOWN_EVENT_BYTES = 120
# The SDK follows a server's Retry-After up to this long, and does not retry past it.
_MAX_RETRY_AFTER_S = 120.0


def _retry_after_s(response: httpx.Response) -> float | None:
    """Seconds a `Retry-After` header asks for (a number of seconds); None without one."""
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if 0 < value <= _MAX_RETRY_AFTER_S else None


def _sdk_retries(response: httpx.Response) -> bool:
    """Whether the OpenAI SDK would retry this error answer."""
    try:
        if float(response.headers.get("retry-after", "")) > _MAX_RETRY_AFTER_S:
            return False
    except ValueError:
        pass
    said = str(response.headers.get("x-should-retry", ""))
    if said in ("true", "false"):
        return said == "true"
    return response.status_code in (408, 409, 429) or response.status_code >= 500


def split_reasoning(message: BaseMessage) -> tuple[str, str]:
    """Return (content, reasoning), stripping `<think>…</think>` left by a parser-less server."""
    content = message.content if isinstance(message.content, str) else message.text
    reasoning = str(message.additional_kwargs.get("reasoning") or "")
    if "<think>" in content or "</think>" in content:
        found = _THINK_RE.findall(content)
        content = _THINK_RE.sub("", content)
        if "</think>" in content:  # an opening tag that the template already sent
            head, _, content = content.partition("</think>")
            found.insert(0, head)
        reasoning = reasoning or "\n".join(part.strip() for part in found)
    return content.strip(), reasoning


def strip_code_fence(text: str) -> str:
    """The body of the first fenced block, or the text itself when it has no fence."""
    match = _FENCE_RE.search(text)
    return (match.group(1) if match else text).strip("\n") + "\n"


@dataclass
class Usage:
    """Token usage of the calls a node made, per role."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, message: BaseMessage) -> None:
        """Count one model answer."""
        self.calls += 1
        meta = getattr(message, "usage_metadata", None) or {}
        self.prompt_tokens += int(meta.get("input_tokens", 0))
        self.completion_tokens += int(meta.get("output_tokens", 0))

    def as_dict(self) -> dict[str, int]:
        """Plain dict for state and manifest."""
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


class ChatModels(Protocol):
    """What the nodes need: a chat model per role."""

    def for_role(self, role: Role) -> BaseChatModel:
        """The chat model serving `role`."""
        ...


@dataclass
class StaticModels:
    """Chat models given directly (tests, notebooks)."""

    reasoning: BaseChatModel
    coder: BaseChatModel

    def for_role(self, role: Role) -> BaseChatModel:
        """The chat model serving `role`."""
        return self.reasoning if role == "reasoning" else self.coder


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one role's calls; None leaves the server's default."""

    temperature: float | None = None
    top_p: float | None = None


class RouterLike(Protocol):
    """The part of `routing.router.Router` the factory uses."""

    def base_url(self, role: Role) -> str: ...
    def model(self, role: Role) -> str: ...
    def client(self, role: Role) -> Any: ...


@dataclass
class RoutedModels:
    """The LLM client factory: one `VLLMChatOpenAI` per role, sending through the router.

    `sampling` gives each role's temperature and top-p (a role without one sends neither,
    and the server applies the model's generation config).
    """

    router: RouterLike
    api_key: str = "EMPTY"
    timeout_s: float = REQUEST_TIMEOUT_S
    sampling: Mapping[str, Sampling] = field(default_factory=dict)
    call_retry: CallRetry = field(default_factory=CallRetry)
    _cache: dict[str, BaseChatModel] = field(default_factory=dict)
    _windows: dict[str, int | None] = field(default_factory=dict)

    def choose_role(
        self,
        candidates: Sequence[Role],
        expected_output_tokens: int,
        delay_budget_s: float | None = None,
    ) -> Role:
        """The candidate whose call would finish first by the router's estimate, with a guard.

        Candidates are in order of preference. With `delay_budget_s`, the first one keeps the
        call unless its estimated delay exceeds the budget; only then does another that would
        finish sooner take it. The delay is the router's finish estimate for a call with no
        output tokens: its wait for a slot plus the measured time to first token (the
        server's queue and the prefill). Ties, and any candidate the router cannot estimate
        yet (no answers measured), go to the first one (the quality default).
        """
        if not candidates:
            raise ValueError("choose_role needs at least one candidate role")
        estimate = getattr(self.router, "estimate_finish_s", None)
        if estimate is None:
            return candidates[0]
        if delay_budget_s is not None:
            delay_s = estimate(candidates[0], 0)
            if delay_s is None or delay_s <= delay_budget_s:
                return candidates[0]
        finish_s = [estimate(role, expected_output_tokens) for role in candidates]
        if any(f is None for f in finish_s):
            return candidates[0]
        # min() keeps the first of equal keys: ties go to the preferred role.
        return min(zip(finish_s, candidates, strict=True), key=lambda fr: float(fr[0]))[1]

    async def context_tokens(self, role: Role) -> int | None:
        """The server's context window for `role` (vLLM's `max_model_len` on /v1/models).

        Read once per role; None when the server does not say.
        """
        if role not in self._windows:
            window: int | None = None
            try:
                response = await self.router.client(role).get(
                    f"{self.router.base_url(role)}/models",
                    headers={"Authorization": f"Bearer {self.api_key}"},
                )
                for card in response.json().get("data", []):
                    if card.get("id") == self.router.model(role) and card.get("max_model_len"):
                        window = int(card["max_model_len"])
            except (httpx.HTTPError, ValueError, AttributeError):
                window = None
            self._windows[role] = window
        return self._windows[role]

    def for_role(self, role: Role) -> BaseChatModel:
        """The chat model serving `role` (built once)."""
        if role not in self._cache:
            sampling = self.sampling.get(role, Sampling())
            self._cache[role] = VLLMChatOpenAI(
                model=self.router.model(role),
                base_url=self.router.base_url(role),
                api_key=SecretStr(self.api_key),
                http_async_client=self.router.client(role),
                timeout=self.timeout_s,
                # LangChain's own 120 s limit on silence between chunks would cut a request
                # that waits in an overloaded vLLM's queue (no chunk before the first token);
                # the router owns the request deadline.
                stream_chunk_timeout=self.timeout_s,
                # One retry layer: `call_retry`, around each call (see the module docstring).
                max_retries=0,
                call_retry=self.call_retry,
                streaming=True,  # the router measures time to first token and inter-token latency
                stream_usage=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                tags=[f"role:{role}"],
                metadata={"endpoint_role": role},
            )
        return self._cache[role]


def _trace_config(info: CallInfo, config: RunnableConfig | None) -> RunnableConfig:
    base: RunnableConfig = dict(config or {})  # type: ignore[assignment]
    tags = [*base.get("tags", []), f"stage:{info.stage}", f"role:{info.role}"]
    metadata = {
        **base.get("metadata", {}),
        "session_id": info.session_id,
        "stage": info.stage,
        "endpoint_role": info.role,
    }
    if info.file:
        metadata["file"] = info.file
    return {**base, "tags": tags, "metadata": metadata, "run_name": f"{info.stage}:{info.role}"}


async def complete_text(
    model: BaseChatModel,
    messages: Sequence[BaseMessage],
    info: CallInfo,
    usage: Usage,
    *,
    max_tokens: int | None = None,
    config: RunnableConfig | None = None,
) -> tuple[str, str]:
    """One free-text call. Returns (content, reasoning).

    Raises:
        ModelCallError: the call failed in transport or on the server after its retries.
    """
    answer = await complete_answer(
        model, messages, info, usage, max_tokens=max_tokens, config=config
    )
    return split_reasoning(answer)


async def complete_answer(
    model: BaseChatModel,
    messages: Sequence[BaseMessage],
    info: CallInfo,
    usage: Usage,
    *,
    max_tokens: int | None = None,
    config: RunnableConfig | None = None,
) -> BaseMessage:
    """One free-text call; the whole answer, for callers that need its `finish_reason`.

    Raises:
        ModelCallError: the call failed in transport or on the server after its retries.
    """
    kwargs: dict[str, Any] = {}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    answer = await invoke_with_retry(model, messages, info, config, **kwargs)
    usage.add(answer)
    return answer


def finish_reason(message: BaseMessage) -> str | None:
    """Why the server stopped this answer: "stop", "length" (hit max_tokens), or None."""
    reason = message.response_metadata.get("finish_reason")
    return reason if isinstance(reason, str) else None


def response_format_for(schema: type[BaseModel]) -> dict[str, Any]:
    """OpenAI `response_format` for vLLM guided decoding of `schema`."""
    return {
        "type": "json_schema",
        "json_schema": {"name": schema.__name__, "schema": copy.deepcopy(_json_schema(schema))},
    }


@functools.cache
def _json_schema(schema: type[BaseModel]) -> dict[str, Any]:
    # Generating a schema takes milliseconds; every structured call of a run needs one.
    return schema.model_json_schema()


async def complete_structured(
    model: BaseChatModel,
    schema: type[T],
    messages: Sequence[BaseMessage],
    info: CallInfo,
    usage: Usage,
    *,
    retries: int = 2,
    max_tokens: int | None = None,
    config: RunnableConfig | None = None,
    retry_when_cut: bool = True,
) -> T:
    """Ask for `schema` as guided JSON; feed validation errors back up to `retries` times.

    The response format travels in `extra_body` so that ChatOpenAI keeps its plain
    streaming path (its `response_format` argument switches to OpenAI's beta parse API).
    An answer that stopped at `max_tokens` before its JSON ended is told so (not shown a
    parse error); with `retry_when_cut` False it is not retried (a caller that can ask for
    less, such as a review of fewer files, does better than asking again).

    Raises:
        OutputError: the answer was still not valid `schema` JSON after the retries
            (`cut_at_max_tokens` when the last one stopped at the cap).
        ModelCallError: a call failed in transport or on the server after its retries.
    """
    history = list(messages)
    kwargs: dict[str, Any] = {"extra_body": {"response_format": response_format_for(schema)}}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    name = schema.__name__
    problem = ""
    cut = False
    attempt = 0
    for attempt in range(1, retries + 2):
        answer = await invoke_with_retry(model, history, info, config, **kwargs)
        usage.add(answer)
        content, _ = split_reasoning(answer)
        try:
            return schema.model_validate_json(strip_json_fence(content))
        except ValidationError as exc:
            problem = _short_errors(exc)
        cut = finish_reason(answer) == "length"
        if attempt > retries or (cut and not retry_when_cut):
            break
        feedback = RETRY_FEEDBACK_PREFIX + (
            f"stopped at the token limit before the {name} JSON ended. Answer again with "
            "only the JSON object, keeping its text fields short."
            if cut
            else f"is not valid {name} JSON: {problem}\nAnswer again with only the JSON object."
        )
        history = [*history, AIMessage(content=content[:4000]), HumanMessage(content=feedback)]
    tries = "1 attempt" if attempt == 1 else f"{attempt} attempts"
    if cut:
        cap = f"max_tokens={max_tokens}" if max_tokens is not None else "the server's max_tokens"
        raise OutputError(
            f"{info.stage}: the {name} JSON was cut at {cap} before it ended ({tries}); "
            f"raise the {info.stage} cap (--max-tokens {info.stage}=N, or max_tokens in the "
            "run context)",
            cut_at_max_tokens=True,
        )
    raise OutputError(f"{info.stage}: invalid {name} JSON after {tries}: {problem}")


def strip_json_fence(text: str) -> str:
    """Accept JSON wrapped in a ```json fence, as models without guided decoding write it."""
    stripped = text.strip()
    if stripped.startswith("```"):
        return strip_code_fence(stripped)
    return stripped


def _short_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def dumps_compact(value: Any) -> str:
    """Deterministic compact JSON, used where prompts must be byte-identical across calls."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
