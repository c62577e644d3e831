"""Prefix hold: a session's calls wait for their prefix leader's first token, bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from bench.policies import get_policy
from bench.runner import run_policy_emulated
from bench.workloads import get_workload
from routing.admission import Admission, Outcome, Slot
from routing.limits import FixedLimit
from routing.orders import LasOrder, ServiceLedger
from routing.router import Router
from serving.clock import run
from serving.roles import Role
from tests.sibling_calls import sibling_send_times

HOLD_S = 2.0
PROFILES: dict[Role, str] = {"reasoning": "h100-nvl-reasoning-32b", "coder": "h100-nvl-coder-8b"}


def _admission(limit: int = 8, hold_s: float | None = HOLD_S) -> Admission:
    ledger = ServiceLedger()
    return Admission("r", FixedLimit(limit), LasOrder(ledger), ledger, prefix_hold_s=hold_s)


def _virtual(body: Coroutine[Any, Any, None]) -> None:
    run(body, virtual=True)


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_siblings_wait_for_the_leaders_first_token_then_go_together() -> None:
    async def body() -> None:
        adm = _admission()
        leader = await adm.acquire("a")
        siblings = [asyncio.create_task(adm.acquire("a")) for _ in range(3)]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in siblings)
        assert (adm.in_flight, adm.queued, adm.prefix_held) == (1, 3, 3)
        leader.first_token()
        await _settle()
        assert all(t.done() for t in siblings) and adm.in_flight == 4
        # The prefix is hot now: a later call of the session goes straight in.
        late = await asyncio.wait_for(adm.acquire("a"), 0.01)
        for slot in [leader, late, *(t.result() for t in siblings)]:
            slot.release(Outcome())
        assert (adm.in_flight, adm.queued, adm.prefix_held) == (0, 0, 3)

    _virtual(body())


def test_other_sessions_are_not_held() -> None:
    async def body() -> None:
        adm = _admission()
        await adm.acquire("a")
        other = await asyncio.wait_for(adm.acquire("b"), 0.01)
        assert adm.in_flight == 2 and adm.prefix_held == 0
        other.release(Outcome())

    _virtual(body())


def test_a_hold_ends_after_prefix_hold_s_without_a_first_token() -> None:
    async def body() -> None:
        adm = _admission()
        await adm.acquire("a")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sibling = await adm.acquire("a")
        assert loop.time() - t0 == pytest.approx(HOLD_S)
        assert adm.in_flight == 2 and adm.queued == 0
        sibling.release(Outcome())

    _virtual(body())


def test_a_leader_that_ends_without_a_first_token_frees_its_siblings() -> None:
    async def body() -> None:
        adm = _admission()
        leader = await adm.acquire("a")
        sibling = asyncio.create_task(adm.acquire("a"))
        await _settle()
        assert not sibling.done()
        leader.release(Outcome("error"))
        await _settle()
        assert sibling.done() and adm.in_flight == 1

    _virtual(body())


def test_calls_queued_together_are_held_behind_the_first_admitted() -> None:
    async def body() -> None:
        adm = _admission(limit=2)
        blockers = [await adm.acquire("b"), await adm.acquire("c")]
        first, second = (asyncio.create_task(adm.acquire("a")) for _ in range(2))
        await _settle()
        assert adm.queued == 2 and adm.prefix_held == 0
        for blocker in blockers:
            blocker.first_token()
            blocker.release(Outcome())
        await _settle()
        # Two slots freed: the first of "a" is its leader; the order picked the second
        # for the other slot, but it waits for the leader's prefix.
        assert first.done() and not second.done()
        assert (adm.in_flight, adm.prefix_held) == (1, 1)
        leader: Slot = first.result()
        leader.first_token()
        await _settle()
        assert second.done() and adm.in_flight == 2

    _virtual(body())


def test_a_cancelled_held_call_leaves_cleanly() -> None:
    async def body() -> None:
        adm = _admission()
        leader = await adm.acquire("a")
        sibling = asyncio.create_task(adm.acquire("a"))
        await _settle()
        sibling.cancel()
        await asyncio.gather(sibling, return_exceptions=True)
        assert adm.queued == 0
        await asyncio.sleep(2 * HOLD_S)  # the hold timer was cancelled with the waiter
        leader.first_token()
        leader.release(Outcome())
        assert (adm.in_flight, adm.queued) == (0, 0)

    _virtual(body())


def test_without_prefix_hold_siblings_are_admitted_at_once() -> None:
    async def body() -> None:
        adm = _admission(hold_s=None)
        slots = [await asyncio.wait_for(adm.acquire("a"), 0.01) for _ in range(4)]
        assert adm.in_flight == 4 and adm.prefix_held == 0
        slots[0].first_token()  # nothing to do without a hold
        for slot in slots:
            slot.release(Outcome())

    _virtual(body())


@pytest.mark.parametrize(("order", "sent_at"), [("las", [0.0, 0.5, 0.5]), ("fifo", [0.0] * 3)])
def test_the_router_sends_siblings_once_the_leaders_first_token_streams(
    order: str, sent_at: list[float]
) -> None:
    async def body() -> None:
        seen = await sibling_send_times(
            lambda replica: Router({"coder": [replica]}, limit="fixed-8", order=order)
        )
        assert seen == pytest.approx(sent_at, abs=1e-6)

    _virtual(body())


def test_seed_multi_serves_the_coders_shareable_prefix_from_cache() -> None:
    """Done-when of the prefix work: the coder hit share on seed-multi is at least 0.9."""

    async def share(policy: str) -> float:
        result = await run_policy_emulated(
            get_workload("seed-multi"), get_policy(policy), profiles=PROFILES
        )
        hit_share = result.result()["prefix_shareable_hit_share"]
        assert hit_share is not None and hit_share["coder"] is not None
        return float(hit_share["coder"])

    async def body() -> None:
        # adaptive-fifo has no prefix hold: a session's coders arrive together and the
        # ones prefilled in the leader's engine step compute the shared prefix again.
        held, unheld = await share("adaptive"), await share("adaptive-fifo")
        assert held >= 0.9
        assert unheld < held

    _virtual(body())


def test_a_session_whose_prefix_is_hot_goes_before_lower_las_ranks() -> None:
    async def body() -> None:
        adm = _admission(limit=4)
        leader = await adm.acquire("a")
        leader.first_token()
        others = [await adm.acquire(s) for s in ("b", "c", "d")]  # the replica is full
        await asyncio.sleep(5.0)  # "a" has attained more service than "e", new
        late_e = asyncio.create_task(adm.acquire("e"))
        await _settle()
        sibling = asyncio.create_task(adm.acquire("a"))
        await _settle()
        others[0].release(Outcome())
        await _settle()
        # LAS alone would admit "e" (nothing attained); "a"'s prefix is in the cache now.
        assert sibling.done() and not late_e.done()
        for slot in [leader, *others[1:], sibling.result()]:
            slot.release(Outcome())
        await _settle()
        assert late_e.done()
        late_e.result().release(Outcome())
        assert (adm.in_flight, adm.queued) == (0, 0)

    _virtual(body())


def test_a_hot_session_at_half_the_slots_waits_its_turn() -> None:
    async def body() -> None:
        adm = _admission(limit=4)
        a1 = await adm.acquire("a")
        a1.first_token()
        a2 = await adm.acquire("a")  # straight in: the prefix is hot
        others = [await adm.acquire(s) for s in ("b", "c")]
        await asyncio.sleep(5.0)
        late_e = asyncio.create_task(adm.acquire("e"))
        await _settle()
        a3 = asyncio.create_task(adm.acquire("a"))
        await _settle()
        others[0].release(Outcome())
        await _settle()
        # "a" holds 2 of 4 slots: the flood cap; LAS then ranks "e" first.
        assert late_e.done() and not a3.done()
        for slot in [a1, a2, others[1], late_e.result()]:
            slot.release(Outcome())
        await _settle()
        a3.result().release(Outcome())
        assert (adm.in_flight, adm.queued) == (0, 0)

    _virtual(body())
