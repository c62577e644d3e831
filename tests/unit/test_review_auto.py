"""review_on="auto": the router's finish estimates pick the reviewer per call once the
reasoning model is past its delay budget; without an estimator (fakes, StaticModels) the
reasoning model reviews. The choice is recorded. The budget itself: test_review_guard.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from graph.graph import build_graph
from graph.settings import load_settings
from nodes.context import RunContext, ServerOptions
from nodes.llm import RoutedModels, StaticModels
from nodes.review import review_role
from routing.calls import Role
from tests.fakes import schema_name, standard_models


@dataclass
class EstimatingRouter:
    """The part of Router that RoutedModels uses, with scripted finish estimates."""

    finish_s: dict[str, float | None]
    asked: list[tuple[str, int]] = field(default_factory=list)

    def base_url(self, role: Role) -> str:
        return f"http://{role}.tandem.internal/v1"

    def model(self, role: Role) -> str:
        return f"m-{role}"

    def client(self, role: Role) -> Any:
        return None

    def estimate_finish_s(self, role: Role, expected_output_tokens: int) -> float | None:
        self.asked.append((role, expected_output_tokens))
        return self.finish_s.get(role)


@dataclass
class ChoosingModels(StaticModels):
    """Fake chat models that choose like RoutedModels, from a scripted router."""

    router: EstimatingRouter | None = None

    def choose_role(
        self, candidates: Any, expected_output_tokens: int, delay_budget_s: float | None = None
    ) -> Role:
        assert self.router is not None
        return RoutedModels(router=self.router).choose_role(
            candidates, expected_output_tokens, delay_budget_s
        )


def test_choose_role_takes_the_earliest_finish() -> None:
    router = EstimatingRouter({"reasoning": 30.0, "coder": 8.0})
    assert RoutedModels(router=router).choose_role(("reasoning", "coder"), 1536) == "coder"
    assert router.asked == [("reasoning", 1536), ("coder", 1536)]
    busy_coder = EstimatingRouter({"reasoning": 30.0, "coder": 90.0})
    assert RoutedModels(router=busy_coder).choose_role(("reasoning", "coder"), 1536) == "reasoning"


def test_unknown_or_tied_estimates_prefer_reasoning() -> None:
    unknown = EstimatingRouter({"reasoning": None, "coder": 1.0})
    assert RoutedModels(router=unknown).choose_role(("reasoning", "coder"), 100) == "reasoning"
    coder_unknown = EstimatingRouter({"reasoning": 50.0, "coder": None})
    assert RoutedModels(router=coder_unknown).choose_role(("reasoning", "coder"), 1) == "reasoning"
    tie = EstimatingRouter({"reasoning": 5.0, "coder": 5.0})
    assert RoutedModels(router=tie).choose_role(("reasoning", "coder"), 100) == "reasoning"
    with pytest.raises(ValueError):
        RoutedModels(router=tie).choose_role((), 100)


def test_review_role_without_an_estimator_is_reasoning() -> None:
    reasoning, coder = standard_models(["a.py"])
    static = StaticModels(reasoning, coder)
    assert review_role(static, RunContext(review_on="auto")) == "reasoning"
    assert review_role(static, RunContext(review_on="coder")) == "coder"
    models = ChoosingModels(reasoning, coder, router=EstimatingRouter({"reasoning": 9, "coder": 1}))
    unguarded = RunContext(review_on="auto", review_delay_budget_s=0, max_tokens={"review": 700})
    assert review_role(models, unguarded) == "coder"
    assert models.router is not None and models.router.asked[-1] == ("coder", 700)
    assert review_role(models, RunContext(review_on="reasoning")) == "reasoning"


def test_auto_is_a_valid_setting_and_context(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RunContext(review_on="auto").review_on == "auto"
    with pytest.raises(ValueError, match="review_on"):
        RunContext(review_on="gpu0")  # type: ignore[arg-type]
    monkeypatch.setenv("TANDEM_REVIEW_ON", "auto")
    assert load_settings().run_context().review_on == "auto"


@pytest.mark.parametrize(
    ("estimates", "reviewer"),
    [
        ({"reasoning": 40.0, "coder": 6.0}, "coder"),
        ({"reasoning": 40.0, "coder": None}, "reasoning"),
    ],
)
async def test_graph_reviews_where_auto_chose_and_records_it(
    tmp_path: Path, estimates: dict[str, float | None], reviewer: Role
) -> None:
    reasoning, coder = standard_models(["a.py", "b.py"], needs_fix_once=["b.py"])
    models = ChoosingModels(reasoning, coder, router=EstimatingRouter(estimates))
    graph = build_graph(
        models, defaults=RunContext(review_on="auto"), options=ServerOptions(workspace=tmp_path)
    )
    out = await graph.ainvoke({"request": "r", "session_id": "s1"})
    assert out["status"] == "ok"
    on = {"reasoning": reasoning, "coder": coder}
    reviews = [c for c in on[reviewer].calls if schema_name(c["kwargs"]) == "Review"]
    assert len(reviews) == 2  # the first round and the fix round
    other = "coder" if reviewer == "reasoning" else "reasoning"
    assert not any(schema_name(c["kwargs"]) == "Review" for c in on[other].calls)
    assert out["usage"]["review_role"] == {reviewer: 2}
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["review_on"] == "auto"
    assert manifest["usage"]["review_role"] == {reviewer: 2}
    assert manifest["review_calls"] == {reviewer: 2, other: 0}
    assert manifest["review_share"] == {reviewer: 1.0, other: 0.0}
    assert manifest["usage"][reviewer]["calls"] >= 2
