"""Per-run fan-out caps: how many coder agents of one session may run at once.

This bounds a single graph run (LangGraph's top-level `max_concurrency`); admission across
runs is the job of `routing.admission`.
"""

from __future__ import annotations

from dataclasses import dataclass


def calculate_optimal_parallel(task_count: int, max_parallel: int = 25) -> int:
    """The seed's step function: all at once up to 10 tasks, then at most `max_parallel`.

    Args:
        task_count: Files to write in this round.
        max_parallel: The user's upper bound (`TANDEM_MAX_PARALLEL_AGENTS`).

    Returns:
        The number of coder agents this run may have in flight, at least 1.
    """
    if task_count <= 0:
        return 1
    if task_count <= 10:
        return task_count
    return max(1, min(task_count, max_parallel))


@dataclass(frozen=True)
class FanoutPolicy:
    """Chooses a run's `max_concurrency` from its task count.

    `kind` is "seed" (the seed's step function capped by `max_parallel`) or "fixed"
    (always `max_parallel`, the seed's original hard-coded cap).
    """

    kind: str = "seed"
    max_parallel: int = 25

    def max_concurrency(self, task_count: int) -> int:
        """The cap for a round of `task_count` coder tasks."""
        if self.kind == "fixed":
            return max(1, self.max_parallel)
        return calculate_optimal_parallel(task_count, self.max_parallel)
