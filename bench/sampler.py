"""Samples real servers' `/metrics` during a run: busy spans, token and preemption deltas."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Mapping, Sequence

import httpx

from routing.calls import Role
from routing.endpoints import Replica
from routing.vllm_metrics import ServerSnapshot, prefix_hit_rate_between, scrape
from serving.clock import now

_FIELDS = {
    "generation_tokens": "generation_tokens_total",
    "preemptions": "preemptions_total",
    "requests": "ttft_count",
    "prompt_tokens": "prompt_tokens_total",
}


def merge_intervals(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted union of `(start, end)` spans."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


class MetricsSampler:
    """Polls every replica's `/metrics` every `interval_s` seconds until stopped."""

    def __init__(
        self, endpoints: Mapping[Role, Sequence[Replica]], interval_s: float = 0.25
    ) -> None:
        self.endpoints = endpoints
        self.interval_s = interval_s
        self.samples: dict[str, list[list[ServerSnapshot]]] = {
            role: [[] for _ in replicas] for role, replicas in endpoints.items()
        }
        self._task: asyncio.Task[None] | None = None
        self._client = httpx.AsyncClient(timeout=5.0)

    async def start(self) -> None:
        """Take a first sample of each server, then keep sampling in the background."""
        await self._sample_all()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """One last sample, then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._sample_all()
        await self._client.aclose()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._sample_all()

    async def _sample_all(self) -> None:
        for role, replicas in self.endpoints.items():
            for i, replica in enumerate(replicas):
                self.samples[role][i].append(
                    await scrape(self._client, replica.scrape_url(), now())
                )

    def busy_intervals(self, role: str) -> list[tuple[float, float]]:
        """Spans between consecutive samples where any replica of `role` had a running request."""
        spans: list[tuple[float, float]] = []
        for series in self.samples.get(role, []):
            for prev, cur in itertools.pairwise(series):
                if cur.ok and cur.running > 0:
                    spans.append((prev.taken_at, cur.taken_at))
        return merge_intervals(spans)

    def prefix_hit_rate(self, role: str) -> float | None:
        """`role`'s prefix-cache hit rate between its first and last good samples."""
        runs = []
        for series in self.samples.get(role, []):
            ok = [s for s in series if s.ok]
            if ok:
                runs.append((ok[0], ok[-1]))
        return prefix_hit_rate_between(runs)

    def delta(self, role: str, name: str) -> float:
        """Increase of a counter over the run, summed over `role`'s replicas."""
        attr = _FIELDS[name]
        total = 0.0
        for series in self.samples.get(role, []):
            ok = [s for s in series if s.ok]
            if len(ok) >= 2:
                total += max(0.0, getattr(ok[-1], attr) - getattr(ok[0], attr))
        return total
