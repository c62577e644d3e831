"""The quality guard of review_on="auto": the reasoning model keeps a review unless the
router's estimated delay on it exceeds `review_delay_budget_s`, and then only loses it to a
coder that would finish sooner."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from langchain_core.messages import BaseMessage

from bench.policies import get_policy
from bench.runner import PolicyRun
from graph.graph import build_graph
from graph.sessions import SessionResult
from graph.settings import SettingsError, load_settings
from nodes.context import DEFAULT_REVIEW_DELAY_BUDGET_S, RunContext, ServerOptions, parse_context
from nodes.llm import RoutedModels, StaticModels
from nodes.review import REVIEW_CANDIDATES, review_calls, review_role, review_share
from routing.admission import Outcome
from routing.calls import CallInfo, Role, call_scope
from routing.endpoints import Replica
from routing.exporter import TandemMetrics
from routing.router import Router
from tests.fakes import ScriptedChatModel, schema_name, standard_models


@dataclass
class LoadedRouter:
    """Router estimates from a scripted delay to the first token and ITL per role."""

    delay_s: dict[str, float | None]
    itl_s: dict[str, float]
    asked: list[tuple[str, int]] = field(default_factory=list)

    def base_url(self, role: Role) -> str:
        return f"http://{role}.tandem.internal/v1"

    def model(self, role: Role) -> str:
        return f"m-{role}"

    def client(self, role: Role) -> Any:
        return None

    def estimate_finish_s(self, role: Role, expected_output_tokens: int) -> float | None:
        self.asked.append((role, expected_output_tokens))
        delay = self.delay_s.get(role)
        return None if delay is None else delay + expected_output_tokens * self.itl_s[role]


# An idle 32B model at 30 ms a token and an 8B coder at 8 ms: the coder always finishes a
# review first when both are idle, which is what the guard must not act on alone.
ITL_S = {"reasoning": 0.030, "coder": 0.008}


def choose(delay_s: dict[str, float | None], budget_s: float | None = 30.0) -> Role:
    router = LoadedRouter(delay_s, ITL_S)
    return RoutedModels(router=router).choose_role(REVIEW_CANDIDATES, 1000, budget_s)


def test_under_budget_the_reasoning_model_reviews_though_the_coder_is_faster() -> None:
    assert choose({"reasoning": 2.0, "coder": 0.0}) == "reasoning"
    # At the budget is not over it.
    assert choose({"reasoning": 30.0, "coder": 0.0}) == "reasoning"
    # Without a guard the same estimates send the review to the coder.
    assert choose({"reasoning": 2.0, "coder": 0.0}, budget_s=None) == "coder"


def test_over_budget_the_coder_reviews_when_it_would_finish_sooner() -> None:
    # Reasoning: 31 s + 30 s of tokens; coder: 40 s + 8 s.
    assert choose({"reasoning": 31.0, "coder": 40.0}) == "coder"


def test_over_budget_the_reasoning_model_keeps_the_review_when_the_coder_is_slower() -> None:
    # Reasoning: 31 s + 30 s; coder: 60 s + 8 s, busier still.
    assert choose({"reasoning": 31.0, "coder": 60.0}) == "reasoning"


def test_without_an_estimate_the_reasoning_model_reviews() -> None:
    assert choose({"reasoning": None, "coder": 0.0}) == "reasoning"
    assert choose({"reasoning": 500.0, "coder": None}) == "reasoning"
    static = StaticModels(*standard_models(["a.py"]))
    assert review_role(static, RunContext(review_on="auto", review_delay_budget_s=0)) == (
        "reasoning"
    )


def test_the_delay_is_the_estimate_of_a_call_with_no_output() -> None:
    router = LoadedRouter({"reasoning": 10.0, "coder": 0.0}, ITL_S)
    assert RoutedModels(router=router).choose_role(REVIEW_CANDIDATES, 700, 5.0) == "coder"
    assert router.asked == [("reasoning", 0), ("reasoning", 700), ("coder", 700)]
    under = LoadedRouter({"reasoning": 4.0, "coder": 0.0}, ITL_S)
    assert RoutedModels(router=under).choose_role(REVIEW_CANDIDATES, 700, 5.0) == "reasoning"
    assert under.asked == [("reasoning", 0)]  # nothing else is asked under budget


@dataclass
class RoutedStatic(StaticModels):
    """Fake chat models that place reviews like RoutedModels, from a scripted router."""

    router: LoadedRouter | None = None

    def choose_role(
        self, candidates: Any, expected_output_tokens: int, delay_budget_s: float | None = None
    ) -> Role:
        assert self.router is not None
        return RoutedModels(router=self.router).choose_role(
            candidates, expected_output_tokens, delay_budget_s
        )


def test_review_role_uses_the_run_context_budget() -> None:
    reasoning, coder = standard_models(["a.py"])
    models = RoutedStatic(
        reasoning, coder, router=LoadedRouter({"reasoning": 45.0, "coder": 0.0}, ITL_S)
    )
    assert review_role(models, RunContext(review_on="auto")) == "coder"  # 45 s > 30 s default
    assert review_role(models, RunContext(review_on="auto", review_delay_budget_s=60)) == (
        "reasoning"
    )
    # A fixed placement is never second-guessed.
    assert review_role(models, RunContext(review_on="reasoning", review_delay_budget_s=0)) == (
        "reasoning"
    )


def test_budget_setting_and_context_field(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RunContext().review_delay_budget_s == DEFAULT_REVIEW_DELAY_BUDGET_S
    monkeypatch.setenv("TANDEM_REVIEW_DELAY_BUDGET_S", "12.5")
    assert load_settings().run_context().review_delay_budget_s == 12.5
    monkeypatch.setenv("TANDEM_REVIEW_DELAY_BUDGET_S", "-1")
    with pytest.raises(SettingsError, match="TANDEM_REVIEW_DELAY_BUDGET_S"):
        load_settings()
    with pytest.raises(ValueError, match="review_delay_budget_s"):
        parse_context({"review_delay_budget_s": 1e9})
    base = RunContext(review_delay_budget_s=20)
    assert base.merged({"review_on": "auto"}).review_delay_budget_s == 20
    assert base.merged({"review_delay_budget_s": 5}).review_delay_budget_s == 5


def pair_router(
    handler: Callable[[httpx.Request], httpx.Response],
    limit: str,
    metrics: TandemMetrics | None = None,
) -> Router:
    """A real Router over one mocked replica per role."""
    gpus: dict[Role, str] = {"reasoning": "gpu0", "coder": "gpu1"}
    return Router(
        {
            role: [
                Replica(
                    url=f"http://{role}:8000/v1",
                    model=f"m-{role}",
                    gpu=gpu,
                    transport=httpx.MockTransport(handler),
                )
            ]
            for role, gpu in gpus.items()
        },
        limit=limit,
        metrics=metrics,
    )


async def test_a_queue_on_the_real_router_counts_as_delay() -> None:
    def unused(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no call is sent")

    router = pair_router(unused, "fixed-2")
    models = RoutedModels(router=router)
    assert models.choose_role(REVIEW_CANDIDATES, 1000, 0.0) == "reasoning"  # nothing measured
    # Measured answers: the reasoning model takes 1 s to its first token, 40 s per call.
    reasoning = router.lanes("reasoning")[0]
    reasoning.latency.observe(ttft_s=1.0, itl_s=0.030, service_s=40.0)
    router.lanes("coder")[0].latency.observe(ttft_s=0.2, itl_s=0.008, service_s=8.0)
    assert models.choose_role(REVIEW_CANDIDATES, 1000, 30.0) == "reasoning"  # idle: 1 s delay
    # Both reasoning slots held and one call queued: the next waits for two slots to free
    # (one every 40 s / 2), then 1 s to its first token: 41 s.
    slots = [await reasoning.admission.acquire("s") for _ in range(2)]
    waiters = [asyncio.ensure_future(reasoning.admission.acquire("s"))]
    await asyncio.sleep(0)
    assert router.estimate_finish_s("reasoning", 0) == pytest.approx(41.0)
    assert models.choose_role(REVIEW_CANDIDATES, 1000, 30.0) == "coder"
    assert models.choose_role(REVIEW_CANDIDATES, 1000, 45.0) == "reasoning"
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    for slot in slots:
        slot.release(Outcome("cancelled"))
    await router.aclose()


# The share of reviews each role served: manifest, metrics, bench record.


async def test_manifest_counts_review_calls_per_role_retries_included(tmp_path: Path) -> None:
    reasoning, coder = standard_models(["a.py", "b.py"])
    scripted = reasoning.responder
    malformed: list[int] = []

    def once_malformed(messages: list[BaseMessage], kwargs: dict[str, Any]) -> str:
        if schema_name(kwargs) == "Review" and not malformed:
            malformed.append(1)
            return "not a review"
        text: str = scripted(messages, kwargs)
        return text

    reasoning = ScriptedChatModel(responder=once_malformed)
    graph = build_graph(
        StaticModels(reasoning, coder),
        defaults=RunContext(review_on="reasoning"),
        options=ServerOptions(workspace=tmp_path),
    )
    out = await graph.ainvoke({"request": "r", "session_id": "s1"})
    assert out["status"] == "ok"
    reviews = [c for c in reasoning.calls if schema_name(c["kwargs"]) == "Review"]
    # The malformed answer, its retry (the fake finds no files in the error feedback, so it
    # gives no verdicts), and the call that asks again for the files left out.
    assert len(reviews) == 3
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert manifest["review_calls"] == {"reasoning": 3, "coder": 0}
    assert manifest["review_share"] == {"reasoning": 1.0, "coder": 0.0}


def test_review_share_of_no_calls_is_none_and_rounds() -> None:
    assert review_share(review_calls({})) is None
    assert review_calls({"review_role": {"coder": 2.0}}) == {"reasoning": 0, "coder": 2}
    assert review_share({"reasoning": 1, "coder": 2}) == {"reasoning": 0.3333, "coder": 0.6667}


async def test_metrics_count_review_calls_by_the_role_that_answered() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        status = 500 if request.url.path.endswith("/fail") else 200
        return httpx.Response(status, json={})

    metrics = TandemMetrics(gpu=False)
    router = pair_router(answer, "fixed-4", metrics)

    def counted(role: str) -> float | None:
        return metrics.registry.get_sample_value("tandem_review_calls_total", {"role": role})

    assert counted("reasoning") == 0.0 and counted("coder") == 0.0
    sends: list[tuple[Role, str, str, str]] = [
        ("coder", "review", "POST", "/chat/completions"),
        ("coder", "review", "POST", "/chat/completions"),
        ("reasoning", "review", "POST", "/chat/completions"),
        ("reasoning", "plan", "POST", "/chat/completions"),  # not a review
        ("reasoning", "review", "GET", "/models"),  # the context window lookup
        ("reasoning", "review", "POST", "/fail"),  # not answered
    ]
    for role, stage, method, path in sends:
        with call_scope(CallInfo(session_id="s", stage=stage, role=role)):
            await router.client(role).request(method, router.base_url(role) + path)
    await router.client("coder").post(router.base_url("coder") + "/chat/completions")  # no scope
    assert counted("coder") == 2.0
    assert counted("reasoning") == 1.0
    await router.aclose()


def test_bench_record_sums_review_calls_over_sessions() -> None:
    sessions = [
        SessionResult("s0", "ok", usage={"review_role": {"coder": 3}, "coder": {"calls": 9}}),
        SessionResult("s1", "ok", usage={"review_role": {"reasoning": 1}}),
        SessionResult("s2", "failed"),
    ]
    run = PolicyRun(get_policy("adaptive+auto"), sessions, [0.0, 0.0, 0.0], t0=0.0, t_end=10.0)
    record = run.result()
    assert record["review_calls"] == {"reasoning": 1, "coder": 3}
    assert record["review_share"] == {"reasoning": 0.25, "coder": 0.75}
    assert record["review_on"] == "auto"


async def test_a_failing_answer_hook_gives_the_slot_back() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={})

    router = pair_router(answer, "fixed-4", None)

    def broken(info: CallInfo) -> None:
        raise RuntimeError("metrics down")

    for transport in router._transports:
        transport.on_answered = broken
    with call_scope(CallInfo(session_id="s", stage="review", role="coder")):
        with pytest.raises(RuntimeError, match="metrics down"):
            await router.client("coder").post(router.base_url("coder") + "/chat/completions")
    lane = router.lanes("coder")[0]
    assert lane.admission.in_flight == 0
    await router.aclose()
