"""Faults between Tandem and its servers cost seconds, not whole calls.

Two emulated vLLM servers (`tandem emulate`, real clock, H100 profiles) behind fault-injecting
proxies. The same workload (6 sessions x 8 files) runs twice, each time on fresh servers: once
with the proxies forwarding everything, once with 5% 503, 2% 500, 1% hung and 1% cut model
calls. Every session must end ok with every file, and the fault run may take at most 1.3x the
fault-free run's wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.services import free_port
from graph.graph import build_graph
from graph.runtime import build_runtime
from graph.sessions import SessionResult, run_many
from graph.settings import Settings
from nodes.context import ServerOptions
from routing.calls import ROLES, Role
from routing.endpoints import Replica
from routing.fanout import FanoutPolicy
from routing.router import Router
from serving.emulator.app import create_app
from serving.emulator.transport import InProcessTransport
from tests.fault_proxy import FaultMix, FaultProxy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROFILES: dict[Role, str] = {"reasoning": "h100-nvl-reasoning-32b", "coder": "h100-nvl-coder-8b"}
MODELS: dict[Role, str] = {"reasoning": "tandem-reasoning", "coder": "tandem-coder"}
# Output caps that make the fault-free run take about half a minute on the emulated H100s.
CAPS = {"plan": 512, "code": 256, "review": 256}
SESSIONS = 6
FILES = [f"pkg/m{i}.py" for i in range(8)]
REQUEST = "Create " + ", ".join(FILES) + ": a small package of helper modules."
ISSUE_MIX = FaultMix(error_503=0.05, error_500=0.02, hang=0.01, cut=0.01)
# Seeds under which each proxy's first draws include a hang and a cut, so that both are met.
SEEDS: dict[Role, int] = {"reasoning": 7, "coder": 30}
# The defaults (60 s) are sized for real GPUs, whose queues can hold a healthy call that long
# before its first token. These emulated servers answer within a fraction of a second, so
# bounds of a few seconds still leave a wide margin and a hang costs what it would cost
# against a real server measured against its own TTFT.
TIMEOUTS = {"first_token_timeout_s": 2.0, "stream_idle_timeout_s": 2.0, "connect_timeout_s": 2.0}


@dataclass
class Run:
    """One run of the workload: its wall time, sessions and the faults the proxies injected."""

    wall_s: float
    results: list[SessionResult]
    fates: Counter[str]


@contextlib.asynccontextmanager
async def emulated_servers() -> AsyncIterator[dict[Role, str]]:
    """`tandem emulate` for both roles on free loopback ports; base URLs without /v1."""
    ports = {role: free_port() for role in ROLES}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli",
            "emulate",
            "--profile",
            PROFILES[role],
            "--port",
            str(ports[role]),
            "--served-model-name",
            MODELS[role],
            "--log-level",
            "warning",
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for role in ROLES
    ]
    urls = {role: f"http://127.0.0.1:{ports[role]}" for role in ROLES}
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            for role, url in urls.items():
                for _ in range(300):
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{url}/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"emulated {role} server did not start on {url}")
        yield urls
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), timeout=10)


async def run_workload(workspace: Path, mix: FaultMix) -> Run:
    """The workload on fresh emulated servers, each behind a proxy injecting `mix`."""
    async with emulated_servers() as upstream:
        proxies = {role: FaultProxy(upstream[role], mix, seed=SEEDS[role]) for role in ROLES}
        for proxy in proxies.values():
            await proxy.start()
        settings = Settings(
            reasoning_url=f"{proxies['reasoning'].base_url}/v1",
            coder_url=f"{proxies['coder'].base_url}/v1",
            workspace=workspace,
            **TIMEOUTS,  # type: ignore[arg-type]
        )
        runtime = build_runtime(settings)
        try:
            assert await runtime.preflight() == []
            context = settings.run_context().merged({"max_tokens": CAPS})
            fanout = FanoutPolicy(max_parallel=context.max_parallel_agents)
            async with runtime.router:
                graph = build_graph(
                    runtime.models,
                    defaults=context,
                    options=ServerOptions(workspace=workspace),
                    fanout=fanout,
                )
                loop = asyncio.get_running_loop()
                started = loop.time()
                results = await run_many(
                    graph,
                    [(f"s{i}", REQUEST) for i in range(SESSIONS)],
                    context=context,
                    fanout=fanout,
                    workspace=workspace,
                )
                wall_s = loop.time() - started
                in_flight = [s["in_flight"] for s in runtime.router.stats().values()]
        finally:
            await runtime.aclose()
            for proxy in proxies.values():
                await proxy.stop()
    assert in_flight == [0] * len(in_flight), "a slot was not given back"
    fates = sum((proxy.fates for proxy in proxies.values()), Counter())
    return Run(wall_s, results, fates)


def _all_ok(run: Run) -> list[str]:
    """What is wrong with a run's sessions (empty when each is ok with every file)."""
    return [
        f"{r.session_id}: {r.status}, {r.files_ok}/{len(FILES)} files {r.error}"
        for r in run.results
        if r.status != "ok" or r.files_ok != len(FILES)
    ]


async def test_a_fault_mix_costs_at_most_a_third_more_wall_time(tmp_path: Path) -> None:
    clean = await run_workload(tmp_path / "clean", FaultMix())
    faulty = await run_workload(tmp_path / "faulty", ISSUE_MIX)
    ratio = faulty.wall_s / clean.wall_s
    injected = {fate: n for fate, n in faulty.fates.items() if fate != "pass"}
    print(
        f"\nfault-free {clean.wall_s:.1f} s, fault mix {faulty.wall_s:.1f} s: ratio {ratio:.2f}"
        f" (injected {injected} among {sum(faulty.fates.values())} requests)"
    )
    assert _all_ok(clean) == [] and _all_ok(faulty) == []
    assert clean.fates.keys() == {"pass"}
    assert {"503", "500", "hang", "cut"} <= injected.keys(), "the mix did not meet every fault"
    assert ratio <= 1.3, f"fault run took {ratio:.2f}x the fault-free run"


async def test_preflight_names_a_closed_port_and_a_wrong_model() -> None:
    closed = free_port()
    app = create_app("cpu-tiny", served_model_name="tiny")
    async with emulated_servers() as upstream:
        router = Router(
            {
                "reasoning": [Replica(f"http://127.0.0.1:{closed}/v1", "tiny", "gpu0")],
                "coder": [
                    Replica(f"{upstream['coder']}/v1", "qwen", "gpu1"),
                    Replica("http://in-process/v1", "tiny", "gpu2", InProcessTransport(app)),
                ],
            },
            connect_timeout_s=2.0,
        )
        problems = await router.preflight()
        await router.aclose()
    assert len(problems) == 2
    assert problems[0].startswith(f"reasoning at http://127.0.0.1:{closed}/v1: does not answer")
    assert problems[1] == (
        f"coder at {upstream['coder']}/v1: model 'qwen' is not served (served: 'tandem-coder')"
    )
