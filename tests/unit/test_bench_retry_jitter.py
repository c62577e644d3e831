"""A benchmark run's retry back-offs come from a source seeded by its workload, so that a
run on the virtual clock repeats exactly in any process."""

from __future__ import annotations

import random
from typing import Any

import pytest

import bench.runner as runner
from bench.policies import get_policy
from bench.workloads import get_workload
from graph.runtime import build_runtime
from graph.settings import Settings
from serving.clock import run as run_clock


def _draws(workload_name: str, seed: int, n: int = 8) -> list[float]:
    draw = runner.retry_jitter(get_workload(workload_name, seed=seed))
    return [draw() for _ in range(n)]


def test_the_jitter_repeats_for_a_workload_and_seed_whatever_the_process_random_did() -> None:
    random.seed(1)
    first = _draws("seed-multi", 0)
    random.seed(2)
    random.random()
    assert _draws("seed-multi", 0) == first
    assert all(0.0 <= d < 1.0 for d in first)
    assert _draws("seed-multi", 1) != first
    assert _draws("heavy", 0) != first


def test_build_runtime_gives_the_jitter_to_the_call_retry() -> None:
    settings = Settings.model_construct()
    draws = iter([0.5, 0.25])
    runtime = build_runtime(settings, retry_jitter=lambda: next(draws))
    retry = runtime.models.call_retry
    assert retry.backoff_s(1) == 0.5 * settings.retry_base_s
    assert retry.backoff_s(2) == 0.25 * 2 * settings.retry_base_s
    # Without one, a deployment keeps the process's random source: clients spread apart.
    assert build_runtime(settings).models.call_retry.random is random.random


def test_a_bench_run_builds_its_runtime_with_the_workloads_jitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def capture(*args: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(runner, "build_runtime", capture)
    workload = get_workload("seed-multi", seed=2)

    async def main() -> None:
        await runner.run_policy_emulated(
            workload,
            get_policy("fixed-8"),
            profiles={"reasoning": "h100-nvl-reasoning-32b", "coder": "h100-nvl-coder-8b"},
            seed=2,
        )

    with pytest.raises(Stop):
        run_clock(main(), virtual=True)
    jitter = seen["retry_jitter"]
    assert [jitter() for _ in range(4)] == _draws("seed-multi", 2, 4)
