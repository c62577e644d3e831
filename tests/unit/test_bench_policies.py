"""Benchmark policy names: what each one configures, so that results read plainly."""

from __future__ import annotations

import dataclasses
import re

import pytest

from bench.cli import _policy_names
from bench.policies import SWEEP, get_policy
from bench.runner import PolicyRun
from graph.sessions import SessionResult


@pytest.mark.parametrize(
    ("name", "review_on", "order", "engine_priority"),
    [
        ("adaptive", "reasoning", "las", True),
        ("adaptive+auto", "auto", "las", True),
        ("adaptive-fifo", "reasoning", "fifo", False),
        ("adaptive-nopriority", "reasoning", "las", False),
        ("adaptive-oldest", "reasoning", "oldest", False),
    ],
)
def test_adaptive_policies(name: str, review_on: str, order: str, engine_priority: bool) -> None:
    policy = get_policy(name)
    assert policy.name == name
    assert policy.limit == "adaptive"
    assert (policy.review_on, policy.order, policy.engine_priority) == (
        review_on,
        order,
        engine_priority,
    )
    assert policy.concurrent_sessions and policy.fanout_kind == "seed"


def test_adaptive_reasoning_is_an_alias_of_adaptive_under_its_own_name() -> None:
    alias = get_policy("adaptive-reasoning")
    assert alias.name == "adaptive-reasoning"
    assert dataclasses.replace(alias, name="adaptive") == get_policy("adaptive")


@pytest.mark.parametrize(
    ("name", "review_on"),
    [("fixed-8", "reasoning"), ("fixed-8+coder", "coder"), ("fixed-8+auto", "auto")],
)
def test_fixed_limits_keep_las_without_engine_priority(name: str, review_on: str) -> None:
    policy = get_policy(name)
    assert (policy.limit, policy.order, policy.review_on) == ("fixed-8", "las", review_on)
    assert not policy.engine_priority


def test_sweeps_expand_to_fixed_limits() -> None:
    assert _policy_names("sweep") == [f"fixed-{n}" for n in SWEEP]
    auto = [get_policy(n) for n in _policy_names("sweep+auto")]
    assert [p.limit for p in auto] == [f"fixed-{n}" for n in SWEEP]
    assert {p.review_on for p in auto} == {"auto"}


def test_seed_policies_are_the_users_system_unchanged() -> None:
    current, phase3 = get_policy("seed-current"), get_policy("seed-phase3")
    assert (current.limit, current.review_on, current.fanout_cap) == ("unlimited", "coder", 10)
    assert not current.concurrent_sessions
    assert (phase3.limit, phase3.order, phase3.review_on) == ("fixed-25", "fifo", "reasoning")
    assert not any(get_policy(n).engine_priority for n in ("seed-current", "seed-phase1"))


@pytest.mark.parametrize("name", ["adaptive+coder", "adaptive-las", "fixed-8+gpu", "sweep"])
def test_unknown_policies_are_refused_naming_the_known_ones(name: str) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"unknown policy '{name}'") + ".*adaptive-nopriority"
    ):
        get_policy(name)


def test_a_bad_fixed_limit_is_refused_naming_the_limit_forms() -> None:
    with pytest.raises(ValueError, match="fixed-N"):
        get_policy("fixed-0")


def test_bench_record_carries_engine_priority() -> None:
    session = SessionResult("s0", "ok", finished_at=5.0)
    for name, expected in (("adaptive", True), ("adaptive-nopriority", False)):
        record = PolicyRun(get_policy(name), [session], [0.0], t0=0.0, t_end=5.0).result()
        assert record["engine_priority"] is expected
        assert record["policy"] == name
