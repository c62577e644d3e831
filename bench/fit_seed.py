"""Fit seed-calibrated's token spec to the user's "current" row: `python -m bench.fit_seed`.

The user's memo gives, for one session of 20 files on today's system (`seed-current`: 10
coders, review on the coder GPU): plan 10 s, coding 40 s, review 15 s, 65 s in all. This
searches the per-stage `max_tokens` caps so that `seed-current` on the default profiles
reproduces it on the virtual clock: within 5% overall and 10% per stage.

Each stage's time grows about linearly with its cap (one decode step per token, in waves of
at most 10 coders), so the search first scales each cap by target / measured a few times,
then tries each cap a little lower and higher while that helps (review verdicts depend on the
files' text, so a fix round can come or go with a cap). Seed 0, as `tandem bench` runs it by
default. The best spec seen is kept; `--write` puts it into bench/workloads.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cli import DEFAULT_PROFILES
from bench.policies import get_policy
from bench.runner import run_policy_emulated
from bench.workloads import WORKLOADS, TokenSpec, Workload
from routing.calls import Role

TARGET_S: dict[str, float] = {"plan": 10.0, "code": 40.0, "review": 15.0}
TARGET_TOTAL_S = 65.0
STAGE_TOLERANCE = 0.10
TOTAL_TOLERANCE = 0.05
MIN_TOKENS, MAX_TOKENS = 16, 30_000
WORKLOADS_FILE = Path(__file__).with_name("workloads.py")
_SPEC_LINE = re.compile(r"^SEED_CALIBRATED_TOKENS = TokenSpec\(.*\)$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run of seed-current with a token spec."""

    max_tokens: dict[str, int]
    stage_s: dict[str, float]
    makespan_s: float
    complete: bool = True  # the session ended ok with every file of the workload written

    def errors(self) -> dict[str, float]:
        """Relative error per stage and of the total ("total")."""
        out = {k: self.stage_s[k] / TARGET_S[k] - 1 for k in TARGET_S}
        out["total"] = self.makespan_s / TARGET_TOTAL_S - 1
        return out

    def fits(self) -> bool:
        """The session completed, within 10% per stage and 5% overall."""
        if not self.complete:
            return False
        errors = self.errors()
        return abs(errors.pop("total")) <= TOTAL_TOLERANCE and all(
            abs(e) <= STAGE_TOLERANCE for e in errors.values()
        )

    def score(self) -> float:
        """Worst error relative to its tolerance (at most 1: fits)."""
        return max(abs(e) / t for e, t in self._scaled())

    def objective(self) -> float:
        """What the search lowers: the total first, then the stages.

        Squared errors relative to their tolerances, the total's weighted 100x: a stage that
        cannot reach its target (a 20-file plan's JSON has a floor of several hundred tokens)
        must not pull the whole run away from the user's 65 s. A run that did not write every
        file (a plan cut at its cap, or answered again with fewer files) is no candidate.
        """
        if not self.complete:
            return math.inf
        scaled = self._scaled()
        total, tol = scaled[0]
        return 100 * (total / tol) ** 2 + sum((e / t) ** 2 for e, t in scaled[1:])

    def _scaled(self) -> list[tuple[float, float]]:
        errors = self.errors()
        total = errors.pop("total")
        return [(total, TOTAL_TOLERANCE), *((e, STAGE_TOLERANCE) for e in errors.values())]


def measure(max_tokens: dict[str, int], profiles: dict[Role, str], seed: int = 0) -> Trial:
    """Run seed-current on seed-calibrated with `max_tokens` on the virtual clock."""
    from serving.clock import run

    base = WORKLOADS["seed-calibrated"]
    tokens = dataclasses.replace(base.tokens, max_tokens=dict(max_tokens))
    workload: Workload = dataclasses.replace(base, tokens=tokens, seed=seed)
    policy_run = run(
        run_policy_emulated(workload, get_policy("seed-current"), profiles=profiles, seed=seed),
        virtual=True,
    )
    result: dict[str, Any] = policy_run.result()
    complete = result["sessions_failed"] == 0 and result["files_ok"] == base.tasks
    return Trial(dict(max_tokens), result["stage_s"], result["makespan_s"], complete)


def _clamp(tokens: float) -> int:
    return int(min(MAX_TOKENS, max(MIN_TOKENS, round(tokens))))


def next_caps(trial: Trial) -> dict[str, int]:
    """Each cap scaled by target / measured time of its stage."""
    return {
        stage: _clamp(cap * TARGET_S[stage] / max(trial.stage_s[stage], 1e-6))
        for stage, cap in trial.max_tokens.items()
    }


# Local search steps: each cap times these factors, one stage at a time.
_STEPS = (0.75, 0.9, 0.97, 1.03, 1.1, 1.33)


class _Search:
    """Memoised trials and the best one seen (lowest objective)."""

    def __init__(self, profiles: dict[Role, str], budget_runs: int, say: Any) -> None:
        self.profiles = profiles
        self.budget_runs = budget_runs
        self.say = say
        self.trials: dict[tuple[int, ...], Trial] = {}
        self.best: Trial | None = None

    @property
    def spent(self) -> bool:
        done = self.best is not None and self.best.fits()
        return done or len(self.trials) >= self.budget_runs

    def run(self, caps: dict[str, int]) -> Trial:
        key = tuple(caps[k] for k in TARGET_S)
        if key not in self.trials:
            trial = measure(caps, self.profiles)
            self.trials[key] = trial
            self.say(_line(len(self.trials), trial))
            if self.best is None or trial.objective() < self.best.objective():
                self.best = trial
        return self.trials[key]


def fit(
    start: dict[str, int], profiles: dict[Role, str], budget_runs: int, say: Any = print
) -> Trial:
    """Scale the caps by target / measured a few times, then search locally; the best trial.

    Review verdicts depend on the files' text, so a cap change can add or drop a fix round:
    stage times are not smooth in the caps, hence the local search after the scaling.
    """
    search = _Search(profiles, budget_runs, say)
    trial = search.run(dict(start))
    while not trial.complete and not search.spent:
        # The plan's JSON did not fit its cap (the emulator stops at max_tokens, as vLLM
        # does, and a 20-file plan has a floor of several hundred tokens): double it.
        trial = search.run({**trial.max_tokens, "plan": _clamp(2 * trial.max_tokens["plan"])})
    for _ in range(4):
        if search.spent:
            break
        trial = search.run(next_caps(trial))
        if not trial.complete:
            assert search.best is not None
            trial = search.best  # scale from the best run that completed
    improved = True
    while improved and not search.spent:
        improved = False
        for stage in TARGET_S:
            for factor in _STEPS:
                if search.spent:
                    break
                assert search.best is not None
                before = search.best
                caps = dict(before.max_tokens)
                caps[stage] = _clamp(caps[stage] * factor)
                search.run(caps)
                improved = improved or search.best is not before
    assert search.best is not None
    return search.best


def _line(index: int, trial: Trial) -> str:
    stages = "  ".join(
        f"{k} {trial.stage_s[k]:5.1f} s (cap {trial.max_tokens[k]:>5})" for k in TARGET_S
    )
    return f"round {index}: {stages}  total {trial.makespan_s:5.1f} s  score {trial.score():.2f}"


def spec_line(max_tokens: dict[str, int]) -> str:
    """The workloads.py line that holds the fitted spec."""
    caps = ", ".join(f'"{k}": {max_tokens[k]}' for k in TARGET_S)
    return f"SEED_CALIBRATED_TOKENS = TokenSpec(max_tokens={{{caps}}})"


def write_spec(max_tokens: dict[str, int], path: Path = WORKLOADS_FILE) -> None:
    """Replace the SEED_CALIBRATED_TOKENS line of bench/workloads.py."""
    text = path.read_text(encoding="utf-8")
    updated, count = _SPEC_LINE.subn(spec_line(max_tokens), text)
    if count != 1:
        raise RuntimeError(f"{path}: no single SEED_CALIBRATED_TOKENS line to replace")
    path.write_text(updated, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Fit, print the stage times and the spec; 0 if it fits the tolerances."""
    parser = argparse.ArgumentParser(prog="python -m bench.fit_seed", description=__doc__)
    parser.add_argument("--reasoning-profile", default=DEFAULT_PROFILES["reasoning"])
    parser.add_argument("--coder-profile", default=DEFAULT_PROFILES["coder"])
    parser.add_argument("--runs", type=int, default=90, help="most runs of seed-current")
    parser.add_argument("--write", action="store_true", help="update bench/workloads.py")
    args = parser.parse_args(argv)
    profiles: dict[Role, str] = {"reasoning": args.reasoning_profile, "coder": args.coder_profile}
    start: TokenSpec = WORKLOADS["seed-calibrated"].tokens
    print(
        f"seed-current on seed-calibrated, profiles {profiles['reasoning']} + "
        f"{profiles['coder']}; target plan 10 s, code 40 s, review 15 s, total 65 s"
    )
    best = fit(dict(start.max_tokens), profiles, args.runs)
    errors = ", ".join(f"{k} {v:+.1%}" for k, v in best.errors().items())
    print(f"best: {_line(0, best).split(': ', 1)[1]}")
    print(f"errors: {errors} -> {'fits' if best.fits() else 'does NOT fit'}")
    print(spec_line(best.max_tokens))
    if args.write:
        write_spec(best.max_tokens)
        print(f"wrote {WORKLOADS_FILE}")
    return 0 if best.fits() else 1


if __name__ == "__main__":
    sys.exit(main())
