"""The default bound on one call lets long reasoning answers finish when they queue in vLLM."""

from __future__ import annotations

import asyncio

from langchain_core.messages import HumanMessage

from bench.workloads import AGENTIC_LONG_TOKENS
from graph.runtime import build_runtime
from graph.settings import Settings
from serving.clock import run

CALLS = 32  # agentic-long's 16 sessions, each with a plan or two review chunks in flight


def test_r1_length_answers_that_wait_in_a_full_server_are_not_cut() -> None:
    # agentic-long with everything admitted (fixed-32 and up): the reasoning server's cache
    # holds a few of these answers at a time, the rest wait in its queue or are preempted,
    # and the last ends past 600 s. The old 600 s default cut them, and each was sent again.
    settings = Settings.model_construct()
    plan_cap = AGENTIC_LONG_TOKENS.max_tokens["plan"]

    async def main() -> tuple[list[float], list[int], int]:
        runtime = build_runtime(settings, limit="unlimited")
        loop = asyncio.get_running_loop()
        model = runtime.models.for_role("reasoning").bind(max_tokens=plan_cap)

        async def one(i: int) -> tuple[float, int]:
            started = loop.time()
            answer = await model.ainvoke([HumanMessage(f"Plan project {i}; think it through.")])
            usage = answer.usage_metadata
            assert usage is not None
            return loop.time() - started, usage["output_tokens"]

        try:
            done = await asyncio.gather(*(one(i) for i in range(CALLS)))
        finally:
            await runtime.aclose()
        records = runtime.emulators["reasoning"].state.engine.records
        return [t for t, _ in done], [n for _, n in done], len(records)

    took, tokens, requests = run(main(), virtual=True)
    assert max(took) > 600.0  # the case the old bound cut
    assert max(took) < settings.request_timeout_s
    assert requests == CALLS  # none was cut and sent again
    assert min(tokens) > 0
