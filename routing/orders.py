"""Who is admitted next when a replica is full: FIFO, program-aware LAS with aging, or the
oldest session first.

Waiters queue per session (FIFO within a session); an order ranks the sessions' heads.
LAS (least attained service, per session, as in Autellix's program-level scheduling)
favours sessions that have held fewer GPU slot-seconds so far, so a short session's calls
overtake a long session's flood. Aging lowers a waiter's rank by `aging_rate` per second
waited, and anything that has waited `max_wait_s` goes first in FIFO order: nobody starves.

Picking the next session costs O(log n) in the number of waiting sessions, not a scan:
a session's LAS rank is a line in time, attained(t) - aging_rate * (t - enqueued_at) =
intercept + (active calls - aging_rate) * t, so heads are kept in one heap per slope (per
count of calls the session has running), keyed by intercept; the ledger tells the order
when a session's line changes. A pick compares the tops of the few slope heaps.

Oldest session first ranks heads by when their session arrived (its first call at any
replica, shared through the ledger), so sessions tend to finish in the order they came; a
session's first call goes ahead of them all, so that a late session starts at once.
Where sessions are about the same size, LAS serves them all about equally and they all
finish near the end; this order can lower mean session latency there, at some cost in
makespan (docs/benchmark.md has the measured trade). It has no flood protection: a session
with many calls holds the replica until its calls are through.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args


@dataclass(eq=False)
class Waiter:
    """One queued request."""

    session_id: str
    enqueued_at: float
    seq: int
    future: asyncio.Future[Any] = field(repr=False)
    # Held once already behind its session's prefix leader (see `Admission`): never again.
    held: bool = False


# A session with no call running or ending for this long arrives anew at its next call
# (a thread continued later does not keep its first arrival).
SESSION_IDLE_S = 60.0
# The ledger drops the account of a session with no call running or touched for this long,
# so that a long-running router does not keep one for every session it ever served; such a
# session starts afresh (no service attained) if it comes back.
FORGET_AFTER_S = 3600.0


@dataclass
class _Account:
    done_s: float = 0.0
    active: int = 0
    start_sum: float = 0.0
    arrived_at: float | None = None  # when its current activity began (oldest-first order)
    touched_at: float = 0.0  # its last call admitted, ended, or asked for
    admitted: int = 0  # calls admitted since `arrived_at`


class ServiceLedger:
    """Slot-seconds of service each session has attained, across all replicas (one clock),
    and when each session arrived.

    Args:
        idle_s: A session with no call running, admitted, ended or asked for in this long
            arrives anew at its next call.
        forget_after_s: A session with no call running, admitted, ended or asked for in
            this long is forgotten (looked for at most four times per this period).
    """

    def __init__(
        self, *, idle_s: float = SESSION_IDLE_S, forget_after_s: float = FORGET_AFTER_S
    ) -> None:
        self.idle_s = idle_s
        self.forget_after_s = forget_after_s
        self._accounts: dict[str, _Account] = {}
        self._watchers: list[Callable[[str], None]] = []
        self._sweep_at = -math.inf

    @property
    def sessions(self) -> int:
        """Sessions with an account."""
        return len(self._accounts)

    def _sweep(self, now: float) -> None:
        """Forget the sessions idle for `forget_after_s`; O(sessions), once in a while."""
        if now < self._sweep_at:
            return
        self._sweep_at = now + self.forget_after_s / 4
        horizon = now - self.forget_after_s
        stale = [
            session_id
            for session_id, acc in self._accounts.items()
            if acc.active == 0 and acc.touched_at < horizon
        ]
        for session_id in stale:
            del self._accounts[session_id]
            self._changed(session_id)

    def watch(self, on_change: Callable[[str], None]) -> None:
        """Call `on_change(session_id)` whenever that session's account changes."""
        self._watchers.append(on_change)

    def begin(self, session_id: str, now: float, asked_at: float | None = None) -> None:
        """A call of `session_id`, asked for at `asked_at` (default `now`), was admitted at
        `now`.

        Whether the session arrives anew is judged when the call asked: a session whose call
        waits in a queue is not idle, however long the wait.
        """
        self._sweep(now)
        acc = self._accounts.setdefault(session_id, _Account())
        self._arrive(acc, now if asked_at is None else asked_at)
        acc.touched_at = max(acc.touched_at, now)
        acc.admitted += 1
        acc.active += 1
        acc.start_sum += now
        self._changed(session_id)

    def end(self, session_id: str, started_at: float, now: float) -> None:
        """A call admitted at `started_at` gave its slot back at `now`."""
        acc = self._accounts.setdefault(session_id, _Account())
        acc.active -= 1
        acc.start_sum -= started_at
        acc.done_s += max(0.0, now - started_at)
        acc.touched_at = max(acc.touched_at, now)
        self._changed(session_id)

    def arrived(self, session_id: str, now: float) -> float:
        """When `session_id` arrived: the first time it asked for a slot (at `now` or before),
        on any replica, unless it has since been idle for more than `idle_s`; then it
        arrives anew at `now`."""
        return self.arrival(session_id, now)[0]

    def arrival(self, session_id: str, now: float) -> tuple[float, bool]:
        """(When `session_id` arrived, as `arrived`; whether none of its calls has been
        admitted since.)"""
        acc = self._accounts.setdefault(session_id, _Account())
        return self._arrive(acc, now), acc.admitted == 0

    def _arrive(self, acc: _Account, now: float) -> float:
        if acc.arrived_at is None or (acc.active == 0 and now - acc.touched_at > self.idle_s):
            acc.arrived_at = now
            acc.admitted = 0
        acc.touched_at = max(acc.touched_at, now)
        return acc.arrived_at

    def attained(self, session_id: str, now: float) -> float:
        """Service so far, counting calls still running up to `now`."""
        active, base = self.line(session_id)
        return base + active * now

    def line(self, session_id: str) -> tuple[int, float]:
        """(calls running, base): attained service at time t is base + calls running * t."""
        acc = self._accounts.get(session_id)
        if acc is None:
            return 0, 0.0
        return acc.active, acc.done_s - acc.start_sum

    def _changed(self, session_id: str) -> None:
        for on_change in self._watchers:
            on_change(session_id)


class WaitOrder(Protocol):
    """Ranks the sessions' queue heads; `pick` names the session admitted next."""

    def set_head(self, session_id: str, head: Waiter | None) -> None:
        """`head` is now the oldest waiter of `session_id` (None: it has no waiter left)."""
        ...

    def pick(self, now: float) -> str:
        """The session whose head goes next (at least one session has a head)."""
        ...


class FifoOrder:
    """First come, first served across all sessions."""

    def __init__(self) -> None:
        self._heads: dict[str, Waiter] = {}
        self._heap: list[tuple[int, str]] = []

    def set_head(self, session_id: str, head: Waiter | None) -> None:
        """Track the session's head by arrival."""
        if head is None:
            self._heads.pop(session_id, None)
            return
        self._heads[session_id] = head
        heapq.heappush(self._heap, (head.seq, session_id))

    def pick(self, now: float) -> str:
        """The session whose head arrived first."""
        heap = self._heap
        while True:
            seq, session_id = heap[0]
            head = self._heads.get(session_id)
            if head is not None and head.seq == seq:
                return session_id
            heapq.heappop(heap)  # that head has left


class LasOrder:
    """Least attained service per session, with aging and a hard wait bound.

    Args:
        ledger: Shared service accounts (program-level: all replicas, all roles).
        aging_rate: Slot-seconds of attained service forgiven per second waited.
        max_wait_s: A waiter older than this goes first (FIFO among such waiters).
    """

    def __init__(
        self, ledger: ServiceLedger, *, aging_rate: float = 1.0, max_wait_s: float = 60.0
    ) -> None:
        self.ledger = ledger
        self.aging_rate = aging_rate
        self.max_wait_s = max_wait_s
        self._heads: dict[str, Waiter] = {}
        self._stamp_of: dict[str, int] = {}  # the live heap entry of each waiting session
        self._by_slope: dict[float, list[tuple[float, int, str, int]]] = {}
        self._by_age: list[tuple[float, int, str]] = []
        self._entries = 0
        self._stamps = itertools.count()
        ledger.watch(self._line_changed)

    def key(self, head: Waiter, now: float) -> tuple[float, float, int]:
        """The rank `pick` minimises: (starving first, attained - aging_rate * waited, arrival)."""
        waited = now - head.enqueued_at
        if waited >= self.max_wait_s:
            return (0.0, head.enqueued_at, head.seq)
        attained = self.ledger.attained(head.session_id, now)
        return (1.0, attained - self.aging_rate * waited, head.seq)

    def set_head(self, session_id: str, head: Waiter | None) -> None:
        """Index the session's new head (or forget the session)."""
        if head is None:
            self._heads.pop(session_id, None)
            self._stamp_of.pop(session_id, None)
            return
        self._heads[session_id] = head
        heapq.heappush(self._by_age, (head.enqueued_at, head.seq, session_id))
        self._push(session_id, head)

    def pick(self, now: float) -> str:
        """The starving head that waited longest, else the lowest LAS rank."""
        age = self._by_age
        while not self._is_head(age[0][2], age[0][1]):
            heapq.heappop(age)
        if now - age[0][0] >= self.max_wait_s:
            return age[0][2]
        best: tuple[float, int, str] | None = None
        for slope in list(self._by_slope):
            heap = self._by_slope[slope]
            while heap and self._stamp_of.get(heap[0][2]) != heap[0][3]:
                heapq.heappop(heap)
                self._entries -= 1
            if not heap:
                del self._by_slope[slope]
                continue
            intercept, seq, session_id, _ = heap[0]
            candidate = (intercept + slope * now, seq, session_id)
            if best is None or candidate < best:
                best = candidate
        assert best is not None, "pick() with no session waiting"
        return best[2]

    def _is_head(self, session_id: str, seq: int) -> bool:
        head = self._heads.get(session_id)
        return head is not None and head.seq == seq

    def _line_changed(self, session_id: str) -> None:
        head = self._heads.get(session_id)
        if head is not None:
            self._push(session_id, head)

    def _push(self, session_id: str, head: Waiter) -> None:
        active, base = self.ledger.line(session_id)
        stamp = next(self._stamps)
        self._stamp_of[session_id] = stamp
        entry = (base + self.aging_rate * head.enqueued_at, head.seq, session_id, stamp)
        heapq.heappush(self._by_slope.setdefault(active - self.aging_rate, []), entry)
        self._entries += 1
        bound = 4 * len(self._heads) + 64
        if self._entries > bound or len(self._by_age) > bound:
            self._compact()

    def _compact(self) -> None:
        """Drop superseded entries, so the heaps stay O(waiting sessions)."""
        for slope, heap in list(self._by_slope.items()):
            live = [e for e in heap if self._stamp_of.get(e[2]) == e[3]]
            if live:
                heapq.heapify(live)
                self._by_slope[slope] = live
            else:
                del self._by_slope[slope]
        self._entries = sum(len(h) for h in self._by_slope.values())
        self._by_age = [e for e in self._by_age if self._is_head(e[2], e[1])]
        heapq.heapify(self._by_age)


class OldestOrder:
    """The head of the session that arrived first (`ServiceLedger.arrived`), then by arrival;
    a session's first call ahead of them all.

    A new session's first call (its plan) waiting behind every older session's calls starts
    the new session's whole chain late: on heavy (16 sessions arriving over 120 s) that
    made this order's makespan 9.4% longer than FIFO's (428.3 s against 391.5 s, 3 seeds),
    and 1.6% with first calls first (397.8 s), its mean latency still 8% below FIFO's
    (252.8 s against 275.8 s; bench/results/heavy.txt).

    Args:
        ledger: Shared accounts: a session's arrival is the same on every replica.
    """

    def __init__(self, ledger: ServiceLedger) -> None:
        self.ledger = ledger
        self._heads: dict[str, Waiter] = {}
        self._heap: list[tuple[int, float, int, str]] = []

    def key(self, head: Waiter) -> tuple[int, float, int]:
        """The rank `pick` minimises: (0 for a session's first call, else 1; the session's
        arrival; the head's arrival)."""
        arrived, first = self.ledger.arrival(head.session_id, head.enqueued_at)
        return (0 if first else 1, arrived, head.seq)

    def set_head(self, session_id: str, head: Waiter | None) -> None:
        """Index the session's new head by its session's arrival (or forget the session)."""
        if head is None:
            self._heads.pop(session_id, None)
            return
        self._heads[session_id] = head
        heapq.heappush(self._heap, (*self.key(head), session_id))
        if len(self._heap) > 4 * len(self._heads) + 64:
            self._heap = [e for e in self._heap if self._is_head(e[3], e[2])]
            heapq.heapify(self._heap)

    def pick(self, now: float) -> str:
        """A waiting session's first call, else the session that arrived first."""
        heap = self._heap
        while not self._is_head(heap[0][3], heap[0][2]):
            heapq.heappop(heap)  # that head has left
        return heap[0][3]

    def _is_head(self, session_id: str, seq: int) -> bool:
        head = self._heads.get(session_id)
        return head is not None and head.seq == seq


OrderName = Literal["fifo", "las", "oldest"]
ORDERS: tuple[str, ...] = get_args(OrderName)
# Orders a shared Redis budget can rank by (a session's arrival is per process).
SHARED_ORDERS = ("fifo", "las")


def make_order(name: str, ledger: ServiceLedger) -> WaitOrder:
    """ "fifo", "las" or "oldest".

    Raises:
        ValueError: an unknown order.
    """
    if name == "fifo":
        return FifoOrder()
    if name == "las":
        return LasOrder(ledger)
    if name == "oldest":
        return OldestOrder(ledger)
    raise ValueError(f"unknown order {name!r}: use one of {', '.join(ORDERS)}")
