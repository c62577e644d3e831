"""Output-token throughput of an OpenAI-compatible server at a given concurrency.

    python -m serving.measure --base-url http://127.0.0.1:18002/v1 --model tiny-coder

runs the sweep (concurrency 1, 4, 16, 32, 64) and prints one line per level.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

DEFAULT_LEVELS = (1, 4, 16, 32, 64)
PROMPT = "Write a Python function that parses a JSON config file and validates its fields."


@dataclass(frozen=True)
class ThroughputSample:
    """One measured level."""

    concurrency: int
    n_requests: int
    output_tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per second of wall time."""
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


async def measure_sample(
    base_url: str,
    model: str,
    concurrency: int,
    max_tokens: int = 256,
    n_requests: int | None = None,
    client: httpx.AsyncClient | None = None,
) -> ThroughputSample:
    """Send `n_requests` chat completions, at most `concurrency` at a time.

    Every request asks for exactly `max_tokens` output tokens (`ignore_eos`, a vLLM
    extension), so levels are comparable; tokens are counted from each answer's `usage`.

    Args:
        base_url: Server base URL ending in /v1.
        model: Served model name.
        concurrency: Requests in flight at once.
        max_tokens: Output tokens per request.
        n_requests: Total requests; default 2 x concurrency (at least 4).
        client: An httpx client to reuse; one is made if None.

    Returns:
        The sample: requests, output tokens and wall time.
    """
    total = n_requests if n_requests is not None else max(4, 2 * concurrency)
    gate = asyncio.Semaphore(concurrency)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    # Idle connections expire before uvicorn's 5 s keep-alive closes them under us (a reused
    # connection the server just closed fails with ReadError).
    limits = httpx.Limits(max_connections=concurrency + 4, keepalive_expiry=2.0)
    own = client is None
    http = client or httpx.AsyncClient(timeout=600.0, limits=limits)

    async def one() -> int:
        async with gate:
            response = await http.post(f"{base_url}/chat/completions", json=body)
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

    try:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(total)))
        wall_s = time.perf_counter() - start
    finally:
        if own:
            await http.aclose()
    return ThroughputSample(concurrency, total, sum(counts), wall_s)


async def sweep(
    base_url: str, model: str, levels: Sequence[int] = DEFAULT_LEVELS, max_tokens: int = 256
) -> list[ThroughputSample]:
    """Measure each concurrency level in turn, after one warm-up request."""
    await measure_sample(base_url, model, 1, max_tokens=8, n_requests=1)
    return [await measure_sample(base_url, model, c, max_tokens) for c in levels]


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the throughput curve of one server."""
    parser = argparse.ArgumentParser(description="output-token throughput vs concurrency")
    parser.add_argument("--base-url", default="http://127.0.0.1:18002/v1")
    parser.add_argument("--model", default="tiny-coder")
    parser.add_argument("--levels", default=",".join(map(str, DEFAULT_LEVELS)))
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    for s in asyncio.run(sweep(args.base_url, args.model, levels, args.max_tokens)):
        print(
            f"concurrency {s.concurrency:3d}: {s.tokens_per_s:7.0f} tok/s"
            f" ({s.n_requests} requests, {s.output_tokens} tokens, {s.wall_s:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
