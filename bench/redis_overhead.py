"""What Redis admission adds to each call: `python -m bench.redis_overhead --url redis://...`.

Run by hand against a loopback Redis (not part of `make test`), e.g.

    redis-server --port 6399 --save '' --appendonly no --daemonize yes
    python -m bench.redis_overhead --url redis://127.0.0.1:6399/0

`--sessions` sessions (1,000 by default) run at once; each makes `--calls` calls that hold
their slot `--hold-ms` (a stand-in for the LLM call). With the limit at the number of
sessions nobody queues, so the time `acquire` takes is the admission's own overhead. Reported
per call: `acquire` latency percentiles (on the call's path), this process's CPU time for
acquire plus release (release runs off the call's path), the scripts sent per call (calls
made in the same round trip share one) and Redis's own time per call (INFO commandstats).

The event loop's own latency is measured beside: a probe that sleeps 1 ms at a time records
how late it wakes while the sessions run. An `acquire` that waits on Redis wakes no sooner
than the loop gets round to it, so the lag is the part of its latency that no admission
could avoid in this process. `--baseline` runs the same load through the in-process
`Admission`, whose `acquire` never yields when a slot is free: its loop lag is the load's own.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import statistics
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from routing.admission import Admission, Outcome
from routing.limits import FixedLimit
from routing.shared_admission import SharedAdmission


@dataclass(frozen=True)
class OverheadResult:
    """One run's figures, in microseconds per call."""

    label: str
    calls: int
    acquire_p50_us: float
    acquire_p99_us: float
    acquire_max_us: float
    loop_lag_p50_us: float
    loop_lag_p99_us: float
    client_cpu_us: float
    scripts_per_call: float | None
    redis_us: float | None


async def _probe_lag(lags: list[float], period_s: float = 0.001) -> None:
    """Sleep `period_s` at a time until cancelled; record how late each wake-up is."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + period_s
        await asyncio.sleep(period_s)
        lags.append(loop.time() - due)


async def _drive(
    admission: Admission, sessions: int, calls: int, hold_s: float
) -> tuple[list[float], list[float]]:
    waits: list[float] = []
    lags: list[float] = []
    rng = random.Random(0)

    async def session(session_id: str) -> None:
        # Staggered starts and jittered holds: calls arrive spread out, as sessions do,
        # rather than in one burst of `sessions` acquires at the same instant.
        await asyncio.sleep(rng.uniform(0, hold_s))
        for _ in range(calls):
            started = time.perf_counter()
            slot = await admission.acquire(session_id)
            waits.append(time.perf_counter() - started)
            await asyncio.sleep(hold_s * rng.uniform(0.5, 1.5))
            slot.release(Outcome("ok"))

    probe = asyncio.create_task(_probe_lag(lags))
    try:
        await asyncio.gather(*(session(f"s{i}") for i in range(sessions)))
    finally:
        probe.cancel()
    return waits, lags


async def _redis_script_us(url: str) -> tuple[int, float]:
    client = aioredis.from_url(url, decode_responses=True)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    calls = 0
    usec = 0.0
    for name in ("cmdstat_evalsha", "cmdstat_eval"):
        entry = stats.get(name)
        if isinstance(entry, dict):
            calls += int(entry["calls"])
            usec += float(entry["usec"])
    return calls, usec


async def measure(
    url: str | None, *, sessions: int, calls: int, hold_s: float, limit: int
) -> OverheadResult:
    """Run the load once through a shared admission (`url`) or the in-process one (None)."""
    if url is None:
        admission: Admission = Admission("bench", FixedLimit(limit))
    else:
        admission = SharedAdmission(
            "bench", FixedLimit(limit), url=url, key_prefix=f"bench:{time.time_ns()}"
        )
        await admission.start()
        scripts_before = await _redis_script_us(url)
    cpu_before = time.process_time()
    waits, lags = await _drive(admission, sessions, calls, hold_s)
    total = len(waits)
    redis_us: float | None = None
    scripts_per_call: float | None = None
    if isinstance(admission, SharedAdmission):
        await admission.aclose()  # waits for the last releases
        scripts_after = await _redis_script_us(url or "")
        # The tick's scripts are in these counts too: they are part of the cost.
        scripts_per_call = (scripts_after[0] - scripts_before[0]) / total
        redis_us = (scripts_after[1] - scripts_before[1]) / total
    cpu_s = time.process_time() - cpu_before
    quantiles = statistics.quantiles(waits, n=100)
    lag_quantiles = statistics.quantiles(lags, n=100)
    return OverheadResult(
        label="redis" if url is not None else "in-process",
        calls=total,
        acquire_p50_us=statistics.median(waits) * 1e6,
        acquire_p99_us=quantiles[98] * 1e6,
        acquire_max_us=max(waits) * 1e6,
        loop_lag_p50_us=statistics.median(lags) * 1e6,
        loop_lag_p99_us=lag_quantiles[98] * 1e6,
        client_cpu_us=cpu_s / total * 1e6,
        scripts_per_call=scripts_per_call,
        redis_us=redis_us,
    )


def main() -> None:
    """Parse arguments, run, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=5, help="calls per session")
    parser.add_argument("--hold-ms", type=float, default=500.0, help="how long a call holds")
    parser.add_argument("--limit", type=int, help="shared limit (default: --sessions)")
    parser.add_argument("--baseline", action="store_true", help="also run in-process Admission")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the Redis pass under cProfile (slower) and print redis-py's, the socket's "
        "and wait_for's share of it",
    )
    args = parser.parse_args()
    limit = args.limit or args.sessions
    runs: list[str | None] = [args.url] + ([None] if args.baseline else [])
    profiler = cProfile.Profile() if args.profile else None
    results = []
    for url in runs:
        if profiler is not None and url is not None:
            profiler.enable()
        results.append(
            asyncio.run(
                measure(
                    url,
                    sessions=args.sessions,
                    calls=args.calls,
                    hold_s=args.hold_ms / 1000,
                    limit=limit,
                )
            )
        )
        if profiler is not None:
            profiler.disable()
    if profiler is not None:
        stats = pstats.Stats(profiler).sort_stats("cumulative")
        # Cumulative seconds over the whole run: divide by the calls for a share per call.
        where = r"redis/asyncio/connection\.py|redis/_parsers|_socket|tasks\.py.*wait_for"
        stats.print_stats(where, 30)
    table = Table(
        title=f"admission overhead per call: {args.sessions} sessions x {args.calls} calls, "
        f"hold {args.hold_ms:g} ms, limit {limit}"
    )
    for column in (
        "admission",
        "calls",
        "acquire p50 µs",
        "acquire p99 µs",
        "acquire max µs",
        "loop lag p50 µs",
        "loop lag p99 µs",
        "client CPU µs per call",
        "scripts per call",
        "Redis µs per call",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.label,
            str(r.calls),
            f"{r.acquire_p50_us:.0f}",
            f"{r.acquire_p99_us:.0f}",
            f"{r.acquire_max_us:.0f}",
            f"{r.loop_lag_p50_us:.0f}",
            f"{r.loop_lag_p99_us:.0f}",
            f"{r.client_cpu_us:.0f}",
            "-" if r.scripts_per_call is None else f"{r.scripts_per_call:.2f}",
            "-" if r.redis_us is None else f"{r.redis_us:.1f}",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
