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
import copy
import functools
import json
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import httpx
import openai
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field, SecretStr, ValidationError

from routing.calls import CallInfo, Role, call_scope
from routing.transport import REPLICA_EXTENSION, NotAnEventStream

T = TypeVar("T", bound=BaseModel)

_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)
_FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)(?:\n```|```|$)", re.DOTALL)


class OutputError(Exception):
    """The model's output stayed invalid after the retries allowed."""


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


def _reasoning_of(fields: Mapping[str, Any]) -> str | None:
    # vLLM >= 0.12 answers `reasoning`; older servers `reasoning_content`.
    value = fields.get("reasoning")
    if value is None:
        value = fields.get("reasoning_content")
    return value if isinstance(value, str) else None


class VLLMChatOpenAI(ChatOpenAI):
    """ChatOpenAI that keeps vLLM's reasoning text in `additional_kwargs["reasoning"]`.

    Stock ChatOpenAI drops `reasoning`/`reasoning_content` by design. `call_retry` is the
    retry policy `complete_text` and `complete_structured` apply to its calls.
    """

    call_retry: CallRetry = Field(default=NO_RETRY, exclude=True)

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
            reasoning = _reasoning_of(choices[0]["delta"])
            if reasoning and isinstance(out.message, AIMessageChunk):
                out.message.additional_kwargs["reasoning"] = reasoning
        return out

    def _create_chat_result(
        self, response: Any, generation_info: dict[str, Any] | None = None
    ) -> ChatResult:
        result = super()._create_chat_result(response, generation_info)
        raw = response if isinstance(response, dict) else response.model_dump()
        for gen, choice in zip(result.generations, raw.get("choices") or [], strict=False):
            reasoning = _reasoning_of(choice.get("message") or {})
            if reasoning:
                gen.message.additional_kwargs["reasoning"] = reasoning
        return result


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
    timeout_s: float = 600.0
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
) -> T:
    """Ask for `schema` as guided JSON; feed validation errors back up to `retries` times.

    The response format travels in `extra_body` so that ChatOpenAI keeps its plain
    streaming path (its `response_format` argument switches to OpenAI's beta parse API).

    Raises:
        OutputError: the answer was still not valid `schema` JSON after the retries.
        ModelCallError: a call failed in transport or on the server after its retries.
    """
    history = list(messages)
    kwargs: dict[str, Any] = {"extra_body": {"response_format": response_format_for(schema)}}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    problem = ""
    for attempt in range(retries + 1):
        answer = await invoke_with_retry(model, history, info, config, **kwargs)
        usage.add(answer)
        content, _ = split_reasoning(answer)
        try:
            return schema.model_validate_json(strip_json_fence(content))
        except ValidationError as exc:
            problem = _short_errors(exc)
        if attempt < retries:
            history = [
                *history,
                AIMessage(content=content[:4000]),
                HumanMessage(
                    content=f"That answer is not valid {schema.__name__} JSON: {problem}\n"
                    "Answer again with only the JSON object."
                ),
            ]
    raise OutputError(
        f"{info.stage}: invalid {schema.__name__} JSON after {retries + 1} attempts: {problem}"
    )


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
