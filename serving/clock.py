"""The one clock: the running event loop's time, real or virtual (looptime)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import looptime

T = TypeVar("T")

# Idle loop passes looptime makes before it moves the clock to the next timer. Idle passes
# only give threads and sockets a chance to add work; executor work runs inline here
# (`InlineExecutor`) and a virtual run has no sockets, so one pass is enough. Each pass is
# a full loop iteration, and the clock moves at every engine step.
NOOP_CYCLES = 1


def now() -> float:
    """Seconds on the running loop's clock (virtual under `run(..., virtual=True)`)."""
    return asyncio.get_running_loop().time()


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs submitted work at once, in the calling thread.

    On a virtual clock, work handed to a thread pool (libraries call `run_in_executor` for
    small blocking helpers) would let the loop jump ahead in time while the thread runs,
    and the result would depend on the machine's speed. Inline, it takes no virtual time.
    """

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def run(main: Coroutine[Any, Any, T], *, virtual: bool = False) -> T:
    """Run `main` to completion on a fresh loop.

    With `virtual=True` the loop's clock jumps straight to the next timer when nothing is
    ready, so minutes of emulated GPU time pass in seconds and every run gives the same times.
    """
    if not virtual:
        return asyncio.run(main)
    loop = looptime.new_event_loop(start=0.0, noop_cycles=NOOP_CYCLES)
    loop.set_default_executor(InlineExecutor())
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
