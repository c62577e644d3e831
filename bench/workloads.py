"""Benchmark workloads: sessions, files per session, arrivals, and the token spec.

Token spec (documented, seeded): every session asks for M files named in its request, so the
planner's plan (and every coder's shared prompt prefix) grows with M. Output lengths are
capped per stage with `max_tokens` below; the emulator draws each answer's length uniformly in
[min_output_frac, 1] x max_tokens of its profile, seeded by the request's messages, so a
workload gives the same token counts on every run and under every policy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Output token caps per stage (the planner and reviewer think before they answer).
STAGE_MAX_TOKENS: dict[str, int] = {"plan": 2048, "code": 1024, "review": 1536}


@dataclass(frozen=True)
class Workload:
    """`sessions` sessions of `tasks` files each, arriving over `arrival_spread_s` seconds."""

    name: str
    sessions: int
    tasks: int
    arrival_spread_s: float = 0.0
    seed: int = 0
    max_tokens: dict[str, int] = field(default_factory=lambda: dict(STAGE_MAX_TOKENS))

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
}


def get_workload(
    name: str | None,
    *,
    sessions: int | None = None,
    tasks: int | None = None,
    arrival_spread_s: float | None = None,
    seed: int = 0,
) -> Workload:
    """A named workload, or an ad hoc one when `sessions`/`tasks` are given."""
    if name and name not in WORKLOADS and name != "adhoc":
        raise ValueError(f"unknown workload {name!r}; known: {sorted(WORKLOADS)} or adhoc")
    base = WORKLOADS.get(name or "", Workload("adhoc", sessions=1, tasks=10))
    adhoc = sessions is not None or tasks is not None or arrival_spread_s is not None
    return Workload(
        name="adhoc" if adhoc else base.name,
        sessions=sessions if sessions is not None else base.sessions,
        tasks=tasks if tasks is not None else base.tasks,
        arrival_spread_s=arrival_spread_s
        if arrival_spread_s is not None
        else base.arrival_spread_s,
        seed=seed,
    )
