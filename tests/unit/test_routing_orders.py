"""The wait orders' indexed picks agree with their rank definitions, under any history."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routing.limits import FixedLimit
from routing.orders import (
    SESSION_IDLE_S,
    FifoOrder,
    LasOrder,
    OldestOrder,
    ServiceLedger,
    Waiter,
    make_order,
)
from routing.shared_admission import SharedAdmission

SESSIONS = [f"s{i}" for i in range(6)]

# (op, session index, quarter-seconds): times are multiples of 0.25 s, so every rank is
# exact in binary floating point and ties are real ties.
ops = st.lists(
    st.tuples(
        st.sampled_from(["wait", "pick", "begin", "end", "cancel", "tick"]),
        st.integers(0, len(SESSIONS) - 1),
        st.integers(0, 40),
    ),
    min_size=40,
    max_size=160,
)


class _Queues:
    """Per-session FIFO queues in front of an order, as `Admission` keeps them."""

    def __init__(self, order: FifoOrder | LasOrder | OldestOrder) -> None:
        self.order = order
        self.queues: dict[str, deque[Waiter]] = {}
        self.seq = itertools.count()
        self.loop = asyncio.new_event_loop()

    def wait(self, session_id: str, now: float) -> None:
        waiter = Waiter(session_id, now, next(self.seq), self.loop.create_future())
        queue = self.queues.setdefault(session_id, deque())
        queue.append(waiter)
        if len(queue) == 1:
            self.order.set_head(session_id, waiter)

    def pop_head(self, session_id: str) -> Waiter:
        queue = self.queues[session_id]
        waiter = queue.popleft()
        self.order.set_head(session_id, queue[0] if queue else None)
        if not queue:
            del self.queues[session_id]
        return waiter

    def heads(self) -> list[Waiter]:
        return [q[0] for q in self.queues.values()]


def _replay(
    history: list[tuple[str, int, int]],
    queues: _Queues,
    ledger: ServiceLedger,
    pick: Callable[[float], str],
    on_arrival: Callable[[str, float], object] = lambda session_id, now: None,
) -> None:
    """Play `history` on `queues` and `ledger`; `pick(now)` checks and returns each pick.

    `on_arrival` hears each session's asks and its calls admitted elsewhere.
    """
    running: dict[str, list[float]] = {s: [] for s in SESSIONS}
    now = 0.0
    for op, index, quarters in history:
        session_id = SESSIONS[index]
        if op == "tick":
            now += quarters / 4
        elif op == "wait":
            on_arrival(session_id, now)
            queues.wait(session_id, now)
        elif op == "begin":  # a call admitted elsewhere (another replica)
            on_arrival(session_id, now)
            ledger.begin(session_id, now)
            running[session_id].append(now)
        elif op == "end" and running[session_id]:
            ledger.end(session_id, running[session_id].pop(0), now)
        elif op == "cancel" and session_id in queues.queues:
            queues.pop_head(session_id)
        elif op == "pick" and queues.queues:
            picked = pick(now)
            assert queues.pop_head(picked).session_id == picked
            ledger.begin(picked, now)  # admitted: its line changes while others wait
            running[picked].append(now)
    queues.loop.close()


@settings(max_examples=200, deadline=None)
@given(ops, st.sampled_from([1.0, 0.5, 2.0]), st.sampled_from([5.0, 60.0]))
def test_las_pick_is_the_lowest_rank(
    history: list[tuple[str, int, int]], aging_rate: float, max_wait_s: float
) -> None:
    ledger = ServiceLedger()
    order = LasOrder(ledger, aging_rate=aging_rate, max_wait_s=max_wait_s)
    queues = _Queues(order)

    def pick(now: float) -> str:
        best = min(order.key(h, now) for h in queues.heads())
        picked = order.pick(now)
        assert order.key(queues.queues[picked][0], now) == best
        return picked

    _replay(history, queues, ledger, pick)


@settings(max_examples=100, deadline=None)
@given(ops)
def test_fifo_pick_is_the_oldest_head(history: list[tuple[str, int, int]]) -> None:
    order = FifoOrder()
    queues = _Queues(order)
    for op, index, _ in history:
        session_id = SESSIONS[index]
        if op == "wait":
            queues.wait(session_id, 0.0)
        elif op == "cancel" and session_id in queues.queues:
            queues.pop_head(session_id)
        elif op == "pick" and queues.queues:
            oldest = min(h.seq for h in queues.heads())
            assert queues.pop_head(order.pick(0.0)).seq == oldest
    queues.loop.close()


def test_las_index_stays_small_under_many_line_changes() -> None:
    ledger = ServiceLedger()
    order = LasOrder(ledger)
    queues = _Queues(order)
    for i, session_id in enumerate(SESSIONS):
        queues.wait(session_id, float(i))
    for t in range(10_000):  # calls of the waiting sessions start and end elsewhere
        session_id = SESSIONS[t % len(SESSIONS)]
        ledger.begin(session_id, float(t))
        ledger.end(session_id, float(t), t + 0.5)
    entries = sum(len(heap) for heap in order._by_slope.values())
    assert entries <= 4 * len(SESSIONS) + 64
    assert order.pick(10_000.0) in SESSIONS
    queues.loop.close()


@settings(max_examples=200, deadline=None)
@given(ops)
def test_oldest_pick_is_the_head_of_the_session_that_arrived_first(
    history: list[tuple[str, int, int]],
) -> None:
    ledger = ServiceLedger(idle_s=math.inf)  # the idle rule: its own test below
    order = OldestOrder(ledger)
    queues = _Queues(order)
    first_ask: dict[str, float] = {}
    admitted: set[str] = set()  # sessions with a call admitted, here or elsewhere
    first_call: dict[int, bool] = {}  # per head: its session had none admitted when it led

    set_head, begin = order.set_head, ledger.begin

    def on_head(session_id: str, head: Waiter | None) -> None:
        if head is not None:
            first_call[head.seq] = session_id not in admitted
        set_head(session_id, head)

    def on_begin(session_id: str, now: float, asked_at: float | None = None) -> None:
        admitted.add(session_id)
        begin(session_id, now, asked_at)

    order.set_head = on_head  # type: ignore[method-assign]
    ledger.begin = on_begin  # type: ignore[method-assign]

    def pick(now: float) -> str:
        heads = {h.session_id: h for h in queues.heads()}
        expected = min(
            heads,
            key=lambda s: (not first_call[heads[s].seq], first_ask[s], heads[s].seq),
        )
        assert order.pick(now) == expected
        return expected

    _replay(
        history, queues, ledger, pick, lambda session_id, now: first_ask.setdefault(session_id, now)
    )


def test_a_session_idle_past_the_window_arrives_anew() -> None:
    ledger = ServiceLedger()
    assert ledger.arrived("s", 0.0) == 0.0
    ledger.begin("s", 1.0)
    assert ledger.arrived("s", 500.0) == 0.0  # a call still running: the same activity
    ledger.end("s", 1.0, 520.0)
    assert ledger.arrived("s", 520.0 + SESSION_IDLE_S) == 0.0  # back within the window
    later = 520.0 + 3 * SESSION_IDLE_S
    assert ledger.arrived("s", later) == later


def test_the_oldest_order_is_refused_where_redis_ranks_the_waiters() -> None:
    with pytest.raises(ValueError, match="order 'oldest' is not available with a shared"):
        SharedAdmission("coder@0", FixedLimit(4), url="redis://127.0.0.1:1/0", order="oldest")
    with pytest.raises(ValueError, match=r"unknown order 'sjf'.*fifo, las, oldest"):
        make_order("sjf", ServiceLedger())


def test_the_ledger_forgets_idle_sessions_but_not_running_ones() -> None:
    """A long-running router keeps no account per session it ever served: an account with no
    call running or touched for `forget_after_s` goes, and its session starts afresh."""
    ledger = ServiceLedger(forget_after_s=100.0)
    ledger.begin("done", 0.0)
    ledger.end("done", 0.0, 10.0)
    ledger.begin("running", 5.0)
    ledger.begin("recent", 60.0)
    ledger.end("recent", 60.0, 70.0)
    assert ledger.sessions == 3
    ledger.begin("new", 120.0)  # "done" last touched 110 s ago
    assert ledger.sessions == 3
    assert ledger.attained("done", 120.0) == 0.0
    assert ledger.attained("running", 120.0) == pytest.approx(115.0)
    assert ledger.attained("recent", 120.0) == pytest.approx(10.0)
    assert ledger.arrived("done", 130.0) == 130.0  # back: a new arrival
