"""Answers cut at `max_tokens`, through the real graph on the in-process emulator (which stops
at the cap as vLLM does): a plan that cannot fit says which cap to raise, and a review whose
verdicts overrun its cap asks for fewer files per call instead of failing the session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.roles import Role
from tests.emulated import emulated_session, package_request

FILES = 8


def _session(
    tmp_path: Path, max_tokens: dict[str, int], role: Role
) -> tuple[dict[str, Any], list[Any]]:
    context = {"max_tokens": max_tokens, "max_review_rounds": 0}
    return emulated_session(tmp_path, package_request(FILES), context, records_of=role)


def test_a_plan_cut_at_its_cap_names_the_cap_to_raise(tmp_path: Path) -> None:
    out, records = _session(tmp_path, {"plan": 64, "code": 256, "review": 512}, "reasoning")
    assert out["status"] == "failed"
    assert (
        "plan: the Plan JSON was cut at max_tokens=64 before it ended (3 attempts)"
        in (out["error"])
    )
    assert "--max-tokens plan=N" in out["error"]
    plans = [r for r in records if r.stage == "plan"]
    assert len(plans) == 3 and all(r.generated_tokens == 64 for r in plans)


def test_a_review_that_overruns_its_cap_is_asked_again_for_fewer_files(tmp_path: Path) -> None:
    cap = 96  # about four files' verdicts: eight do not fit
    out, records = _session(tmp_path, {"plan": 2048, "code": 256, "review": cap}, "coder")
    assert not out.get("error"), out.get("error")
    verdicts = out["verdicts"]
    assert sorted(verdicts) == [f"pkg/file_{i}.py" for i in range(FILES)]
    assert {v["verdict"] for v in verdicts.values()} <= {"ok", "needs-fix"}
    reviews = [r for r in records if r.stage == "review"]
    # The eight-file call stopped at the cap and was not asked again as it was; the halves
    # (or their halves) answered whole.
    assert reviews[0].generated_tokens == cap
    assert len(reviews) >= 3
    assert all(r.prompt_tokens < reviews[0].prompt_tokens for r in reviews[1:])
    assert all(r.generated_tokens <= cap for r in reviews)
    assert sum(r.generated_tokens < cap for r in reviews) >= 2
