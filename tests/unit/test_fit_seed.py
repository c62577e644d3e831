"""`python -m bench.fit_seed`'s search, on a synthetic seed-current whose plan has a floor."""

from __future__ import annotations

import math

import pytest

from bench import fit_seed
from bench.fit_seed import Trial, fit

PLAN_FLOOR = 800  # tokens a 20-file plan's JSON needs: below, it is cut and the run fails


def _synthetic(max_tokens: dict[str, int], profiles: object, seed: int = 0) -> Trial:
    """Stage time linear in its cap (about one decode step per token); the plan completes
    only at or above its floor, else the session fails right after planning."""
    plan = max_tokens["plan"] * 0.0235
    if max_tokens["plan"] < PLAN_FLOOR:
        return Trial(dict(max_tokens), {"plan": plan, "code": 0.0, "review": 0.0}, plan, False)
    stages = {
        "plan": plan,
        "code": max_tokens["code"] * 0.0195,
        "review": max_tokens["review"] * 0.0177,
    }
    return Trial(dict(max_tokens), stages, sum(stages.values()), True)


def test_a_run_that_did_not_complete_is_no_candidate() -> None:
    failed = Trial(
        {"plan": 16, "code": 1, "review": 1},
        {"plan": 10.0, "code": 40.0, "review": 15.0},
        65.0,
        False,
    )
    assert not failed.fits() and failed.objective() == math.inf


def test_the_search_raises_a_cut_plan_cap_then_fits_the_total(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fit_seed, "measure", _synthetic)
    best = fit({"plan": 16, "code": 1692, "review": 780}, {}, budget_runs=90, say=lambda _: None)
    assert best.complete and best.max_tokens["plan"] >= PLAN_FLOOR
    # The plan cannot reach its 10 s (the floor takes 18.8 s): the total is what it fits.
    assert abs(best.makespan_s / fit_seed.TARGET_TOTAL_S - 1) <= fit_seed.TOTAL_TOLERANCE
