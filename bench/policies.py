"""Benchmark policies: how sessions, fan-out and admission are configured. Each one runs the
real graph and routing code; only their settings differ."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from routing.fanout import FanoutPolicy
from routing.limits import make_limit

# The user's upper bound on a run's fan-out where the router decides (TANDEM_MAX_PARALLEL_AGENTS).
ROUTED_FANOUT_CAP = 256
# `fixed-N+coder`: where review runs under a fixed limit (reasoning without a suffix).
_REVIEW_SUFFIXES = ("reasoning", "coder", "auto")


@dataclass(frozen=True)
class Policy:
    """One configuration of the workflow and the routing layer.

    Attributes:
        name: As given on the command line.
        fanout_kind: "fixed" (the seed's hard cap) or "seed" (calculate_optimal_parallel).
        fanout_cap: The per-session cap on coder agents in flight.
        review_on: Which model reviews.
        concurrent_sessions: False: sessions run one after another, as the seed's manager does.
        limit: The router's admission limit per GPU: unlimited, fixed-N or adaptive.
        order: The router's admission order: fifo or las.
        description: One line for the report.
        engine_priority: The server's scheduler is told each call's priority too (vLLM's
            per-request `priority`, with `--scheduling-policy priority`), so its own queue
            follows the router's order.
    """

    name: str
    fanout_kind: str
    fanout_cap: int
    review_on: str
    concurrent_sessions: bool
    limit: str
    order: str
    description: str
    engine_priority: bool = False

    def fanout(self) -> FanoutPolicy:
        """The per-session fan-out cap this policy gives each run."""
        return FanoutPolicy(kind=self.fanout_kind, max_parallel=self.fanout_cap)


def _routed(
    name: str,
    review_on: str,
    limit: str,
    order: str,
    description: str,
    *,
    engine_priority: bool = False,
) -> Policy:
    """A policy where the router decides: sessions concurrent, fan-out up to the user's bound."""
    return Policy(
        name, "seed", ROUTED_FANOUT_CAP, review_on, True, limit, order, description,
        engine_priority,
    )  # fmt: skip


# The user's system as the seed describes it, unchanged.
_SEED: dict[str, Policy] = {
    "seed-current": Policy(
        "seed-current", "fixed", 10, "coder", False, "unlimited", "fifo",
        "the seed's manager today: 10 coders per session, review on the coder GPU, "
        "sessions one after another",
    ),
    "seed-phase1": Policy(
        "seed-phase1", "fixed", 25, "coder", False, "unlimited", "fifo",
        "seed phase 1: 25 coders per session, sessions one after another",
    ),
    "seed-phase3": Policy(
        "seed-phase3", "seed", 25, "reasoning", True, "fixed-25", "fifo",
        "seed phase 3: calculate_optimal_parallel, review on GPU 0, sessions "
        "concurrent behind per-GPU FIFO queues of 25",
    ),
}  # fmt: skip

# Adaptive limit per GPU: name -> (review_on, order, engine_priority, description).
_ADAPTIVE: dict[str, tuple[str, str, bool, str]] = {
    "adaptive": (
        "reasoning", "las", True,
        "adaptive limit, LAS order, engine priority, review on the reasoning model",
    ),
    "adaptive+auto": (
        "auto", "las", True,
        "adaptive limit, LAS order, engine priority, review on the reasoning model unless "
        "it is past the delay budget and the coder would finish sooner",
    ),
    "adaptive-fifo": (
        "reasoning", "fifo", False,
        "adaptive limit, FIFO order, no engine priority, review on the reasoning model",
    ),
    "adaptive-nopriority": (
        "reasoning", "las", False,
        "adaptive limit, LAS order at the router only, review on the reasoning model",
    ),
    "adaptive-oldest": (
        "reasoning", "oldest", False,
        "adaptive limit, the oldest session first, no engine priority, review on the "
        "reasoning model",
    ),
}  # fmt: skip
# Earlier names that scripts and committed results use: name -> the policy it stands for.
ALIASES = {"adaptive-reasoning": "adaptive"}

POLICY_NAMES = (
    "seed-current, seed-phase1, seed-phase3, fixed-N, fixed-N+coder, fixed-N+auto, adaptive, "
    "adaptive+auto, adaptive-fifo, adaptive-nopriority, adaptive-oldest (adaptive-reasoning: "
    "alias of adaptive)"
)


def get_policy(name: str) -> Policy:
    """Parse a policy name.

    seed-current, seed-phase1, seed-phase3: the user's system, unchanged. fixed-N: admission
    fixed at N per GPU, LAS order, no engine priority (the limit is the one thing a sweep
    varies), review on reasoning; fixed-N+coder, fixed-N+auto the same with review on the
    coder or placed by the guard. adaptive: adaptive limit, LAS, engine priority, review on
    reasoning; adaptive+auto the same with guarded auto placement; adaptive-fifo: FIFO, no
    engine priority; adaptive-nopriority: LAS at the router only; adaptive-oldest: the
    oldest session first, no engine priority. adaptive-reasoning is an alias of adaptive,
    keeping the name it was asked by.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if name in _SEED:
        return _SEED[name]
    if name in ALIASES:
        return dataclasses.replace(get_policy(ALIASES[name]), name=name)
    if name in _ADAPTIVE:
        review_on, order, priority, description = _ADAPTIVE[name]
        return _routed(name, review_on, "adaptive", order, description, engine_priority=priority)
    limit, plus, review_on = name.partition("+")
    if limit.startswith("fixed-") and (review_on in _REVIEW_SUFFIXES or not plus):
        n = make_limit(limit).limit  # a bad N fails here, naming the limit forms
        review_on = review_on or "reasoning"
        return _routed(
            name, review_on, limit, "las",
            f"router admission fixed at {n} per GPU, LAS order, review on {review_on}",
        )  # fmt: skip
    raise ValueError(f"unknown policy {name!r}: {POLICY_NAMES}")


SWEEP = [4, 8, 16, 32, 64, 128, 256]
