"""The shared admission's pure parts: URL redaction, constructor checks and the local
fallback's limit (no Redis)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from routing.admission import AdmissionObserver, Outcome
from routing.limits import FixedLimit
from routing.orders import ServiceLedger, make_order
from routing.shared_admission import SharedAdmission, _LocalFallback, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@cache:6379/1", "redis://:***@cache:6379/1"),
        ("rediss://tandem:p%40ss@cache.internal/0", "rediss://tandem:***@cache.internal/0"),
        ("redis://user@cache:6379", "redis://user@cache:6379"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_acquire_before_start_is_a_clear_error() -> None:
    admission = SharedAdmission("coder@gpu0", FixedLimit(2), url="redis://127.0.0.1:1/0")

    async def acquire() -> None:
        await admission.acquire("s1")

    with pytest.raises(RuntimeError, match=r"coder@gpu0: start\(\) was not called"):
        asyncio.run(acquire())


def test_lease_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="lease_ttl_s"):
        SharedAdmission("coder@gpu0", FixedLimit(2), url="redis://x", lease_ttl_s=0)


def test_before_start_the_surface_reads_the_local_limit() -> None:
    admission = SharedAdmission("coder@gpu0", FixedLimit(3), url="redis://x")
    assert (admission.limit, admission.in_flight, admission.queued) == (3, 0, 0)
    assert admission.stats()["degraded"] == 0


def _fallback(limit: int, held_shared: list[int]) -> _LocalFallback:
    ledger = ServiceLedger()
    return _LocalFallback(
        "coder@gpu0", limit, lambda: held_shared[0], make_order("fifo", ledger), ledger, None
    )


def test_fallback_counts_the_shared_slots_still_held_against_its_limit() -> None:
    async def scenario() -> None:
        held_shared = [2]
        fallback = _fallback(2, held_shared)
        first = asyncio.create_task(fallback.acquire("s1"))
        await asyncio.sleep(0)
        assert not first.done()  # two shared slots fill the limit of 2
        assert (fallback.fallback_limit, fallback.limit, fallback.queued) == (2, 0, 1)

        held_shared[0] = 1
        fallback.room_changed()  # a shared slot given back wakes the waiter
        slot = await asyncio.wait_for(first, 1)
        second = asyncio.create_task(fallback.acquire("s2"))
        await asyncio.sleep(0)
        assert not second.done()  # one shared + one local = 2

        slot.release(Outcome("ok"))  # a local slot given back wakes it too
        await asyncio.wait_for(second, 1)
        assert fallback.in_flight == 1

    asyncio.run(scenario())


def test_fallback_waiters_stop_waiting_on_shared_slots_once_redis_is_back() -> None:
    async def scenario() -> None:
        fallback = _fallback(1, [1])
        waiting = asyncio.create_task(fallback.acquire("s1"))
        await asyncio.sleep(0)
        assert not waiting.done()
        fallback.stop_counting_shared()
        slot = await asyncio.wait_for(waiting, 1)
        assert slot.session_id == "s1"

    asyncio.run(scenario())


class _ScriptedAdmission(SharedAdmission):
    """A shared admission whose scripts the test answers, one future per batch sent."""

    def __init__(self, limit: int, observer: AdmissionObserver | None = None) -> None:
        super().__init__("coder@gpu0", FixedLimit(limit), url="redis://x", observer=observer)
        self._redis = cast(Any, object())  # started, as far as `acquire` can tell
        self.sent: list[list[str]] = []
        self.replies: list[asyncio.Future[list[Any]]] = []

    async def _call(self, script: str, *args: str) -> list[Any]:
        assert script == "batch"
        self.sent.append(list(args))
        reply: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.replies.append(reply)
        return await reply


def _enqueued(batch: list[str]) -> list[str]:
    """The sessions a batch's arguments enqueue (after releases and cancels; each enqueue is
    ticket, session, hot)."""
    at = 2 + 2 * int(batch[1])
    at += 1 + int(batch[at])
    return batch[at + 1 :: 3]


async def _turns(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_calls_during_a_round_trip_go_out_in_a_second_batch_then_share_one() -> None:
    async def scenario() -> None:
        admission = _ScriptedAdmission(limit=10)
        first = [asyncio.create_task(admission.acquire(f"a{i}")) for i in range(3)]
        await _turns()
        second = asyncio.create_task(admission.acquire("b"))
        await _turns()
        third = [asyncio.create_task(admission.acquire(f"c{i}")) for i in range(2)]
        await _turns()
        # Two batches in flight at most: the calls after them wait for one to land.
        assert [_enqueued(batch) for batch in admission.sent] == [["a0", "a1", "a2"], ["b"]]
        tickets = list(admission._waiters)
        admission.replies[0].set_result([3, 0, 10, 1, tickets[:3]])
        await _turns()
        assert [_enqueued(batch) for batch in admission.sent][2:] == [["c0", "c1"]]
        assert [slot.session_id for slot in await asyncio.gather(*first)] == ["a0", "a1", "a2"]
        admission.replies[1].set_result([4, 0, 10, 1, [tickets[3]]])
        admission.replies[2].set_result([6, 0, 10, 1, tickets[4:]])
        slots = await asyncio.gather(second, *third)
        assert [slot.session_id for slot in slots] == ["b", "c0", "c1"]

    asyncio.run(scenario())


def test_a_cancel_waits_for_its_enqueue_to_land() -> None:
    async def scenario() -> None:
        admission = _ScriptedAdmission(limit=1)
        waiting = asyncio.create_task(admission.acquire("gone"))
        await _turns()
        (ticket,) = admission._waiters
        waiting.cancel()
        await _turns()
        # The enqueue is in flight: a cancel sent beside it could land first.
        assert len(admission.sent) == 1
        admission.replies[0].set_result([1, 1, 1, 1, []])  # queued, not granted
        await _turns()
        assert len(admission.sent) == 2
        assert admission.sent[1][1:] == ["0", "1", ticket]  # no releases, one cancel
        admission.replies[1].set_result([1, 0, 1, 1, []])
        await _turns()
        assert waiting.cancelled() and not admission._waiters

    asyncio.run(scenario())


def test_a_call_made_as_both_senders_finish_is_still_sent() -> None:
    async def scenario() -> None:
        admission = _ScriptedAdmission(limit=10)
        first = asyncio.create_task(admission.acquire("a"))
        await _turns()
        second = asyncio.create_task(admission.acquire("b"))
        await _turns()
        tickets = list(admission._waiters)
        admission.replies[0].set_result([1, 0, 10, 1, tickets[:1]])
        admission.replies[1].set_result([2, 0, 10, 1, tickets[1:]])
        # Runs in the same loop turn as both senders' last step, after each has finished.
        late = asyncio.create_task(admission.acquire("late"))
        await _turns()
        assert [_enqueued(batch) for batch in admission.sent] == [["a"], ["b"], ["late"]]
        admission.replies[2].set_result([3, 0, 10, 1, list(admission._waiters)])
        slots = await asyncio.gather(first, second, late)
        assert [slot.session_id for slot in slots] == ["a", "b", "late"]

    asyncio.run(scenario())


@pytest.mark.parametrize("grant_first", [True, False])
def test_a_slot_granted_as_its_caller_is_cancelled_is_given_back_once(grant_first: bool) -> None:
    async def scenario() -> None:
        admission = _ScriptedAdmission(limit=1)
        waiting = asyncio.create_task(admission.acquire("gone"))
        await _turns()
        (ticket,) = admission._waiters
        admission.replies[0].set_result([1, 0, 1, 1, [ticket]])
        if grant_first:
            await asyncio.sleep(0)  # the sender hands the slot over; the caller has not run
        waiting.cancel()
        await _turns()
        assert waiting.cancelled()
        assert [batch[1:] for batch in admission.sent[1:]] == [["0", "1", ticket]]

    asyncio.run(scenario())


def test_a_caller_cancelled_before_its_batch_is_sent_sends_nothing() -> None:
    async def scenario() -> None:
        admission = _ScriptedAdmission(limit=2)
        busy = []
        for i in range(2):  # one batch each: both senders wait for Redis
            busy.append(asyncio.create_task(admission.acquire(f"busy{i}")))
            await _turns()
        gone = asyncio.create_task(admission.acquire("gone"))
        await _turns()
        gone.cancel()
        await _turns()
        tickets = list(admission._waiters)
        for reply, ticket in zip(admission.replies, tickets, strict=True):
            reply.set_result([2, 0, 2, 1, [ticket]])
        await asyncio.gather(*busy)
        await _turns()
        assert gone.cancelled()
        assert [_enqueued(batch) for batch in admission.sent] == [["busy0"], ["busy1"]]

    asyncio.run(scenario())


class _StateLog:
    """An observer that keeps the (limit, in_flight, queued) states it was told."""

    def __init__(self) -> None:
        self.states: list[tuple[int, int, int]] = []
        self.admits = 0

    def on_state(self, limit: int, in_flight: int, queued: int) -> None:
        self.states.append((limit, in_flight, queued))

    def on_admit(self, waited_s: float) -> None:
        self.admits += 1

    def on_release(self, outcome: Outcome) -> None:
        pass


def test_degraded_admission_counts_a_held_shared_slot_and_reports_the_whole() -> None:
    async def scenario() -> None:
        log = _StateLog()
        admission = _ScriptedAdmission(limit=2, observer=log)
        shared = asyncio.create_task(admission.acquire("s0"))
        await _turns()
        admission.replies[0].set_result([1, 0, 2, 1, list(admission._waiters)])
        shared_slot = await shared

        admission._degrade(ConnectionError("store went away"))
        assert admission.degraded and admission.limit == 2  # 2 // 1 worker
        local = await asyncio.wait_for(admission.acquire("s1"), 1)
        assert admission.is_local(local)
        assert log.states[-1] == (2, 2, 0)  # the shared slot and the local one
        waiting = asyncio.create_task(admission.acquire("s2"))
        await _turns()
        assert not waiting.done() and log.states[-1] == (2, 2, 1)

        shared_slot.release(Outcome("ok"))
        assert admission.is_local(await asyncio.wait_for(waiting, 1))
        assert log.states[-1] == (2, 2, 0)
        assert log.admits == 3

    asyncio.run(scenario())
