"""Calibrate an emulator profile against a running vLLM (or vLLM-compatible) server.

    tandem calibrate --url http://127.0.0.1:18002/v1 --model tiny-coder --out coder.yaml

Measurement (functions that return points, reusable from tests):

- time to first token against prompt length: one request at a time, `max_tokens` 1, several
  prompt lengths up to half of `max_model_len`;
- decode time per token against batch size: a wave of `concurrency` streamed requests sent
  together, each generating exactly `output_tokens` tokens (`ignore_eos`), at two prompt
  (context) lengths. Tokens are counted from `usage` (`stream_options.include_usage`), never
  from SSE events (one event may carry several tokens); a wave's time per step is (its last
  token - its first token) / (output tokens - 1), measured client-side like a workflow's
  streamed calls (the first and last tokens always get an event of their own, so it is exact
  however the stream coalesces tokens);
- KV capacity from `/metrics` `vllm:cache_config_info`, `max_model_len` from `/v1/models`.

Every point is measured once per round, all points in every round, so a slow spell of a
shared machine hits calibration and held-out points alike; a point's value is the median
over rounds.

Fit: the step model is linear in its four terms, and the schedule of a wave (which requests
share which step, how prompts are chunked) does not depend on them. So each point's model
value is `features . terms`, where the features come from running the emulator's engine on a
virtual clock with the same wave (four probe profiles, then a 4x4 solve). Time to first token
also carries a per-request overhead of the HTTP server (tokenisation, detokenisation, SSE)
that no engine step models; it is a fifth, nuisance unknown of the TTFT rows. The terms are
the non-negative least-squares solution of the relative errors (all active sets enumerated).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import httpx

from routing.vllm_metrics import kv_capacity_tokens, parse_metrics
from serving.clock import now
from serving.clock import run as run_clock
from serving.emulator.engine import CHARS_PER_TOKEN, Engine
from serving.emulator.profiles import Profile, dump_profile_file
from serving.roles import Role

Kind = Literal["ttft", "itl"]
Progress = Callable[[str], None]

TERMS: tuple[str, ...] = (
    "base_s",
    "prefill_token_s",
    "decode_seq_s",
    "context_token_s",
    "guided_seq_s",
)
DEFAULT_LEVELS = (1, 4, 16, 64)
DEFAULT_OUTPUT_TOKENS = 128
# vLLM's API-server default on GPUs below H100 class (H100/H200: 1024; CPU build: 128).
DEFAULT_MAX_NUM_SEQS = 256
# vLLM's API-server default on GPUs below H100 class and on the CPU build (H100/H200: 8192).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
DEFAULT_REASONING_FRAC = 0.6
SHORT_PROMPT_TOKENS = 32
_ITL_NAMES = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
_WORDS = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
    "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()


# -- server facts -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerInfo:
    """What the server reports about itself."""

    model: str
    max_model_len: int
    kv_cache_tokens: int | None
    block_size: int | None


def _root_url(base_url: str) -> str:
    """`http://host:port` from a base URL ending in /v1."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _block_size(page: str) -> int | None:
    """`block_size` label of `vllm:cache_config_info`, if present."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        for family in text_string_to_metric_families(page):
            if family.name == "vllm:cache_config_info":
                for sample in family.samples:
                    size = sample.labels.get("block_size", "")
                    if size.isdigit():
                        return int(size)
    except ValueError:
        return None
    return None


async def read_server_info(client: httpx.AsyncClient, base_url: str, model: str) -> ServerInfo:
    """`max_model_len` from /v1/models and the KV capacity from /metrics.

    Raises:
        ValueError: the server does not serve `model` or reports no max_model_len.
    """
    response = await client.get(f"{base_url}/models")
    response.raise_for_status()
    cards = response.json().get("data", [])
    card = next((c for c in cards if c.get("id") == model), None)
    if card is None:
        served = [c.get("id") for c in cards]
        raise ValueError(f"{base_url} does not serve {model!r}; it serves {served}")
    max_model_len = card.get("max_model_len")
    if not isinstance(max_model_len, int):
        raise ValueError(f"{base_url}/models reports no max_model_len for {model!r}")
    metrics = await client.get(f"{_root_url(base_url)}/metrics")
    page = metrics.text if metrics.status_code == 200 else ""
    return ServerInfo(model, max_model_len, kv_capacity_tokens(page), _block_size(page))


# -- one streamed request -----------------------------------------------------------------


@dataclass(frozen=True)
class StreamTiming:
    """One streamed completion as the client saw it (seconds on the loop's clock)."""

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    decode_s: float

    @property
    def decode_per_token_s(self) -> float | None:
        """Mean time per token after the first (None for a one-token answer)."""
        if self.completion_tokens < 2:
            return None
        return self.decode_s / (self.completion_tokens - 1)


async def stream_completion(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    prompt: str,
    max_tokens: int,
    response_format: Mapping[str, Any] | None = None,
) -> StreamTiming:
    """Send one streamed chat completion of exactly `max_tokens` tokens and time it.

    The first event that carries a choice marks the first token; the last such event (the one
    with `finish_reason`) the last token. Token counts come from the usage chunk. With a
    `response_format` the answer is guided and ends where its grammar does (at most
    `max_tokens`): `ignore_eos` would run past the end of the JSON.

    Raises:
        ValueError: the stream ended without a usage chunk.
    """
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": response_format is None,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if response_format is not None:
        body["response_format"] = dict(response_format)
    import json

    start = now()
    first: float | None = None
    last = start
    usage: dict[str, int] | None = None
    async with client.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("choices"):
                last = now()
                first = last if first is None else first
            if chunk.get("usage"):
                usage = chunk["usage"]
    if usage is None or first is None:
        raise ValueError(f"{base_url}: the stream carried no usage chunk (include_usage)")
    return StreamTiming(
        prompt_tokens=int(usage["prompt_tokens"]),
        completion_tokens=int(usage["completion_tokens"]),
        ttft_s=first - start,
        decode_s=last - first,
    )


# -- prompts of a given token length --------------------------------------------------------


@dataclass(frozen=True)
class PromptBuilder:
    """Prompts of about `n` tokens as the server counts them (chat template included).

    Attributes:
        tokens_per_word: Server tokens per filler word.
        overhead_tokens: Tokens of the chat template and the nonce.
    """

    tokens_per_word: float
    overhead_tokens: float
    _counter: list[int] = field(default_factory=lambda: [0], compare=False, repr=False)

    def words_for(self, tokens: int) -> int:
        """Filler words for a prompt of `tokens` tokens (at least 1)."""
        return max(1, round((tokens - self.overhead_tokens) / self.tokens_per_word))

    def text(self, tokens: int) -> str:
        """A fresh prompt of about `tokens` tokens; its unique start defeats the prefix cache."""
        self._counter[0] += 1
        return filler_text(self.words_for(tokens), nonce=self._counter[0])


def filler_text(words: int, nonce: int) -> str:
    """`words` filler words after a nonce that makes the prompt's first block unique."""
    body = " ".join(_WORDS[(nonce + i) % len(_WORDS)] for i in range(words))
    return f"{nonce:06d} {body}"


async def probe_prompt_builder(
    client: httpx.AsyncClient, base_url: str, model: str, words: tuple[int, int] = (16, 512)
) -> PromptBuilder:
    """Learn the server's tokens per filler word from two one-token requests."""
    counts = []
    for i, n in enumerate(words):
        timing = await stream_completion(
            client, base_url, model, filler_text(n, nonce=900_000 + i), 1
        )
        counts.append(timing.prompt_tokens)
    per_word = (counts[1] - counts[0]) / (words[1] - words[0])
    return PromptBuilder(per_word, counts[0] - per_word * words[0])


# -- points ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointSpec:
    """One measurement: a lone request's TTFT, or a wave's decode time per token.

    Attributes:
        kind: "ttft" (one request, one output token) or "itl" (a wave).
        prompt_tokens: Target prompt length, server tokens.
        concurrency: Requests sent together (1 for ttft).
        output_tokens: Tokens each request generates (1 for ttft); at most this many for a
            guided point, whose grammar may end the answer sooner.
        guided: Lone requests under structured output (`measure_points`' `guided_format`):
            their decode time per token, which carries the grammar's per-step cost.
    """

    kind: Kind
    prompt_tokens: int
    concurrency: int = 1
    output_tokens: int = 1
    guided: bool = False

    @property
    def label(self) -> str:
        """Short human name."""
        if self.kind == "ttft":
            return f"ttft p={self.prompt_tokens}"
        guided = " guided" if self.guided else ""
        return f"itl c={self.concurrency} p={self.prompt_tokens}{guided}"


@dataclass(frozen=True)
class Sample:
    """One round's measurement of a point."""

    value_s: float
    prompt_tokens: int
    completion_tokens: int
    wall_s: float


@dataclass(frozen=True)
class Point:
    """A point measured over several rounds; `value_s` is the median over rounds.

    Attributes:
        spec: What was measured.
        prompt_tokens: Median prompt length the server counted.
        output_tokens: Median completion tokens per request.
        value_s: Median over rounds of the TTFT, or of the wave's mean decode time per token.
        rounds_s: Each round's value.
        tokens_per_s: Median over rounds of the wave's output tokens per second of wall time.
        retries: Waves measured again because they reached the engine staggered.
        samples: Each round's sample (a `WaveSample` for a wave).
    """

    spec: PointSpec
    prompt_tokens: int
    output_tokens: int
    value_s: float
    rounds_s: tuple[float, ...]
    tokens_per_s: float
    retries: int = 0
    samples: tuple[Sample, ...] = ()


async def measure_ttft(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    builder: PromptBuilder,
    prompt_tokens: int,
    repeats: int = 3,
) -> Sample:
    """Median TTFT of `repeats` lone one-token requests with fresh prompts."""
    timings = [
        await stream_completion(client, base_url, model, builder.text(prompt_tokens), 1)
        for _ in range(repeats)
    ]
    return Sample(
        value_s=statistics.median(t.ttft_s for t in timings),
        prompt_tokens=round(statistics.median(t.prompt_tokens for t in timings)),
        completion_tokens=1,
        wall_s=sum(t.ttft_s for t in timings),
    )


@dataclass(frozen=True)
class EngineCounters:
    """Cumulative engine-side counters from `/metrics`.

    Attributes:
        itl_sum_s: Sum of the inter-token latency histogram (engine-core timestamps in vLLM
            V1, so a lagging API server does not distort it).
        itl_count: Its count (decode tokens).
        iterations: Engine steps (`vllm:iteration_tokens_total` count), None if not reported.
    """

    itl_sum_s: float
    itl_count: float
    iterations: float | None


async def read_counters(client: httpx.AsyncClient, base_url: str) -> EngineCounters:
    """Scrape the server's inter-token latency histogram and step count.

    Raises:
        ValueError: the page has no inter-token latency histogram.
    """
    from prometheus_client.parser import text_string_to_metric_families

    response = await client.get(f"{_root_url(base_url)}/metrics")
    response.raise_for_status()
    snapshot = parse_metrics(response.text, 0.0)
    has_itl = any(name in response.text for name in _ITL_NAMES)
    if not snapshot.ok or not has_itl:
        raise ValueError(f"{base_url}: /metrics has no inter-token latency histogram")
    iterations = None
    for family in text_string_to_metric_families(response.text):
        if family.name == "vllm:iteration_tokens_total":
            iterations = sum(s.value for s in family.samples if s.name.endswith("_count"))
    return EngineCounters(snapshot.itl_sum_s, snapshot.itl_count, iterations)


@dataclass(frozen=True)
class WaveSample(Sample):
    """A wave's sample, with the engine steps it took (None if the server does not say).

    Attributes:
        iterations: Engine steps from the wave's first send to its end (blocker included).
        span_s: Seconds from the first send (the blocker's, if any) to the wave's last token:
            the engine is busy all along, so this is the time of those `iterations` steps.
        blocker_prompt_tokens: The blocker's prompt, server tokens (0: none).
    """

    iterations: float | None = None
    span_s: float = 0.0
    blocker_prompt_tokens: int = 0


@dataclass(frozen=True)
class _Streamed:
    """One streamed request of a wave: token counts and loop-clock times of its events."""

    prompt_tokens: int
    completion_tokens: int
    first_s: float
    last_s: float


async def _streamed(
    client: httpx.AsyncClient, base_url: str, model: str, prompt: str, max_tokens: int
) -> _Streamed:
    timing_start = now()
    timing = await stream_completion(client, base_url, model, prompt, max_tokens)
    first = timing_start + timing.ttft_s
    return _Streamed(timing.prompt_tokens, timing.completion_tokens, first, first + timing.decode_s)


def wave_step_s(first_token_s: float, last_token_s: float, output_tokens: int) -> float:
    """A wave's time per generation step: (last token - the wave's first token) / (n - 1).

    For a lone request the first argument is when it was sent instead (`lone_step_s`).
    """
    return (last_token_s - first_token_s) / max(1, output_tokens - 1)


def lone_step_s(sent_s: float, last_token_s: float, output_tokens: int) -> float:
    """A lone request's (last token - sent) / (n - 1): its prefill step, its decode steps
    and the HTTP server's per-request time (the fit's overhead term, weighted 1 / (n - 1)).

    Timed from the send, not from the first token: an API process short of CPU may deliver
    a lone answer in one burst, its first and last events together, while the end of an
    answer cannot arrive before the engine made it.
    """
    return wave_step_s(sent_s, last_token_s, output_tokens)


async def measure_wave(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    builder: PromptBuilder,
    spec: PointSpec,
    blocker_tokens: int = 0,
) -> WaveSample:
    """Closed-loop time per step of `spec.concurrency` streamed requests sent together.

    Measured client-side over the whole wave, the way a workflow's streamed calls see the
    server (API-server and client work included): (the wave's last token - its first token)
    / (output tokens - 1), with token counts from `usage`. The engine's step count over the
    wave (`/metrics`, if reported) tells whether the wave reached the engine together.

    With `blocker_tokens`, a wave of several requests is sent just behind `blockers_for`
    one-token requests of that prompt length: the engine is busy with their prefill while
    the API server hands the wave over, so the wave is admitted together at the next step
    boundary instead of one request at a time (an API process short of CPU hands requests
    over slower than a small model decodes them).

    Raises:
        ValueError: a request generated other than `spec.output_tokens` tokens (the server
            ignored `ignore_eos` or capped `max_tokens`).
    """
    before = await read_counters(client, base_url)
    sent = now()
    blockers = []
    for _ in range(blockers_for(spec, blocker_tokens)):
        prompt = builder.text(blocker_tokens)
        blockers.append(
            asyncio.ensure_future(stream_completion(client, base_url, model, prompt, 1))
        )
    if blockers:
        await asyncio.sleep(BLOCKER_LEAD_S)
    start = now()
    streams = await asyncio.gather(
        *(
            _streamed(client, base_url, model, builder.text(spec.prompt_tokens), spec.output_tokens)
            for _ in range(spec.concurrency)
        )
    )
    wall_s = now() - start
    blocked = await asyncio.gather(*blockers)
    after = await read_counters(client, base_url)
    short = [s.completion_tokens for s in streams if s.completion_tokens != spec.output_tokens]
    if short:
        raise ValueError(
            f"{spec.label}: asked for {spec.output_tokens} tokens, got {sorted(set(short))}"
        )
    iterations = None
    if after.iterations is not None and before.iterations is not None:
        iterations = after.iterations - before.iterations
    first = min(s.first_s for s in streams)
    last = max(s.last_s for s in streams)
    if spec.concurrency == 1:
        first = start  # a lone request: see `lone_step_s`
    return WaveSample(
        value_s=wave_step_s(first, last, spec.output_tokens),
        prompt_tokens=round(statistics.median(s.prompt_tokens for s in streams)),
        completion_tokens=spec.output_tokens,
        wall_s=wall_s,
        iterations=iterations,
        span_s=last - sent,
        blocker_prompt_tokens=sum(b.prompt_tokens for b in blocked),
    )


def schedule_features(spec: PointSpec, sample: Sample) -> list[float] | None:
    """Totals of the steps a measured wave (or lone request) ran, one per step term.

    `[steps, prompt tokens, decode sequence-steps, context tokens, guided sequence-steps]`:
    under the additive step model the wave's span is these dotted with the profile's terms
    (`TERMS`), plus the HTTP server's per-request time. Steps come from the engine's own
    counter (`vllm:iteration_tokens_total`), the rest from the wave's token counts: each
    prompt (the blocker's too) is computed once, each request's tokens after its first are
    decode steps, and a prefill step holds the prompt, decode step i of a request p + i
    tokens of context. A wave that reached the engine staggered ran more, smaller steps than
    one sent together; its totals say so, where a per-step statistic would compare
    different schedules. A lone guided request (`measure_guided`) ran one step per token.
    None when the step count is not known (a server without the counter).
    """
    n, p = sample.completion_tokens, sample.prompt_tokens
    if isinstance(sample, WaveSample):
        if sample.iterations is None:
            return None
        steps, c, blocker = sample.iterations, spec.concurrency, sample.blocker_prompt_tokens
    elif spec.kind == "itl" and spec.concurrency == 1:
        steps, c, blocker = float(n), 1, 0
    else:
        return None
    decodes = c * (n - 1)
    return [
        float(steps),
        float(c * p + blocker),
        float(decodes),
        float(blocker + c * (n * p + n * (n - 1) // 2)),
        float(decodes if spec.guided else 0),
    ]


def sample_span_s(sample: Sample) -> float:
    """Seconds from a wave's first send to its last token (a lone guided request's likewise)."""
    if isinstance(sample, WaveSample):
        return sample.span_s
    return sample.value_s * max(1, sample.completion_tokens - 1)  # `lone_step_s` x (n - 1)


def wave_time_s(profile: Profile, spec: PointSpec, sample: Sample) -> float | None:
    """`profile`'s additive step model over the steps `sample` ran (`schedule_features`);
    compare with `sample_span_s` less the per-request HTTP time. None without a step count."""
    features = schedule_features(spec, sample)
    if features is None:
        return None
    terms: list[float] = [getattr(profile, t) for t in TERMS]
    return float(sum(f * t for f, t in zip(features, terms, strict=True)))


# How long after its blocker a wave is sent (for the blocker to reach the engine first).
BLOCKER_LEAD_S = 0.02


def blockers_for(spec: PointSpec, blocker_tokens: int) -> int:
    """One-token long-prompt requests sent ahead of a wave: one, none for a lone request.

    One only: its prefill fits in one step, so the step after it holds the wave alone (a
    blocker chunked over several steps would share its last step with part of the wave).
    """
    if blocker_tokens <= 0 or spec.kind != "itl" or spec.concurrency < 2:
        return 0
    return 1


def blocker_tokens_for(limits: EngineLimits) -> int:
    """A blocker's prompt: nearly one step's token budget (one long prefill step)."""
    return max(0, min(limits.max_num_batched_tokens, limits.max_model_len // 2) - 64)


def expected_steps(
    spec: PointSpec, prompt_tokens: int, limits: EngineLimits, blocker_tokens: int = 0
) -> int:
    """Engine steps a wave (and its blockers) takes when its requests reach the engine together."""
    batch = min(spec.concurrency, limits.max_num_seqs)
    waves = -(-spec.concurrency // batch)
    prefill_steps = -(-batch * prompt_tokens // limits.max_num_batched_tokens)
    blocked = blockers_for(spec, blocker_tokens) * blocker_tokens
    blocker_steps = -(-blocked // limits.max_num_batched_tokens)
    return blocker_steps + waves * (prefill_steps + spec.output_tokens - 1)


async def measure_points(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    specs: Sequence[PointSpec],
    *,
    rounds: int = 3,
    ttft_repeats: int = 3,
    builder: PromptBuilder | None = None,
    limits: EngineLimits | None = None,
    max_attempts: int = 3,
    progress: Progress | None = None,
    guided_format: Mapping[str, Any] | None = None,
    blockers: bool = True,
) -> list[Point]:
    """Measure every spec once per round, `rounds` times, after a warm-up.

    Interleaving puts calibration and held-out points of one round in the same spell of the
    machine; the median over rounds drops a spell that hit one round only. A wave whose
    requests reached the engine staggered (it took more engine steps than a wave sent
    together, see `expected_steps`; needs `limits` and a server that reports its steps) ran
    at smaller batches than asked: it is measured again, up to `max_attempts` times, and the
    best-formed attempt kept.

    Args:
        client: HTTP client (any transport).
        base_url: Server base URL ending in /v1.
        model: Served model name.
        specs: The points.
        rounds: Measurements per point.
        ttft_repeats: Requests per TTFT measurement (median of them).
        builder: Prompt builder; probed from the server if None.
        limits: The server's scheduler limits, for the wave check.
        max_attempts: Tries per wave and round.
        progress: Called with a spec's label after each measurement.
        guided_format: The `response_format` of guided points (a JSON schema the workload
            uses); needed when a spec is guided.
        blockers: Send waves behind blockers (`measure_wave`); needs `limits`.

    Raises:
        ValueError: a guided spec without `guided_format`.
    """
    if guided_format is None and any(s.guided for s in specs):
        raise ValueError("guided points need the response_format to guide them with")
    builder = builder or await probe_prompt_builder(client, base_url, model)
    blocker_tokens = blocker_tokens_for(limits) if (blockers and limits is not None) else 0
    await _warm_up(client, base_url, model, builder, specs, guided_format)
    samples: dict[PointSpec, list[Sample]] = {spec: [] for spec in specs}
    retries: dict[PointSpec, int] = dict.fromkeys(specs, 0)
    for _ in range(rounds):
        for spec in specs:
            sample: Sample
            if spec.kind == "ttft":
                sample = await measure_ttft(
                    client, base_url, model, builder, spec.prompt_tokens, ttft_repeats
                )
            elif spec.guided:
                assert guided_format is not None
                sample = await measure_guided(
                    client, base_url, model, builder, spec, guided_format, ttft_repeats
                )
            else:
                sample = await _formed_wave(
                    client, base_url, model, builder, spec, limits, max_attempts, blocker_tokens
                )
                retries[spec] += getattr(sample, "attempts", 1) - 1
            samples[spec].append(sample)
            if progress is not None:
                progress(spec.label)
    return [_point(spec, samples[spec], retries[spec]) for spec in specs]


@dataclass(frozen=True)
class _Attempted(WaveSample):
    attempts: int = 1


async def _formed_wave(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    builder: PromptBuilder,
    spec: PointSpec,
    limits: EngineLimits | None,
    max_attempts: int,
    blocker_tokens: int = 0,
) -> _Attempted:
    """The first wave that reached the engine together, else the best-formed of the tries."""
    tries: list[WaveSample] = []
    for _ in range(max_attempts):
        sample = await measure_wave(client, base_url, model, builder, spec, blocker_tokens)
        tries.append(sample)
        if limits is None or sample.iterations is None:
            break
        expected = expected_steps(spec, sample.prompt_tokens, limits, blocker_tokens)
        if sample.iterations <= 1.1 * expected + 2:
            break
    best = min(tries, key=lambda s: s.iterations if s.iterations is not None else 0.0)
    return _Attempted(**{f.name: getattr(best, f.name) for f in fields(best)}, attempts=len(tries))


async def _warm_up(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    builder: PromptBuilder,
    specs: Sequence[PointSpec],
    guided_format: Mapping[str, Any] | None = None,
) -> None:
    """One wave at the widest batch and longest prompt, so first-use costs are not measured;
    one guided request, so the grammar is compiled (and cached) before it is timed."""
    waves = [s for s in specs if s.kind == "itl"] or [PointSpec("itl", SHORT_PROMPT_TOKENS, 1, 8)]
    widest = max(s.concurrency for s in waves)
    longest = max(s.prompt_tokens for s in specs)
    await measure_wave(client, base_url, model, builder, PointSpec("itl", longest, widest, 8))
    await measure_ttft(client, base_url, model, builder, longest, 1)
    if guided_format is not None:
        prompt = builder.text(SHORT_PROMPT_TOKENS)
        await stream_completion(client, base_url, model, prompt, 8, guided_format)


async def measure_guided(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    builder: PromptBuilder,
    spec: PointSpec,
    response_format: Mapping[str, Any],
    repeats: int = 3,
) -> Sample:
    """Median `lone_step_s` of `repeats` lone guided requests (fresh prompts).

    Raises:
        ValueError: no request generated two tokens or more (nothing to time).
    """
    timings = []
    for _ in range(repeats):
        prompt = builder.text(spec.prompt_tokens)
        timings.append(
            await stream_completion(
                client, base_url, model, prompt, spec.output_tokens, response_format
            )
        )
    per_token = [
        lone_step_s(0.0, t.ttft_s + t.decode_s, t.completion_tokens)
        for t in timings
        if t.completion_tokens > 1
    ]
    if not per_token:
        raise ValueError(f"{spec.label}: the guided answers had fewer than two tokens")
    return Sample(
        value_s=statistics.median(per_token),
        prompt_tokens=round(statistics.median(t.prompt_tokens for t in timings)),
        completion_tokens=round(statistics.median(t.completion_tokens for t in timings)),
        wall_s=sum(t.ttft_s + t.decode_s for t in timings),
    )


def _point(spec: PointSpec, samples: Sequence[Sample], retries: int) -> Point:
    return Point(
        spec=spec,
        prompt_tokens=round(statistics.median(s.prompt_tokens for s in samples)),
        output_tokens=round(statistics.median(s.completion_tokens for s in samples)),
        value_s=statistics.median(s.value_s for s in samples),
        rounds_s=tuple(s.value_s for s in samples),
        tokens_per_s=statistics.median(
            s.completion_tokens * spec.concurrency / s.wall_s if s.wall_s > 0 else 0.0
            for s in samples
        ),
        retries=retries,
        samples=tuple(samples),
    )


def calibration_specs(
    info: ServerInfo,
    *,
    levels: Sequence[int] = DEFAULT_LEVELS,
    output_tokens: int = DEFAULT_OUTPUT_TOKENS,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    ttft_lengths: int = 5,
    guided: bool = False,
) -> list[PointSpec]:
    """The default points: TTFT up to half of max_model_len, waves at two context lengths,
    and (with `guided`) lone guided requests at the short context, for the grammar's cost.

    The long context is a quarter of max_model_len, capped so the widest wave fits in half
    the KV cache (preemption would change the schedule the fit assumes).
    """
    top = max(SHORT_PROMPT_TOKENS * 2, info.max_model_len // 2)
    ratio = (top / SHORT_PROMPT_TOKENS) ** (1 / max(1, ttft_lengths - 1))
    lengths = sorted({round(SHORT_PROMPT_TOKENS * ratio**i) for i in range(ttft_lengths)})
    specs = [PointSpec("ttft", p) for p in lengths]
    long_prompt = info.max_model_len // 4
    if info.kv_cache_tokens:
        fit = info.kv_cache_tokens // (2 * max(levels)) - output_tokens
        long_prompt = min(long_prompt, fit)
    long_prompt = min(long_prompt, max_num_batched_tokens, info.max_model_len - output_tokens - 1)
    contexts = [SHORT_PROMPT_TOKENS]
    if long_prompt > 2 * SHORT_PROMPT_TOKENS:
        contexts.append(long_prompt)
    for prompt in contexts:
        specs.extend(PointSpec("itl", prompt, c, output_tokens) for c in levels)
    if guided:
        specs.append(PointSpec("itl", SHORT_PROMPT_TOKENS, 1, output_tokens, guided=True))
    return specs


# -- the model's features of each point ------------------------------------------------------


@dataclass(frozen=True)
class EngineLimits:
    """The scheduler limits the fitted profile will have (they shape each wave's schedule)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_tokens: int
    max_model_len: int
    block_size: int = 16


def _probe_profile(limits: EngineLimits, terms: Sequence[float]) -> Profile:
    return Profile(
        name="probe",
        served_model_name="probe",
        role="coder",
        base_s=terms[0],
        prefill_token_s=terms[1],
        decode_seq_s=terms[2],
        context_token_s=terms[3],
        guided_seq_s=terms[4],
        max_num_seqs=limits.max_num_seqs,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        kv_cache_tokens=limits.kv_cache_tokens,
        max_model_len=limits.max_model_len,
        block_size=limits.block_size,
        min_output_frac=1.0,
    )


async def _engine_value(profile: Profile, point: Point) -> float:
    """The point's statistic when the emulator's engine serves the same requests.

    TTFT for a lone request; for a wave, its time per step (`wave_step_s`) as the client
    measures it.
    """
    engine = Engine(profile)
    spec = point.spec
    count = spec.concurrency if spec.kind == "itl" else 1
    chars = point.prompt_tokens * CHARS_PER_TOKEN
    # Every request is queued before the engine's first step, as a wave sent together.
    handles = [
        engine.submit((f"{i:08d}|" + "x" * chars)[:chars], point.output_tokens, guided=spec.guided)
        for i in range(count)
    ]
    records = [await h.result() for h in handles]
    await engine.aclose()
    if spec.kind == "ttft":
        first = records[0].first_token_s
        assert first is not None
        return first - records[0].arrival_s
    firsts = [r.first_token_s for r in records if r.first_token_s is not None]
    lasts = [r.finish_s for r in records if r.finish_s is not None]
    assert len(firsts) == len(lasts) == len(records)
    if count == 1:
        return lone_step_s(records[0].arrival_s, lasts[0], point.output_tokens)
    return wave_step_s(min(firsts), max(lasts), point.output_tokens)


# Probe terms of typical magnitude; the probes are this vector with one term doubled each, so
# the 4x4 system is (ones + identity) after scaling: well conditioned.
_PROBE_TERMS = (1e-3, 1e-5, 1e-5, 1e-8, 1e-3)


def point_features(points: Sequence[Point], limits: EngineLimits) -> list[list[float]]:
    """Per point, the four coefficients of the step terms in the point's model value.

    Must be called outside a running event loop (it runs the engine on a virtual clock).
    """
    probes = []
    for k in range(len(TERMS)):
        terms = list(_PROBE_TERMS)
        terms[k] *= 2
        probes.append(terms)

    async def values() -> list[list[float]]:
        out = []
        for point in points:
            out.append([await _engine_value(_probe_profile(limits, t), point) for t in probes])
        return out

    measured = run_clock(values(), virtual=True)
    # y_i = sum_k probe_ik f_k; with g_k = f_k * PROBE_k: y_i = sum_k (1 + [i == k]) g_k,
    # whose inverse is g = y - sum(y) / (n + 1).
    n = len(TERMS)
    features = []
    for y in measured:
        total = sum(y) / (n + 1)
        features.append([(y[k] - total) / _PROBE_TERMS[k] for k in range(n)])
    return features


# -- non-negative least squares -------------------------------------------------------------


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Solve the square system a x = b by Gaussian elimination with partial pivoting."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                factor = m[r][col] / m[col][col]
                m[r] = [x - factor * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def nnls(rows: Sequence[Sequence[float]], targets: Sequence[float]) -> list[float]:
    """Minimise ||A x - b||^2 subject to x >= 0, for a handful of unknowns.

    The optimum is the unconstrained least-squares solution on its own support, so every
    support (2^n of them) is solved by its normal equations and the best non-negative one
    kept. Columns are scaled to unit norm first, so terms of very different size (seconds
    against nanoseconds per token) condition alike.
    """
    n = len(rows[0])
    norms = [math.sqrt(sum(r[k] ** 2 for r in rows)) for k in range(n)]
    # A term no row depends on (a guided term without guided points: its features are
    # rounding noise) stays 0.
    live = [k for k in range(n) if norms[k] > 1e-6 * max(norms)]
    norms = [v or 1.0 for v in norms]
    a = [[r[k] / norms[k] for k in range(n)] for r in rows]
    best: list[float] = [0.0] * n
    best_err = sum(t * t for t in targets)
    for size in range(1, len(live) + 1):
        for support in itertools.combinations(live, size):
            ata = [[sum(r[i] * r[j] for r in a) for j in support] for i in support]
            atb = [sum(r[i] * t for r, t in zip(a, targets, strict=True)) for i in support]
            sol = _solve(ata, atb)
            if sol is None or min(sol) < 0:
                continue
            x = [0.0] * n
            for i, v in zip(support, sol, strict=True):
                x[i] = v
            err = sum(
                (sum(r[k] * x[k] for k in range(n)) - t) ** 2
                for r, t in zip(a, targets, strict=True)
            )
            if err < best_err - 1e-15:
                best, best_err = x, err
    return [v / norms[k] for k, v in enumerate(best)]


# -- the fit ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """Fitted step terms and how well they reproduce the points.

    Attributes:
        terms: base_s, prefill_token_s, decode_seq_s, context_token_s.
        ttft_overhead_s: Per-request time of the HTTP server in TTFT, outside engine steps.
        points: The points fitted.
        predicted_s: The model's value of each point.
    """

    terms: dict[str, float]
    ttft_overhead_s: float
    points: tuple[Point, ...]
    predicted_s: tuple[float, ...]

    @property
    def residuals(self) -> tuple[float, ...]:
        """Relative error of the model at each point (predicted / measured - 1)."""
        return tuple(
            p / pt.value_s - 1 for p, pt in zip(self.predicted_s, self.points, strict=True)
        )


def _overhead_weight(point: Point) -> float:
    """How much of the HTTP server's per-request time a point's value carries."""
    if point.spec.kind == "ttft":
        return 1.0
    if point.spec.concurrency == 1:
        return 1.0 / max(1, point.output_tokens - 1)  # `lone_step_s`
    return 0.0


def _by_schedule(point: Point) -> list[tuple[list[float], float]] | None:
    """A wave point's rows from the schedules its rounds ran: (features, span) per round."""
    if point.spec.kind != "itl" or not point.samples:
        return None
    rows = []
    for sample in point.samples:
        features = schedule_features(point.spec, sample)
        span = sample_span_s(sample)
        if features is None or span <= 0:
            return None
        rows.append((features, span))
    return rows


def fit_step_model(points: Sequence[Point], limits: EngineLimits) -> Fit:
    """Fit the step terms (and the HTTP server's per-request time) to `points`, minimising
    relative error.

    A TTFT point is one row, its features read off the emulator's engine (`point_features`).
    A wave whose server counts its steps gives one row per round from the schedule it ran
    (`schedule_features`, against its span), so a wave that reached the engine staggered is
    fitted as it ran; without a step count, one row from the per-step statistic of a wave
    sent together. Every TTFT and every span carries one per-request HTTP time.
    Must be called outside a running event loop (see `point_features`).

    Raises:
        ValueError: no points, or a point with a non-positive value.
    """
    if not points:
        raise ValueError("no points to fit")
    if any(p.value_s <= 0 for p in points):
        raise ValueError("every point needs a positive measured time")
    scheduled = [_by_schedule(p) for p in points]
    probed = [p for p, rows in zip(points, scheduled, strict=True) if rows is None]
    probe_features = iter(point_features(probed, limits)) if probed else iter(())
    # Per point: its rows (features + overhead weight) and their targets.
    blocks: list[tuple[list[list[float]], list[float]]] = []
    for point, by_round in zip(points, scheduled, strict=True):
        if by_round is None:
            blocks.append(([[*next(probe_features), _overhead_weight(point)]], [point.value_s]))
        else:
            blocks.append(([[*f, 1.0] for f, _ in by_round], [span for _, span in by_round]))
    keep_overhead = any(row[-1] != 0.0 for rows, _ in blocks for row in rows)
    if not keep_overhead:
        blocks = [([row[:-1] for row in rows], ts) for rows, ts in blocks]
    # Relative errors; every point weighs the same, whatever its number of rows.
    weighted: list[list[float]] = []
    ones: list[float] = []
    for rows, ts in blocks:
        share = 1.0 / len(rows) ** 0.5
        for row, t in zip(rows, ts, strict=True):
            weighted.append([v / t * share for v in row])
            ones.append(share)
    x = nnls(weighted, ones)
    predicted = []
    for point, (rows, ts) in zip(points, blocks, strict=True):
        model = [sum(v * c for v, c in zip(r, x, strict=True)) for r in rows]
        # In the point's own unit: its value scaled by the median model / measured ratio.
        ratio = statistics.median(m / t for m, t in zip(model, ts, strict=True))
        predicted.append(point.value_s * ratio)
    overhead = x[len(TERMS)] if keep_overhead else 0.0
    return Fit(dict(zip(TERMS, x, strict=False)), overhead, tuple(points), tuple(predicted))


# -- the profile --------------------------------------------------------------------------


def build_profile(
    fit: Fit,
    limits: EngineLimits,
    *,
    name: str,
    served_model_name: str,
    role: Role = "coder",
    reasoning_frac: float = DEFAULT_REASONING_FRAC,
    url: str = "",
    min_output_frac: float = 0.5,
    default_max_tokens: int = 1024,
) -> Profile:
    """The emulator profile of the fitted server; `source` records how it was measured."""
    return Profile(
        name=name,
        served_model_name=served_model_name,
        role=role,
        base_s=fit.terms["base_s"],
        prefill_token_s=fit.terms["prefill_token_s"],
        decode_seq_s=fit.terms["decode_seq_s"],
        context_token_s=fit.terms["context_token_s"],
        guided_seq_s=fit.terms["guided_seq_s"],
        max_num_seqs=limits.max_num_seqs,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        kv_cache_tokens=limits.kv_cache_tokens,
        max_model_len=limits.max_model_len,
        block_size=limits.block_size,
        min_output_frac=min_output_frac,
        default_max_tokens=default_max_tokens,
        reasoning=role == "reasoning",
        reasoning_frac=reasoning_frac if role == "reasoning" else 0.0,
        source=describe_fit(fit, url=url, model=served_model_name),
    )


def describe_fit(fit: Fit, *, url: str, model: str) -> str:
    """A multi-line record of the calibration: server, date, terms, points and residuals."""
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    terms = ", ".join(f"{k} {v:.4g}" for k, v in fit.terms.items())
    worst = max((abs(r) for r in fit.residuals), default=0.0)
    lines = [
        f"tandem calibrate against {url} (model {model}) on {date}.",
        f"Fit (non-negative least squares, relative error): {terms}; TTFT overhead outside "
        f"engine steps {fit.ttft_overhead_s * 1e3:.2f} ms; worst residual {worst:.1%}.",
        "Points (median over rounds; measured, fitted, residual):",
    ]
    for point, pred, res in zip(fit.points, fit.predicted_s, fit.residuals, strict=True):
        rounds = ", ".join(f"{v * 1e3:.2f}" for v in point.rounds_s)
        lines.append(
            f"  {point.spec.label} (prompt {point.prompt_tokens}, out {point.output_tokens}): "
            f"{point.value_s * 1e3:.3f} ms (rounds {rounds}), fit {pred * 1e3:.3f} ms "
            f"({res:+.1%}), {point.tokens_per_s:.0f} tok/s"
        )
    return "\n".join(lines)


def limits_for(
    info: ServerInfo,
    *,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    kv_cache_tokens: int | None = None,
) -> EngineLimits:
    """Scheduler limits: what the server reports, then the given values for what it does not.

    Raises:
        ValueError: the KV capacity is neither reported nor given.
    """
    kv = kv_cache_tokens or info.kv_cache_tokens
    if not kv:
        raise ValueError(
            "the server reports no vllm:cache_config_info on /metrics; pass --kv-cache-tokens"
        )
    return EngineLimits(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_tokens=kv,
        max_model_len=info.max_model_len,
        block_size=info.block_size or 16,
    )


def emulate_points(
    profile: Profile,
    specs: Sequence[PointSpec],
    *,
    rounds: int = 1,
    guided_format: Mapping[str, Any] | None = None,
) -> list[Point]:
    """Measure `specs` on the emulator serving `profile`, on a virtual clock.

    The emulator has no `ignore_eos`: it is served with `min_output_frac` 1, so every
    request generates its `max_tokens`, as the real server does with `ignore_eos` (a guided
    point's answers too: the emulator's JSON is padded to the length asked for). Its waves
    reach the engine together without blockers (its requests arrive in the same instant).
    Must be called outside a running event loop.
    """
    from serving.emulator.app import create_app
    from serving.emulator.transport import InProcessTransport

    async def main() -> list[Point]:
        app = create_app(replace(profile, min_output_frac=1.0))
        base = "http://emulator.calibrate/v1"
        transport = InProcessTransport(app)
        try:
            async with httpx.AsyncClient(transport=transport, timeout=None) as client:
                return await measure_points(
                    client, base, profile.served_model_name, specs, rounds=rounds,
                    ttft_repeats=1, limits=_limits_of(profile), guided_format=guided_format,
                    blockers=False,
                )  # fmt: skip
        finally:
            await app.state.engine.aclose()

    return run_clock(main(), virtual=True)


def _limits_of(profile: Profile) -> EngineLimits:
    return EngineLimits(
        max_num_seqs=profile.max_num_seqs,
        max_num_batched_tokens=profile.max_num_batched_tokens,
        kv_cache_tokens=profile.kv_cache_tokens,
        max_model_len=profile.max_model_len,
        block_size=profile.block_size,
    )


# -- the `tandem calibrate` job -------------------------------------------------------------


@dataclass(frozen=True)
class CalibrateOptions:
    """What `tandem calibrate` measures and where it writes (see `cli/calibrate.py`)."""

    url: str
    model: str
    out: str
    name: str | None = None
    role: Literal["coder", "reasoning"] = "coder"
    reasoning_frac: float = DEFAULT_REASONING_FRAC
    levels: str = ",".join(map(str, DEFAULT_LEVELS))
    max_concurrency: int | None = None
    output_tokens: int = DEFAULT_OUTPUT_TOKENS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    kv_cache_tokens: int | None = None
    rounds: int = 3
    quick: bool = False
    api_key: str = "EMPTY"
    # The `response_format` of the guided points (the workflow's own schema); None: none.
    guided_format: Mapping[str, Any] | None = None


def calibrate(args: CalibrateOptions) -> int:
    """Measure the server `args.url`, fit the step model, write the profile file.

    Returns:
        0 when the profile was written, 1 when the server could not be measured.
    """
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    levels = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    if args.max_concurrency:
        levels = [c for c in levels if c <= args.max_concurrency]
    rounds = 2 if args.quick else args.rounds
    base_url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"}

    async def measure() -> tuple[EngineLimits, list[Point]]:
        pool = httpx.Limits(max_connections=max(levels) + 4, keepalive_expiry=2.0)
        async with httpx.AsyncClient(timeout=600.0, limits=pool, headers=headers) as client:
            info = await read_server_info(client, base_url, args.model)
            limits = limits_for(
                info,
                max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                kv_cache_tokens=args.kv_cache_tokens,
            )
            specs = calibration_specs(
                info,
                levels=levels,
                output_tokens=args.output_tokens,
                max_num_batched_tokens=args.max_num_batched_tokens,
                ttft_lengths=3 if args.quick else 5,
                guided=args.guided_format is not None,
            )
            with Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                console=console,
            ) as bar:  # fmt: skip
                task = bar.add_task("warm-up", total=rounds * len(specs))

                def advance(label: str) -> None:
                    bar.update(task, advance=1, description=label)

                points = await measure_points(
                    client,
                    base_url,
                    args.model,
                    specs,
                    rounds=rounds,
                    limits=limits,
                    progress=advance,
                    guided_format=args.guided_format,
                )
            return limits, points

    try:
        limits, points = asyncio.run(measure())
    except (httpx.HTTPError, ValueError) as exc:
        console.print(f"[red]calibrate: {exc}[/red]")
        return 1
    fit = fit_step_model(points, limits)
    out = Path(args.out)
    profile = build_profile(
        fit,
        limits,
        name=args.name or out.stem,
        served_model_name=args.model,
        role=args.role,
        reasoning_frac=args.reasoning_frac,
        url=base_url,
    )
    dump_profile_file(profile, out)
    print(profile.source)
    print(f"wrote {out}", file=sys.stderr)
    return 0
