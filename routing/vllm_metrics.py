"""Read a vLLM server's Prometheus page into a small snapshot the limit algorithms use.

Both naming eras are accepted: V1 (`vllm:kv_cache_usage_perc`,
`vllm:inter_token_latency_seconds`) and older servers (`vllm:gpu_cache_usage_perc`,
`vllm:time_per_output_token_seconds`). Values are summed over label sets (engines).

Prefix cache, three eras: V1 counts queried and hit prompt tokens in the counters
`vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` (`_total` on the page); the first V1
releases named them `vllm:gpu_prefix_cache_queries` / `vllm:gpu_prefix_cache_hits`, and some
export both names with the same values, so the newer name wins and the two are never added.
The V0 engine exported only the gauge `vllm:gpu_prefix_cache_hit_rate`: the block hit rate
since the server started, which no later scrape can difference.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

_CACHE_CONFIG = "vllm:cache_config_info"
_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_PREEMPT = "vllm:num_preemptions_total"
_PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
_PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
_PREFIX_HIT_RATE_V0 = "vllm:gpu_prefix_cache_hit_rate"
_PROMPT = "vllm:prompt_tokens_total"
_GENERATION = "vllm:generation_tokens_total"
_ITL = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
_TTFT = "vllm:time_to_first_token_seconds"


@dataclass(frozen=True)
class ServerSnapshot:
    """What one scrape of a vLLM `/metrics` page said.

    Attributes:
        taken_at: Loop time of the scrape.
        ok: False when the scrape failed or the page had no vLLM series.
        running: Requests in the running batch.
        waiting: Requests queued inside the server.
        kv_usage: KV-cache usage, 0-1 (None when the page lacks it).
        preemptions_total: Cumulative preemptions.
        prefix_cache_hits_total: Cumulative prefix-cache hit tokens (V1 counters).
        prefix_cache_queries_total: Cumulative prefix-cache queried tokens (V1 counters).
        prefix_cache_hit_rate_since_start: V0's gauge, the block hit rate since the server
            started (None on V1 pages, which have the counters instead).
        prompt_tokens_total: Cumulative prefill tokens.
        generation_tokens_total: Cumulative generated tokens.
        itl_sum_s: Sum of the inter-token latency histogram.
        itl_count: Count of the inter-token latency histogram.
        ttft_sum_s: Sum of the time-to-first-token histogram.
        ttft_count: Count of the time-to-first-token histogram.
        error: Why the scrape failed, when it did.
    """

    taken_at: float
    ok: bool = True
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float | None = None
    preemptions_total: float = 0.0
    prefix_cache_hits_total: float = 0.0
    prefix_cache_queries_total: float = 0.0
    prefix_cache_hit_rate_since_start: float | None = None
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    itl_sum_s: float = 0.0
    itl_count: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0
    error: str | None = None
    kv_capacity_tokens: int | None = None

    @classmethod
    def failed(cls, taken_at: float, error: str) -> ServerSnapshot:
        """A scrape that did not produce a page."""
        return cls(taken_at=taken_at, ok=False, error=error)

    @property
    def prefix_hit_rate(self) -> float | None:
        """Prefix-cache hit rate since the server started, None before any query."""
        if self.prefix_cache_queries_total <= 0:
            return self.prefix_cache_hit_rate_since_start
        return self.prefix_cache_hits_total / self.prefix_cache_queries_total


def parse_metrics(text: str, taken_at: float) -> ServerSnapshot:
    """Parse a vLLM `/metrics` page (Prometheus text format).

    Args:
        text: The page body.
        taken_at: Loop time of the scrape.

    Returns:
        The snapshot; `ok` is False when the page is unparsable or has no vLLM gauges.
    """
    sums: dict[str, float] = {}
    v0_rates: list[float] = []  # one gauge per engine: the server's rate is their mean
    capacity = 0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("vllm:"):
                    sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)
                if sample.name == _PREFIX_HIT_RATE_V0:
                    v0_rates.append(float(sample.value))
            if family.name == _CACHE_CONFIG:
                capacity += _capacity_of(family.samples)
    except ValueError as exc:
        return ServerSnapshot.failed(taken_at, f"unparsable metrics page: {exc}")
    if _RUNNING not in sums and _WAITING not in sums:
        return ServerSnapshot.failed(taken_at, "no vllm:num_requests_* series on the page")

    def first(names: tuple[str, ...], suffix: str = "") -> float | None:
        for name in names:
            if name + suffix in sums:
                return sums[name + suffix]
        return None

    kv = first(_KV)
    return ServerSnapshot(
        taken_at=taken_at,
        running=sums.get(_RUNNING, 0.0),
        waiting=sums.get(_WAITING, 0.0),
        kv_usage=None if kv is None else min(1.0, max(0.0, kv)),
        preemptions_total=sums.get(_PREEMPT, 0.0),
        prefix_cache_hits_total=first(_PREFIX_HITS) or 0.0,
        prefix_cache_queries_total=first(_PREFIX_QUERIES) or 0.0,
        prefix_cache_hit_rate_since_start=statistics.fmean(v0_rates) if v0_rates else None,
        prompt_tokens_total=sums.get(_PROMPT, 0.0),
        generation_tokens_total=sums.get(_GENERATION, 0.0),
        itl_sum_s=first(_ITL, "_sum") or 0.0,
        itl_count=first(_ITL, "_count") or 0.0,
        ttft_sum_s=sums.get(_TTFT + "_sum", 0.0),
        ttft_count=sums.get(_TTFT + "_count", 0.0),
        kv_capacity_tokens=capacity or None,
    )


def prefix_hit_rate_between(runs: Sequence[tuple[ServerSnapshot, ServerSnapshot]]) -> float | None:
    """Prefix-cache hit rate of the tokens queried between two scrapes of each server.

    V1 counters give hits / queries of the increase, summed over the servers. Where no
    server's counters moved and the servers are V0, the rate is the mean of their last
    V0 gauges, which count since each server started (exact only for servers that started
    with the run).

    Args:
        runs: `(first, last)` scrape of each server of one role; not-ok scrapes are ignored.

    Returns:
        The rate in 0-1, or None when nothing was queried (or nothing could be read).
    """
    hits = queries = 0.0
    since_start: list[float] = []
    for first, last in runs:
        if not (first.ok and last.ok):
            continue
        queried = last.prefix_cache_queries_total - first.prefix_cache_queries_total
        if queried > 0:  # a restarted server's counters go back: that pair says nothing
            queries += queried
            hits += max(0.0, last.prefix_cache_hits_total - first.prefix_cache_hits_total)
        elif last.prefix_cache_hit_rate_since_start is not None:
            since_start.append(last.prefix_cache_hit_rate_since_start)
    if queries > 0:
        return min(1.0, hits / queries)
    return statistics.fmean(since_start) if since_start else None


def _capacity_of(samples: Any) -> int:
    total = 0
    for sample in samples:
        blocks = sample.labels.get("num_gpu_blocks", "")
        size = sample.labels.get("block_size", "")
        if blocks.isdigit() and size.isdigit():
            total += int(blocks) * int(size)
    return total


def kv_capacity_tokens(page: str) -> int | None:
    """KV capacity from `vllm:cache_config_info` (num_gpu_blocks x block_size), if present."""
    try:
        for family in text_string_to_metric_families(page):
            if family.name == _CACHE_CONFIG:
                return _capacity_of(family.samples) or None
    except ValueError:
        return None
    return None


async def scrape(client: httpx.AsyncClient, url: str, taken_at: float) -> ServerSnapshot:
    """Fetch and parse one `/metrics` page; any failure gives a not-ok snapshot."""
    try:
        response = await client.get(url)
    except httpx.HTTPError as exc:
        return ServerSnapshot.failed(taken_at, f"{type(exc).__name__}: {exc}")
    if response.status_code != 200:
        return ServerSnapshot.failed(taken_at, f"HTTP {response.status_code}")
    return parse_metrics(response.text, taken_at)
