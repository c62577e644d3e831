"""Admission: limits enforced, cancellation clean, FIFO, LAS-with-aging and oldest-first orders."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from pytest_socket import disable_socket, enable_socket

from routing.admission import Admission, Outcome
from routing.limits import FixedLimit
from routing.orders import SESSION_IDLE_S, LasOrder, ServiceLedger, make_order


@pytest.fixture(autouse=True)
def _no_network() -> Iterator[None]:
    disable_socket(allow_unix_socket=True)  # the event loop's self-pipe is a unix socketpair
    yield
    enable_socket()


async def _call(
    adm: Admission, seen: list[str], name: str, after_s: float, service_s: float = 1.0
) -> None:
    """Ask for a slot of session `name[0]` after `after_s`, note `name` when admitted, and
    hold the slot for `service_s`."""
    await asyncio.sleep(after_s)
    slot = await adm.acquire(name[0])
    seen.append(name)
    await asyncio.sleep(service_s)
    slot.release(Outcome())


async def test_limit_enforced_and_fifo_order() -> None:
    adm = Admission("r", FixedLimit(2))
    order: list[int] = []

    async def call(i: int) -> None:
        slot = await adm.acquire("s")
        order.append(i)
        await asyncio.sleep(0.01)
        assert adm.in_flight <= 2
        slot.release(Outcome())

    await asyncio.gather(*(call(i) for i in range(10)))
    assert order == list(range(10))
    assert adm.stats() == {
        "limit": 2,
        "in_flight": 0,
        "queued": 0,
        "admitted": 10,
        "failed": 0,
        "cancelled": 0,
        "peak_in_flight": 2,
    }


async def test_release_is_idempotent() -> None:
    adm = Admission("r", FixedLimit(1))
    slot = await adm.acquire()
    assert slot.release(Outcome("error")) is True
    assert slot.release(Outcome("ok")) is False
    assert adm.in_flight == 0 and adm.failed == 1


async def test_cancelled_waiter_leaves_the_queue() -> None:
    adm = Admission("r", FixedLimit(1))
    held = await adm.acquire("a")
    waiters = [asyncio.create_task(adm.acquire("b")) for _ in range(5)]
    await asyncio.sleep(0)
    assert adm.queued == 5
    for task in waiters[:4]:
        task.cancel()
    await asyncio.gather(*waiters[:4], return_exceptions=True)
    assert adm.queued == 1
    held.release(Outcome())
    slot = await waiters[4]
    assert adm.in_flight == 1 and adm.queued == 0
    slot.release(Outcome())
    assert adm.in_flight == 0


async def test_cancel_in_the_same_instant_as_the_grant_returns_the_slot() -> None:
    adm = Admission("r", FixedLimit(1))
    held = await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    held.release(Outcome())  # grants the waiter's future...
    waiter.cancel()  # ...and the task is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.in_flight == 0 and adm.cancelled == 1


@pytest.mark.looptime
async def test_las_lets_a_late_session_through_a_flood() -> None:
    ledger = ServiceLedger()
    adm = Admission("coder", FixedLimit(4), LasOrder(ledger), ledger)
    loop = asyncio.get_running_loop()

    async def call(session: str, service_s: float) -> float:
        asked = loop.time()
        slot = await adm.acquire(session)
        waited = loop.time() - asked
        await asyncio.sleep(service_s)
        slot.release(Outcome())
        return waited

    flood = [asyncio.create_task(call("A", 1.0)) for _ in range(500)]
    await asyncio.sleep(10.0)
    assert adm.queued > 400
    late = await call("B", 1.0)
    assert late <= 1.0  # next free slot: B has attained nothing
    await asyncio.gather(*flood)
    assert adm.in_flight == 0 and adm.queued == 0


@pytest.mark.parametrize(
    ("order", "admitted"),
    [
        # C's first call goes first; then A came before B: A's next call before B's.
        ("oldest", ["A1", "B1", "C1", "A2", "B2"]),
        ("fifo", ["A1", "B1", "B2", "A2", "C1"]),  # by when each call asked
        ("las", ["A1", "B1", "C1", "B2", "A2"]),  # C has attained nothing; B2 waited longer
    ],
)
@pytest.mark.looptime
async def test_the_oldest_order_lets_the_earlier_session_finish_first(
    order: str, admitted: list[str]
) -> None:
    ledger = ServiceLedger()
    adm = Admission("reasoning", FixedLimit(1), make_order(order, ledger), ledger)
    seen: list[str] = []
    # A1 runs 0-1 s, B1 (asked at 0.5 s) 1-2 s; B2, A2 and C1 ask at 1.1, 1.2 and 1.3 s.
    asks = [("A1", 0.0), ("B1", 0.5), ("B2", 1.1), ("A2", 1.2), ("C1", 1.3)]
    await asyncio.gather(*(_call(adm, seen, name, after_s) for name, after_s in asks))
    assert seen == admitted
    assert adm.in_flight == 0 and adm.queued == 0


@pytest.mark.looptime
async def test_a_session_that_waited_past_the_idle_window_keeps_its_arrival() -> None:
    # agentic-long under the oldest order: a session's review waited at the router for
    # longer than the idle window with none of its calls running; admitted, it was taken
    # for a new arrival, and its next call queued behind every younger session.
    ledger = ServiceLedger()
    adm = Admission("reasoning", FixedLimit(1), make_order("oldest", ledger), ledger)
    seen: list[str] = []

    # A1 runs 0-1 s, B0 (asked at 0.1 s) 1-2 s; C1 (asked at 0.5 s) holds the slot for three
    # idle windows from 2 s; A2 (asked at 1.2 s) waits behind it with nothing of A running,
    # B1 asks at 5 s; A2 goes next (A arrived first) and A3 asks while A2 runs, so A3 and B1
    # wait together.
    hold = 3 * SESSION_IDLE_S
    await asyncio.gather(
        _call(adm, seen, "A1", 0.0),
        _call(adm, seen, "B0", 0.1),
        _call(adm, seen, "C1", 0.5, hold),
        _call(adm, seen, "A2", 1.2),
        _call(adm, seen, "B1", 5.0),
        _call(adm, seen, "A3", 2.5 + hold),
    )
    assert seen == ["A1", "B0", "C1", "A2", "A3", "B1"]
    assert adm.in_flight == 0 and adm.queued == 0


@pytest.mark.looptime
async def test_only_a_sessions_first_call_goes_ahead_in_the_oldest_order() -> None:
    # C asks two calls while the slot is taken: C1 is its first and goes ahead of A2; C2 is
    # not, though it became C's head before C1's admission was on the ledger.
    ledger = ServiceLedger()
    adm = Admission("reasoning", FixedLimit(1), make_order("oldest", ledger), ledger)
    seen: list[str] = []
    asks = [("A1", 0.0), ("A2", 0.2), ("C1", 0.5), ("C2", 0.6)]
    await asyncio.gather(*(_call(adm, seen, name, after_s) for name, after_s in asks))
    assert seen == ["A1", "C1", "A2", "C2"]
    assert adm.in_flight == 0 and adm.queued == 0


@pytest.mark.looptime
async def test_fifo_makes_the_late_session_wait_behind_the_flood() -> None:
    adm = Admission("coder", FixedLimit(4))
    loop = asyncio.get_running_loop()

    async def call(session: str) -> float:
        asked = loop.time()
        slot = await adm.acquire(session)
        waited = loop.time() - asked
        await asyncio.sleep(1.0)
        slot.release(Outcome())
        return waited

    flood = [asyncio.create_task(call("A")) for _ in range(100)]
    await asyncio.sleep(5.0)
    assert await call("B") >= 15.0
    await asyncio.gather(*flood)


@pytest.mark.looptime
async def test_las_aging_bounds_the_wait_of_a_heavy_session() -> None:
    # Heavy session H has attained lots of service; a stream of fresh light sessions
    # keeps arriving. Aging (and the hard bound) still admits H's waiting call.
    ledger = ServiceLedger()
    order = LasOrder(ledger, aging_rate=1.0, max_wait_s=30.0)
    adm = Admission("coder", FixedLimit(2), order, ledger)
    loop = asyncio.get_running_loop()
    ledger.begin("H", 0.0)
    ledger.end("H", 0.0, 1000.0)  # 1000 slot-seconds attained

    async def light(i: int) -> None:
        slot = await adm.acquire(f"L{i}")
        try:
            await asyncio.sleep(1.0)
        finally:
            slot.release(Outcome())

    lights: list[asyncio.Task[None]] = []

    async def stream() -> None:
        for i in range(400):
            lights.append(asyncio.create_task(light(i)))
            await asyncio.sleep(0.4)  # more demand than 2 slots of 1 s can serve

    feeder = asyncio.create_task(stream())
    await asyncio.sleep(5.0)
    asked = loop.time()
    slot = await adm.acquire("H")
    waited = loop.time() - asked
    slot.release(Outcome())
    assert waited <= 31.0
    feeder.cancel()
    for task in lights:
        task.cancel()
    await asyncio.gather(feeder, *lights, return_exceptions=True)
    assert adm.in_flight == 0 and adm.queued == 0
