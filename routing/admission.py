"""Per-replica admission: enforce a limit, queue the rest in a pluggable order.

One `Admission` per replica, shared by every graph run in the process. The limit comes
from a `routing.limits.Limit`; the order among waiters from a `routing.orders.WaitOrder`.
Every slot is given back exactly once (`Slot.release` is idempotent). A slot carries its
call's stage and admission time: a limit that projects the calls in flight
(`routing.limits.InFlightWatcher`) is told their ages and stages before each scrape.

Prefix hold (`prefix_hold_s`): a session's calls share a long prompt prefix (the coders of
one plan), and a server computes a shared prefix once only for requests admitted after the
first one's prefill: requests scheduled in the same engine step each compute it. So while a
session has a call on this replica whose first token has not come back (its prefix leader)
and none past its first token, its other calls are held back, at most `prefix_hold_s` each,
then queued in the usual order. Only the transport knows when a first token arrives: it
calls `Slot.first_token`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass
from typing import Literal, Protocol

from routing.calls import current_call
from routing.limits import InFlightWatcher, Limit, OutputCapped, Sample, ServerWatcher
from routing.orders import FifoOrder, ServiceLedger, Waiter, WaitOrder
from routing.vllm_metrics import ServerSnapshot

_HOT = "hot"
_WARMING = "warming"
# Longest wait behind a prefix leader: about one busy prefill, short of a decode phase.
PREFIX_HOLD_S = 2.0

OutcomeKind = Literal["ok", "error", "dropped", "cancelled"]


@dataclass(frozen=True)
class Outcome:
    """How a call ended and what the router measured.

    Attributes:
        kind: ok; error (a failure that says nothing about load); dropped (429/503 or a
            timeout: overload); cancelled (the caller went away).
        ttft_s: Time to the first body chunk of a streamed answer.
        itl_s: Mean inter-token latency of a streamed answer.
        tpot_s: End-to-end time per output token of a non-streamed answer.
    """

    kind: OutcomeKind = "ok"
    ttft_s: float | None = None
    itl_s: float | None = None
    tpot_s: float | None = None


class AdmissionObserver(Protocol):
    """Where an admission reports its state (the metrics exporter)."""

    def on_state(self, limit: int, in_flight: int, queued: int) -> None:
        """Limit, in-flight or queue length changed."""
        ...

    def on_admit(self, waited_s: float) -> None:
        """A call got a slot after waiting `waited_s`."""
        ...

    def on_release(self, outcome: Outcome) -> None:
        """A call gave its slot back."""
        ...


class Slot:
    """A held admission slot; `release` gives it back once, later calls are no-ops."""

    __slots__ = (
        "_admission",
        "_area_at_admit",
        "admitted_at",
        "kind",
        "prefix",
        "released",
        "session_id",
        "waited_s",
    )

    def __init__(
        self,
        admission: Admission,
        session_id: str,
        admitted_at: float,
        waited_s: float,
        area_at_admit: float = 0.0,
        kind: str = "-",
    ) -> None:
        self._admission = admission
        self.kind = kind
        self._area_at_admit = area_at_admit
        self.session_id = session_id
        self.admitted_at = admitted_at
        self.waited_s = waited_s
        self.released = False
        # Prefix hold: "warming" until the first token, then "hot"; None when not tracked.
        self.prefix: str | None = None

    def first_token(self) -> None:
        """The server has computed this call's prompt: its first token arrived."""
        if self.prefix == _WARMING and not self.released:
            self._admission._first_token(self)

    def release(self, outcome: Outcome) -> bool:
        """Give the slot back. Returns False when it was already given back."""
        if self.released:
            return False
        self.released = True
        self._admission._release(self, outcome)
        return True


class Admission:
    """Enforces one replica's limit, shared by all sessions.

    Args:
        name: Replica name, for errors and stats.
        limit: The limit algorithm.
        order: The order among waiters (FIFO by default).
        ledger: Service accounts shared with the LAS order.
        observer: Metrics sink.
        prefix_hold_s: Longest a call waits behind its session's prefix leader (None: no
            prefix hold; see the module docstring).
    """

    def __init__(
        self,
        name: str,
        limit: Limit,
        order: WaitOrder | None = None,
        ledger: ServiceLedger | None = None,
        observer: AdmissionObserver | None = None,
        prefix_hold_s: float | None = None,
    ) -> None:
        self.name = name
        self.limit_algorithm = limit
        self.order: WaitOrder = order or FifoOrder()
        self.ledger = ledger or ServiceLedger()
        self.observer = observer
        self._queues: dict[str, deque[Waiter]] = {}
        self._queued = 0
        self._in_flight = 0
        # Their admission times age the limit's projection. A dict, not a set: slots hash by
        # identity, and a set's order (memory addresses) would reach the projection's ties.
        self._holders: dict[Slot, None] = {}
        self._kinds: dict[int, str] = {}  # waiter seq -> its call's stage
        self._seq = itertools.count()
        self._area = 0.0  # integral of in_flight over loop time, for per-call averages
        self._area_at: float | None = None
        self.admitted = 0
        self.failed = 0
        self.cancelled = 0
        self.peak_in_flight = 0
        self.prefix_hold_s = prefix_hold_s
        self.prefix_held = 0  # calls held behind a prefix leader, ever
        self._prefix: dict[str, dict[str, int]] = {_WARMING: {}, _HOT: {}}  # session -> calls
        self._held: dict[str, deque[Waiter]] = {}
        self._held_count = 0
        self._hold_timers: dict[str, asyncio.TimerHandle] = {}
        # Sessions with a hot prefix here and calls queued: they go first (see `_pick`).
        self._hot_waiting: dict[str, None] = {}

    @property
    def limit(self) -> int:
        """The current limit."""
        return max(1, self.limit_algorithm.limit)

    @property
    def in_flight(self) -> int:
        """Calls holding a slot."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Calls waiting for a slot (held behind a prefix leader included)."""
        return self._queued + self._held_count

    @property
    def outstanding(self) -> int:
        """In flight plus queued."""
        return self._in_flight + self.queued

    async def acquire(self, session_id: str = "-", max_tokens: int | None = None) -> Slot:
        """Wait for a slot; a caller cancelled while queued leaves the queue cleanly.

        The call's stage (`routing.calls.current_call`) goes with its slot: the limit keeps
        call sizes per stage, and is told the call's output cap (`max_tokens`), if any.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        info = current_call.get()
        kind = info.stage if info is not None else "-"
        if max_tokens is not None and isinstance(self.limit_algorithm, OutputCapped):
            self.limit_algorithm.note_output_cap(kind, max_tokens)
        hold = self._holds(session_id)
        if not hold and self._queued == 0 and self._in_flight < self.limit:
            return self._admit(session_id, now, now, kind)
        waiter = Waiter(session_id, now, next(self._seq), loop.create_future())
        self._kinds[waiter.seq] = kind
        if hold:
            self._hold(waiter)
        else:
            self._enqueue(waiter)
        self._notify()
        try:
            slot: Slot = await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                # Granted in the same instant as the cancellation: hand it on.
                waiter.future.result().release(Outcome("cancelled"))
            else:
                self._forget(waiter)
                self._dispatch()
            raise
        return slot

    def on_snapshot(self, snapshot: ServerSnapshot) -> None:
        """Feed a `/metrics` scrape to a limit that reads the server; admit whoever now fits."""
        now = asyncio.get_running_loop().time()
        if isinstance(self.limit_algorithm, InFlightWatcher):
            calls = [(now - s.admitted_at, s.kind) for s in self._holders]
            self.limit_algorithm.set_in_flight(calls)
        if isinstance(self.limit_algorithm, ServerWatcher):
            self.limit_algorithm.on_snapshot(snapshot, now)
        self._dispatch()
        self._notify()

    def stats(self) -> dict[str, int]:
        """Limit, in_flight, queued, admitted, failed, cancelled, peak_in_flight."""
        return {
            "limit": self.limit,
            "in_flight": self._in_flight,
            "queued": self._queued,
            "admitted": self.admitted,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "peak_in_flight": self.peak_in_flight,
        }

    def _enqueue(self, waiter: Waiter) -> None:
        queue = self._queues.setdefault(waiter.session_id, deque())
        queue.append(waiter)
        if len(queue) == 1:
            self.order.set_head(waiter.session_id, waiter)
        self._queued += 1
        if waiter.session_id in self._prefix[_HOT]:
            self._hot_waiting[waiter.session_id] = None

    def _holds(self, session_id: str) -> bool:
        """Whether a call of `session_id` arriving now waits for its prefix leader."""
        if self.prefix_hold_s is None:
            return False
        return session_id in self._prefix[_WARMING] and session_id not in self._prefix[_HOT]

    def _hold(self, waiter: Waiter) -> None:
        waiter.held = True
        self.prefix_held += 1
        session_id = waiter.session_id
        self._held.setdefault(session_id, deque()).append(waiter)
        self._held_count += 1
        if session_id not in self._hold_timers and self.prefix_hold_s is not None:
            self._hold_timers[session_id] = asyncio.get_running_loop().call_later(
                self.prefix_hold_s, self._hold_expired, session_id
            )

    def _unhold(self, session_id: str) -> None:
        """Queue `session_id`'s held calls in the usual order."""
        timer = self._hold_timers.pop(session_id, None)
        if timer is not None:
            timer.cancel()
        for waiter in self._held.pop(session_id, ()):
            self._held_count -= 1
            if not waiter.future.done():
                self._enqueue(waiter)

    def _hold_expired(self, session_id: str) -> None:
        self._hold_timers.pop(session_id, None)
        self._unhold(session_id)
        self._dispatch()
        self._notify()

    def _lead_prefix(self, slot: Slot) -> None:
        """A slot granted: its call warms its session's prefix until its first token."""
        if self.prefix_hold_s is not None:
            slot.prefix = _WARMING
            self._count(_WARMING, slot.session_id, +1)

    def _prefix_ended(self, slot: Slot) -> None:
        """A slot given back: its call no longer warms or holds its session's prefix."""
        if slot.prefix is not None:
            self._count(slot.prefix, slot.session_id, -1)
            if not self._holds(slot.session_id):
                self._unhold(slot.session_id)  # the leader ended without a first token

    def _goes_first(self, session_id: str, cap: int) -> bool:
        """Whether the session's prefix is hot here and its calls hold fewer than `cap`
        slots (half the limit, see `_pick`)."""
        hot = self._prefix[_HOT].get(session_id, 0)
        return hot > 0 and hot + self._prefix[_WARMING].get(session_id, 0) < cap

    def _count(self, state: str, session_id: str, delta: int) -> None:
        counts = self._prefix[state]
        n = counts.get(session_id, 0) + delta
        if n > 0:
            counts[session_id] = n
        else:
            counts.pop(session_id, None)

    def _first_token(self, slot: Slot) -> None:
        slot.prefix = _HOT
        self._count(_WARMING, slot.session_id, -1)
        self._count(_HOT, slot.session_id, +1)
        if slot.session_id in self._queues:
            self._hot_waiting[slot.session_id] = None
        if slot.session_id in self._held:
            self._unhold(slot.session_id)
            self._dispatch()
            self._notify()

    def _forget(self, waiter: Waiter) -> None:
        self._kinds.pop(waiter.seq, None)
        held = self._held.get(waiter.session_id)
        if held is not None and waiter in held:
            held.remove(waiter)
            self._held_count -= 1
            if not held:
                self._held.pop(waiter.session_id)
                timer = self._hold_timers.pop(waiter.session_id, None)
                if timer is not None:
                    timer.cancel()
            self._notify()
            return
        queue = self._queues.get(waiter.session_id)
        if queue is None:
            return
        was_head = queue[0] is waiter
        try:
            queue.remove(waiter)
        except ValueError:
            return
        self._queued -= 1
        if was_head:
            self.order.set_head(waiter.session_id, queue[0] if queue else None)
        if not queue:
            del self._queues[waiter.session_id]
        self._notify()

    def _account(self, now: float) -> None:
        if self._area_at is not None:
            self._area += self._in_flight * (now - self._area_at)
        self._area_at = now

    def _admit(self, session_id: str, now: float, enqueued_at: float, kind: str = "-") -> Slot:
        self._account(now)
        self._in_flight += 1
        self.admitted += 1
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        self.ledger.begin(session_id, now, enqueued_at)
        slot = Slot(self, session_id, now, now - enqueued_at, self._area, kind)
        self._holders[slot] = None
        self._lead_prefix(slot)
        if self.observer is not None:
            self.observer.on_admit(slot.waited_s)
            self.observer.on_state(self.limit, self._in_flight, self.queued)
        return slot

    def _release(self, slot: Slot, outcome: Outcome) -> None:
        now = asyncio.get_running_loop().time()
        self._account(now)
        self._in_flight -= 1
        self._holders.pop(slot, None)
        self.ledger.end(slot.session_id, slot.admitted_at, now)
        self._prefix_ended(slot)
        if outcome.kind in ("error", "dropped"):
            self.failed += 1
        elif outcome.kind == "cancelled":
            self.cancelled += 1
        if outcome.kind in ("ok", "dropped"):
            held = now - slot.admitted_at
            in_flight = (
                (self._area - slot._area_at_admit) / held
                if held > 0
                else float(self._in_flight + 1)
            )
            self.limit_algorithm.on_sample(
                Sample(
                    at=now,
                    in_flight=in_flight,
                    ok=outcome.kind == "ok",
                    dropped=outcome.kind == "dropped",
                    ttft_s=outcome.ttft_s,
                    itl_s=outcome.itl_s,
                    tpot_s=outcome.tpot_s,
                    service_s=held,
                    kind=slot.kind,
                )
            )
        if self.observer is not None:
            self.observer.on_release(outcome)
        self._dispatch()
        self._notify()

    def _dispatch(self) -> None:
        if not self._queued:
            return
        now = asyncio.get_running_loop().time()
        while self._queued and self._in_flight < self.limit:
            session_id = self._pick(now)
            queue = self._queues[session_id]
            waiter = queue.popleft()
            self._queued -= 1
            slot: Slot | None = None
            if waiter.future.done():  # cancelled but not yet forgotten
                self._kinds.pop(waiter.seq, None)
            elif not waiter.held and self._holds(session_id):
                self._hold(waiter)  # its session's leader was admitted ahead of it
            else:
                kind = self._kinds.pop(waiter.seq, "-")
                slot = self._admit(session_id, now, waiter.enqueued_at, kind)
            # The next head is ranked after this call's admission is on the ledger: the
            # oldest order would take a session's second call for its first.
            self.order.set_head(session_id, queue[0] if queue else None)
            if not queue:
                del self._queues[session_id]
            if slot is not None:
                waiter.future.set_result(slot)

    def _pick(self, now: float) -> str:
        """A session whose prefix is hot here goes first, while it holds fewer than half the
        slots; then the order's pick.

        Its calls share the prompt prefix of the call running (a review's chunks, a plan's
        coders) and end a stage together: admitted now, they find the prefix in the cache
        and the session moves on sooner. The cap keeps a session with many calls (a flood)
        to half the replica, where the order ranks it as usual.
        """
        cap = max(1, self.limit // 2)
        stale: list[str] = []
        chosen: str | None = None
        for session_id in self._hot_waiting:
            if session_id not in self._queues or session_id not in self._prefix[_HOT]:
                stale.append(session_id)  # its queue emptied or its prefix went cold
            elif self._goes_first(session_id, cap):
                chosen = session_id
                break
        for session_id in stale:
            del self._hot_waiting[session_id]
        return chosen if chosen is not None else self.order.pick(now)

    def _notify(self) -> None:
        if self.observer is not None:
            self.observer.on_state(self.limit, self._in_flight, self.queued)
