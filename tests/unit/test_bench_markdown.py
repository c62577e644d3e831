"""README tables from benchmark reports (bench/markdown.py)."""

from __future__ import annotations

from typing import Any

from bench.markdown import table


def _result(policy: str, review_on: str, makespan: float, share: float | None = None) -> Any:
    spread = {"mean": makespan, "min": makespan - 1, "max": makespan + 2}
    return {
        "policy": policy,
        "review_on": review_on,
        "makespan_s": makespan,
        "efficiency": 50.0 / makespan,
        "session_latency_mean_s": makespan / 2,
        "session_latency_p95_s": makespan,
        "spread": {
            "makespan_s": spread,
            "session_latency_mean_s": {k: v / 2 for k, v in spread.items()},
            "session_latency_p95_s": spread,
        },
        "gpu_busy": {"reasoning": 0.5, "coder": 0.25},
        "gpu_saturation": {"reasoning": 0.1, "coder": 0.05},
        "preemptions": 3,
        "review_share": None if share is None else {"reasoning": 1 - share, "coder": share},
    }


def test_groups_by_placement_with_ratios_against_each_groups_first() -> None:
    report = {
        "workload": "w",
        "sessions": 2,
        "tasks_per_session": 3,
        "seeds": [0, 1],
        "lower_bound_s": 50.0,
        "results": [
            _result("fixed-4", "reasoning", 200.0),
            _result("adaptive", "auto", 80.0, share=0.75),
            _result("fixed-16", "reasoning", 100.0),
        ],
    }
    lines = table(report).splitlines()
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| fixed-4", "| fixed-16", "| adaptive"]
    assert "2.00x" in rows[1] and "1.00x" in rows[2]
    assert "auto (75% coder)" in rows[2]
    assert "200.0 (199.0-202.0)" in rows[0]
    assert "one lower bound for all policies: 50.0 s" in lines[0]
