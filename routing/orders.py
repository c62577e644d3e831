"""Who is admitted next when a replica is full: FIFO, or program-aware LAS with aging.

Waiters queue per session (FIFO within a session); an order ranks the sessions' heads.
LAS (least attained service, per session, as in Autellix's program-level scheduling)
favours sessions that have held fewer GPU slot-seconds so far, so a short session's calls
overtake a long session's flood. Aging lowers a waiter's rank by `aging_rate` per second
waited, and anything that has waited `max_wait_s` goes first in FIFO order: nobody starves.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(eq=False)
class Waiter:
    """One queued request."""

    session_id: str
    enqueued_at: float
    seq: int
    future: asyncio.Future[Any] = field(repr=False)


@dataclass
class _Account:
    done_s: float = 0.0
    active: int = 0
    start_sum: float = 0.0


class ServiceLedger:
    """Slot-seconds of service each session has attained, across all replicas (one clock)."""

    def __init__(self) -> None:
        self._accounts: dict[str, _Account] = {}

    def begin(self, session_id: str, now: float) -> None:
        """A call of `session_id` was admitted at `now`."""
        acc = self._accounts.setdefault(session_id, _Account())
        acc.active += 1
        acc.start_sum += now

    def end(self, session_id: str, started_at: float, now: float) -> None:
        """A call admitted at `started_at` gave its slot back at `now`."""
        acc = self._accounts.setdefault(session_id, _Account())
        acc.active -= 1
        acc.start_sum -= started_at
        acc.done_s += max(0.0, now - started_at)

    def attained(self, session_id: str, now: float) -> float:
        """Service so far, counting calls still running up to `now`."""
        acc = self._accounts.get(session_id)
        if acc is None:
            return 0.0
        return acc.done_s + acc.active * now - acc.start_sum


class WaitOrder(Protocol):
    """Ranks session queue heads; the lowest key is admitted next."""

    def key(self, head: Waiter, now: float) -> tuple[float, float, int]:
        """Rank of `head` (the oldest waiter of its session) at `now`."""
        ...


class FifoOrder:
    """First come, first served across all sessions."""

    def key(self, head: Waiter, now: float) -> tuple[float, float, int]:
        """Arrival order."""
        return (0.0, 0.0, head.seq)


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

    def key(self, head: Waiter, now: float) -> tuple[float, float, int]:
        """(starving first, attained - aging_rate * waited, arrival)."""
        waited = now - head.enqueued_at
        if waited >= self.max_wait_s:
            return (0.0, head.enqueued_at, head.seq)
        attained = self.ledger.attained(head.session_id, now)
        return (1.0, attained - self.aging_rate * waited, head.seq)


def make_order(name: str, ledger: ServiceLedger) -> WaitOrder:
    """ "fifo" or "las".

    Raises:
        ValueError: an unknown order.
    """
    if name == "fifo":
        return FifoOrder()
    if name == "las":
        return LasOrder(ledger)
    raise ValueError(f"unknown order {name!r}: use fifo or las")
