"""A worker process for the shared-admission tests: `python -m tests.integration.admission_worker`.

`calls` mode runs sessions through a `SharedAdmission` and counts, in a Redis key shared by
all workers, how many calls hold a slot at once; it prints one JSON line with the most it
saw and how many calls it made. `hold` mode takes one slot, prints "held" and sleeps: the
test kills it to see the slot come back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import redis.asyncio as aioredis

from routing.admission import Outcome
from routing.limits import FixedLimit
from routing.shared_admission import SharedAdmission

PROBE_KEY = "test:in_flight_probe"


async def _calls(args: argparse.Namespace) -> None:
    probe = aioredis.from_url(args.url)
    most = 0
    done = 0

    async def session(admission: SharedAdmission, session_id: str) -> None:
        nonlocal most, done
        for _ in range(args.calls):
            slot = await admission.acquire(session_id)
            try:
                most = max(most, int(await probe.incr(PROBE_KEY)))
                await asyncio.sleep(random.uniform(0, 2 * args.hold_s))
                await probe.decr(PROBE_KEY)
            finally:
                slot.release(Outcome("ok"))
            done += 1

    async with SharedAdmission(
        args.name, FixedLimit(args.limit), url=args.url, lease_ttl_s=args.ttl_s
    ) as admission:
        print("ready", flush=True)
        await asyncio.sleep(args.start_delay_s)
        await asyncio.gather(
            *(session(admission, f"{args.tag}-s{i}") for i in range(args.sessions))
        )
    await probe.aclose()
    print(json.dumps({"max_in_flight": most, "calls": done}), flush=True)


async def _hold(args: argparse.Namespace) -> None:
    admission = SharedAdmission(
        args.name, FixedLimit(args.limit), url=args.url, lease_ttl_s=args.ttl_s
    )
    await admission.start()
    await admission.acquire(f"{args.tag}-held")
    print("held", flush=True)
    await asyncio.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["calls", "hold"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", default="coder@gpu0")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--ttl-s", type=float, default=2.0)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--hold-s", type=float, default=0.01)
    parser.add_argument("--start-delay-s", type=float, default=0.0)
    parser.add_argument("--tag", default="w")
    args = parser.parse_args()
    asyncio.run(_calls(args) if args.mode == "calls" else _hold(args))


if __name__ == "__main__":
    main()
