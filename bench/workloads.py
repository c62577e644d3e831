"""Benchmark workloads: sessions, files per session, arrivals, and the token spec.

Token spec (documented, seeded): every session asks for M files named in its request, so the
planner's plan (and every coder's shared prompt prefix) grows with M. Output lengths are
capped per stage with the workload's `TokenSpec.max_tokens`; the emulator draws each answer's
length uniformly in [min_output_frac, 1] x max_tokens, seeded by the request's messages, so a
workload gives the same token counts on every run and under every policy. `min_output_frac`
is the profile's unless the workload's spec sets one (it then applies to both servers).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

# Output token caps per stage (the planner and reviewer think before they answer).
STAGE_MAX_TOKENS: dict[str, int] = {"plan": 2048, "code": 1024, "review": 1536}


@dataclass(frozen=True)
class TokenSpec:
    """How long a workload's answers are.

    Attributes:
        max_tokens: Output token cap per stage ("plan", "code", "review"), sent as max_tokens.
        min_output_frac: Lower end of the output-length draw, as a fraction of the cap; None
            keeps each emulator profile's own.
    """

    max_tokens: dict[str, int] = field(default_factory=lambda: dict(STAGE_MAX_TOKENS))
    min_output_frac: float | None = None

    def __post_init__(self) -> None:
        if set(self.max_tokens) != set(STAGE_MAX_TOKENS):
            raise ValueError(f"token spec needs max_tokens for {sorted(STAGE_MAX_TOKENS)}")
        if self.min_output_frac is not None and not 0.0 < self.min_output_frac <= 1.0:
            raise ValueError("min_output_frac must be in (0, 1]")


# seed-calibrated's spec: `python -m bench.fit_seed` fits it so that seed-current on the
# default profiles reproduces the user's "current" row (plan 10 s, coding 40 s, review 15 s).
SEED_CALIBRATED_TOKENS = TokenSpec(max_tokens={"plan": 805, "code": 1692, "review": 780})

# agentic-long: R1-length plans. The reasoning profile spends 60% of an answer thinking, so a
# plan cap of 13,334 tokens drawn in [0.375, 1] gives 3,000-8,000 thinking tokens.
AGENTIC_LONG_TOKENS = TokenSpec(
    max_tokens={"plan": 13334, "code": 2048, "review": 6144}, min_output_frac=0.375
)


@dataclass(frozen=True)
class Workload:
    """`sessions` sessions of `tasks` files each, arriving over `arrival_spread_s` seconds.

    Attributes:
        keep_name_on_override: A named workload that stays itself (name and token spec) when
            `--sessions`, `--tasks` or `--arrival-spread-s` are given; others become "adhoc".
        overrides: The command-line overrides applied to it (recorded in the report).
    """

    name: str
    sessions: int
    tasks: int
    arrival_spread_s: float = 0.0
    seed: int = 0
    tokens: TokenSpec = field(default_factory=TokenSpec)
    keep_name_on_override: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def max_tokens(self) -> dict[str, int]:
        """Output token cap per stage."""
        return self.tokens.max_tokens

    def arrivals_s(self) -> list[float]:
        """Arrival offset of each session (sorted; the first at 0), seeded."""
        if self.sessions <= 1 or self.arrival_spread_s <= 0:
            return [0.0] * self.sessions
        rng = random.Random(f"{self.name}:{self.seed}")
        offsets = sorted(rng.uniform(0, self.arrival_spread_s) for _ in range(self.sessions - 1))
        return [0.0, *offsets]

    def request(self, index: int) -> str:
        """The request text of session `index`: the seed's 'Create file_i.py' tasks."""
        names = ", ".join(f"s{index:02d}/file_{i}.py" for i in range(self.tasks))
        return (
            f"Session {index}: create a Python package of {self.tasks} simple modules. "
            f"Each module defines one small, documented function. Files: {names}."
        )

    def session_id(self, index: int) -> str:
        """Deterministic session ids, so two runs produce identical JSON."""
        return f"{self.name}-{index:02d}"


WORKLOADS: dict[str, Workload] = {
    "seed-single": Workload("seed-single", sessions=1, tasks=20),
    "seed-multi": Workload("seed-multi", sessions=3, tasks=20),
    "heavy": Workload("heavy", sessions=16, tasks=25, arrival_spread_s=120.0),
    "seed-calibrated": Workload(
        "seed-calibrated", sessions=1, tasks=20, tokens=SEED_CALIBRATED_TOKENS
    ),
    # The seed's three-session rows (195 -> 123 -> 70 s): three of seed-calibrated at t = 0.
    "seed-calibrated-multi": Workload(
        "seed-calibrated-multi", sessions=3, tasks=20, tokens=SEED_CALIBRATED_TOKENS
    ),
    "agentic-long": Workload(
        "agentic-long",
        sessions=16,
        tasks=12,
        arrival_spread_s=60.0,
        tokens=AGENTIC_LONG_TOKENS,
        keep_name_on_override=True,
    ),
}


def get_workload(
    name: str | None,
    *,
    sessions: int | None = None,
    tasks: int | None = None,
    arrival_spread_s: float | None = None,
    seed: int = 0,
) -> Workload:
    """A named workload, or an ad hoc one when `sessions`/`tasks` are given.

    Overrides turn a named workload into "adhoc" with the default token spec, except for
    workloads with `keep_name_on_override` (agentic-long), which keep their name and spec and
    record the overrides.

    Raises:
        ValueError: an unknown name.
    """
    if name and name not in WORKLOADS and name != "adhoc":
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)} or adhoc")
    base = WORKLOADS.get(name or "", Workload("adhoc", sessions=1, tasks=10))
    given = {"sessions": sessions, "tasks": tasks, "arrival_spread_s": arrival_spread_s}
    overrides = {k: v for k, v in given.items() if v is not None}
    keep = base.keep_name_on_override or not overrides
    return Workload(
        name=base.name if keep else "adhoc",
        sessions=sessions if sessions is not None else base.sessions,
        tasks=tasks if tasks is not None else base.tasks,
        arrival_spread_s=arrival_spread_s
        if arrival_spread_s is not None
        else base.arrival_spread_s,
        seed=seed,
        tokens=base.tokens if keep else TokenSpec(),
        keep_name_on_override=base.keep_name_on_override,
        overrides=overrides if base.keep_name_on_override else {},
    )
