"""Concurrency limit algorithms: each decides a replica's limit from samples, enforcing nothing.

As in Netflix concurrency-limits, a `Limit` is fed one `Sample` per completed request;
`routing.admission.Admission` enforces whatever it says. A limit that also reads the server
is a `ServerWatcher` (fed `/metrics` snapshots), may be `KvBounded` (told the KV cache
size) and an `InFlightWatcher` (told the age and stage of each call it admitted); the
router and the admission check for those pieces, not for a class.

`AdaptiveLimit` is a gradient (Vegas-like) limit on inter-token latency. Decode steps grow
roughly linearly with batch size, ITL(b) = a + c*b, so throughput b/ITL(b) keeps rising but
its elasticity d ln X / d ln b = a / ITL(b) = ITL_floor / ITL falls: holding ITL below
`itl_tolerance` x its floor is growing "while throughput still improves enough".

Two kinds of saturation. Compute: a queue inside vLLM, seen at every scrape for
`burst_drain_s`, while its KV cache has room (but not a burst of prompts that its prefill
clears within `burst_drain_s`), 429/503, timeouts; these back off multiplicatively, and a
stale or failed scrape counts as this kind, never as idle. KV: a full cache, preemptions, or
a queue that has not emptied since a preemption (the preempted sequence waits at its head
for blocks); the server then runs what fits and queues the rest for blocks, which it hands
out exactly as sequences end. That is the KV bound's to answer: sequences grow until they
end, so it projects the calls in flight from their ages and the sizes recent calls of their
stage reached, and admits what fits at the cache's coming peak. Before a call of a kind has
ended, its cap (`max_tokens`) says how far it may grow, and the projection holds it at that;
without one, nothing says how far calls grow: the bound then divides by the sizes seen now,
and a full cache backs off as compute saturation does.
"""

from __future__ import annotations

import bisect
import math
import re
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from routing.vllm_metrics import ServerSnapshot

UNLIMITED = 1_000_000
# Before a call of a kind has ended, a call of it is taken at this share of its output cap.
# The whole cap (TGI's reservation by max total tokens) let agentic-long's first wave of plans
# run at half the batch the reasoning GPU's cache holds (adaptive's makespan 1,850 s against
# 1,760 s at 0.5, mean over seeds 0-2); no prior let it admit 16 plans that then overfilled
# it. 0.5 (the mean length if lengths were spread evenly up to the cap) held 7 of its 16
# plans back until the first ended: with review on auto, where that first wave sets the
# makespan, 0.4 gives 882.8 s against 969.5 s on seeds 0-2 and 730.3 s against 912.9 s on
# seeds 3-5, kept aside to check it; with review on reasoning 1,683.6 against 1,660.1 s and
# 1,614.3 against 1,617.2 s. vLLM preempts by recompute, so a first wave a little too large
# costs a prefill, not the work done.
CAP_PRIOR_FRACTION = 0.4
# Admission times this close are the same moment (they are worked out from ages).
_SAME_S = 1e-6

ServerState = Literal["unknown", "spare", "hold", "saturated"]


@dataclass(frozen=True)
class Sample:
    """One completed request, as the router saw it.

    Attributes:
        at: Loop time at completion.
        in_flight: Time-averaged router in-flight count on the replica while it ran.
        ok: The server answered successfully.
        dropped: The server shed it (429/503) or it timed out: an overload signal.
        ttft_s: Time to the first body chunk of a streamed answer.
        itl_s: Mean time between tokens of a streamed answer.
        tpot_s: End-to-end time per output token of a non-streamed answer.
        service_s: Time from admission to completion.
        kind: What sort of call it was (the workflow stage), for sizes kept per kind.
    """

    at: float
    in_flight: float
    ok: bool = True
    dropped: bool = False
    ttft_s: float | None = None
    itl_s: float | None = None
    tpot_s: float | None = None
    service_s: float | None = None
    kind: str = "-"


class Limit(Protocol):
    """A concurrency limit algorithm: what every limit does."""

    @property
    def limit(self) -> int:
        """The current limit (at least 1)."""
        ...

    def on_sample(self, sample: Sample) -> None:
        """Learn from one completed request."""
        ...


@runtime_checkable
class ServerWatcher(Protocol):
    """A limit that also reads the server's `/metrics`: the router scrapes only for these."""

    def watch_server(self, now: float, stale_after_s: float) -> None:
        """Scrapes start now; from here on, a missing or old snapshot means saturated."""
        ...

    def on_snapshot(self, snapshot: ServerSnapshot, now: float) -> None:
        """Learn from one scrape of the server's `/metrics` (failed scrapes included)."""
        ...


@runtime_checkable
class KvBounded(Protocol):
    """A limit bounded by the server's KV cache, once the router has read its size."""

    def set_kv_capacity(self, tokens: int) -> None:
        """The server's KV capacity in tokens (`cache_config_info`: blocks x block size)."""
        ...


@runtime_checkable
class OutputCapped(Protocol):
    """A limit told each call's output cap (`max_tokens`) at admission, per kind of call."""

    def note_output_cap(self, kind: str, max_tokens: int) -> None:
        """A call of `kind` may generate up to `max_tokens` tokens."""
        ...


@runtime_checkable
class InFlightWatcher(Protocol):
    """A limit that projects the calls holding its slots: the admission says how old they are."""

    def set_in_flight(self, calls: Sequence[tuple[float, str]]) -> None:
        """(age, kind) of each call holding a slot; given before each snapshot."""
        ...


class FixedLimit:
    """A constant limit (`fixed-N`); `FixedLimit(UNLIMITED)` is "unlimited"."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a fixed limit must be >= 1, not {n}")
        self._n = n

    @property
    def limit(self) -> int:
        """The configured limit."""
        return self._n

    def on_sample(self, sample: Sample) -> None:
        """Ignored."""


class _LatencyTrack:
    """A latency signal: the floor (lowest recent median) and the recent median."""

    def __init__(self, window: int) -> None:
        self._recent: deque[float] = deque(maxlen=window)
        self.floor: float | None = None

    def add(self, value: float) -> None:
        if value <= 0 or not math.isfinite(value):
            return
        self._recent.append(value)
        # The floor is a minimum of medians, so one lucky sample cannot set it.
        if len(self._recent) >= min(5, self._recent.maxlen or 5):
            median = statistics.median(self._recent)
            self.floor = median if self.floor is None else min(self.floor, median)

    def gradient(self, tolerance: float) -> float | None:
        """min(1, tolerance*floor/recent), or None before the floor is known."""
        if self.floor is None or not self._recent:
            return None
        return min(1.0, tolerance * self.floor / statistics.median(self._recent))


@dataclass
class _CallSize:
    """Moving means over one kind of call: tokens generated, seconds holding a slot."""

    output_tokens: float
    service_s: float


def _through(age: float, size: _CallSize) -> float:
    """How far through its output a call of this size is at `age` (a capped one: all the way)."""
    return 1.0 if size.service_s <= 0 else min(1.0, age / size.service_s)


class _CallSizeTrack:
    """What the calls in flight will hold in the KV cache at its peak, projected by age.

    Completed calls say how long a call holds its slot (`service_s`) and how many tokens it
    generates in that time (`1 + (service - ttft) / itl`, or `service / tpot`): moving means
    over about `window` calls of each kind (the workflow stage: a replica that serves long
    plans and long-prompt reviews sees a mix whose mean fits neither), and over all calls
    for a kind not seen to end yet. A call in flight is `age / service` of the way through
    its output, both counted from admission. The prompt's share is what the cache holds
    beyond the running calls' output: the gauge counts a shared prefix once, which no
    prompt length can say.

    A kind not yet seen to end, whose calls carry an output cap (`max_tokens`), is taken at
    `CAP_PRIOR_FRACTION` of its cap, held from admission: the first wave of long calls,
    where nothing else says how far they grow, cannot be admitted on the sizes they have
    when young and then overfill the cache as they grow.
    """

    def __init__(self, window: int) -> None:
        self._weight = 1.0 / window
        self._sizes: dict[str, _CallSize] = {}
        self._all: _CallSize | None = None
        self._caps: dict[str, int] = {}  # the largest output cap seen per kind
        self.prompt_tokens: float | None = None  # KV per running call beyond its output

    def note_cap(self, kind: str, max_tokens: int) -> None:
        if max_tokens > 0:
            self._caps[kind] = max(max_tokens, self._caps.get(kind, 0))

    def _size(self, kind: str) -> _CallSize | None:
        """The kind's mean size; else its cap, held from admission (`service_s` 0); else
        the mean over all kinds."""
        if (size := self._sizes.get(kind)) is not None:
            return size
        if (cap := self._caps.get(kind)) is not None:
            return _CallSize(CAP_PRIOR_FRACTION * cap, 0.0)
        return self._all

    def add_call(self, sample: Sample) -> None:
        if sample.service_s is None or sample.service_s <= 0:
            return
        if sample.itl_s is not None and sample.itl_s > 0 and sample.ttft_s is not None:
            tokens = 1.0 + max(0.0, sample.service_s - sample.ttft_s) / sample.itl_s
        elif sample.tpot_s is not None and sample.tpot_s > 0:
            tokens = sample.service_s / sample.tpot_s
        else:
            return
        self._all = self._mean(self._all, tokens, sample.service_s)
        self._sizes[sample.kind] = self._mean(
            self._sizes.get(sample.kind), tokens, sample.service_s
        )

    def longest_service_s(self) -> float | None:
        """The longest mean time a kind of call holds its slot, or None before any ended."""
        return max((size.service_s for size in self._sizes.values()), default=None)

    def _mean(self, old: _CallSize | None, tokens: float, service_s: float) -> _CallSize:
        if old is None:
            return _CallSize(tokens, service_s)
        w = self._weight
        return _CallSize(
            old.output_tokens + w * (tokens - old.output_tokens),
            old.service_s + w * (service_s - old.service_s),
        )

    def fitting(
        self,
        calls: Sequence[tuple[float, str]],
        used_tokens: float,
        running: int,
        room_tokens: float,
        generated: Sequence[float] | None = None,
    ) -> float | None:
        """How many calls fit in `room_tokens` at the cache's peak, those in flight included.

        `calls` are (age, kind) of the calls in flight; the `running` oldest are the server's
        running sequences, which hold `used_tokens`. Each call is projected to grow through
        its kind's mean output, then end; fresh calls are of the youngest call's kind. The
        peak comes now or just before some call ends: at each such moment, what the calls
        still running hold leaves room for so many fresh calls, each as far into its output.

        The prompt's share is what the running calls hold beyond their output so far:
        `generated` (tokens per call in `calls`, by the server's counter) says how much that
        is; without it, each is taken to be `age / service` through its output.

        Returns:
            Calls in flight plus fresh calls that fit (fewer than in flight when those
            overfill it); None while a call in flight is of a kind with neither a call
            ended nor a cap.
        """
        order = sorted(range(len(calls)), key=lambda i: calls[i][0])  # youngest first
        by_age = [calls[i] for i in order]
        known = [self._size(kind) for _, kind in by_age]
        new = known[0] if known else self._all
        if new is None or any(size is None for size in known):
            return None  # a kind with neither a call ended nor a cap: nothing says how far
        sizes = [size for size in known if size is not None]
        ages = [age for age, _ in by_age]
        held_now = range(max(0, len(ages) - running), len(ages))
        if running > 0 and len(held_now) > 0:
            # A capped call's output so far is unknown: counting none of it leaves more to
            # the prompt, the cautious side.
            output_now = sum(
                min(sizes[i].output_tokens, generated[order[i]])
                if generated is not None
                else sizes[i].output_tokens * _through(ages[i], sizes[i])
                for i in held_now
                if sizes[i].service_s > 0
            )
            # Sequences that others admitted (the server may have several clients) are
            # taken to be like ours.
            per_sequence = used_tokens / running
            self.prompt_tokens = max(0.0, per_sequence - output_now / len(held_now))
        prompt = self.prompt_tokens
        if prompt is None:
            return None
        fresh = room_tokens / (prompt + new.output_tokens)  # once every call now has ended
        # The moments the cache may peak: now, and just before each call ends. A call still
        # running at `moment` holds prompt + output x (age + moment) / service, so what all
        # of them hold is `base + moment x rate`, summed from the last to end backwards. A
        # capped call holds its cap from admission and is not counted on to end.
        ending = sorted(
            (
                (max(0.0, size.service_s - age) if size.service_s > 0 else math.inf, age, size)
                for age, size in zip(ages, sizes, strict=True)
            ),
            key=lambda item: item[0],
            reverse=True,
        )
        base = rate = 0.0
        for i, (end, age, size) in enumerate(ending):
            base += prompt + size.output_tokens * _through(age, size)
            if 0 < end < math.inf:
                rate += size.output_tokens / size.service_s
            if i + 1 < len(ending) and ending[i + 1][0] == end:
                continue  # the calls ending together are all still held just before
            grown = end * rate if rate else 0.0  # before any ending call: capped ones only
            one = prompt + new.output_tokens * _through(end, new)
            fresh = min(fresh, (room_tokens - base - grown) / max(1.0, one))
        if not ending or ending[-1][0] > 0:
            fresh = min(fresh, (room_tokens - base) / max(1.0, prompt))  # now
        # Negative `fresh`: the calls in flight already overfill it by about that many.
        return max(0.0, len(ages) + fresh)


class _TokenClock:
    """The tokens each call in flight has generated, by the server's own counter.

    vLLM decodes one token per running sequence per step, so between two scrapes each
    sequence in the batch gained (generation tokens counted) / (sequences running). The
    server's running sequences are taken to be the oldest calls in flight, as the KV
    projection takes them (vLLM preempts the newest, or the lowest priority): a call queued
    or preempted inside the server gains nothing while it waits.

    Why not by age: a call `age / service` through its output decodes at the pace recent
    calls had. In a batch larger than theirs it decodes slower, its output so far is
    overcounted, and the prompt inferred from the KV gauge shrinks: on a scripted cache that
    was halved and restored (tests/unit/test_limit_recovery.py), from 1,000 tokens to about
    440, and the KV bound let in 25 calls where 12 fit (17 preemptions).
    """

    def __init__(self) -> None:
        self._last: ServerSnapshot | None = None
        # (interval start, end, tokens per running sequence, admission time of the youngest
        # call that ran): one per scrape interval, back to the oldest call in flight.
        self._intervals: deque[tuple[float, float, float, float]] = deque()

    def read(self, snap: ServerSnapshot, admitted: Sequence[float]) -> list[float] | None:
        """Take one scrape; the tokens generated by the calls in flight, admitted at
        `admitted` (any order), in that order; None while the counter has not moved since
        they began (a server without it, or one idle so far)."""
        order = sorted(range(len(admitted)), key=lambda i: admitted[i])  # oldest first
        oldest_first = [admitted[i] for i in order]
        self._observe(snap, oldest_first)
        if not any(per_sequence > 0 for _, _, per_sequence, _ in self._intervals):
            return None
        out = [0.0] * len(admitted)
        for i, tokens in zip(order, self._generated(oldest_first), strict=True):
            out[i] = tokens
        return out

    def _observe(self, snap: ServerSnapshot, admitted: Sequence[float]) -> None:
        """One scrape; `admitted`: admission times of the calls in flight, oldest first."""
        if not snap.ok:
            return  # the next interval spans the failed scrape
        last, self._last = self._last, snap
        if last is None or snap.generation_tokens_total < last.generation_tokens_total:
            self._intervals.clear()  # a new server process: its counters started again
            return
        running = (snap.running + last.running) / 2
        if snap.taken_at <= last.taken_at or running <= 0:
            return
        per_sequence = (snap.generation_tokens_total - last.generation_tokens_total) / running
        ran = int(snap.running)
        if ran <= 0:
            youngest = -math.inf
        else:
            youngest = admitted[ran - 1] if ran <= len(admitted) else math.inf
        self._intervals.append((last.taken_at, snap.taken_at, per_sequence, youngest))
        oldest = admitted[0] if admitted else snap.taken_at
        while self._intervals and self._intervals[0][1] < oldest:
            self._intervals.popleft()

    def _generated(self, admitted: Sequence[float]) -> list[float]:
        """Tokens generated by calls admitted at `admitted` (oldest first), in that order.

        An interval counts whole for the calls admitted before it began and ran in it, in
        part for those admitted during it, and not at all for those that waited.
        """
        whole = [0.0] * (len(admitted) + 1)  # added to every call before an index
        out = [0.0] * len(admitted)
        for start, end, per_sequence, youngest in self._intervals:
            ran = bisect.bisect_right(admitted, youngest + _SAME_S)
            begun = bisect.bisect_right(admitted, start)  # the calls admitted before it
            whole[min(ran, begun)] += per_sequence
            for i in range(begun, ran):
                if admitted[i] >= end:
                    break
                out[i] += per_sequence * (end - admitted[i]) / (end - start)
        carried = 0.0
        for i in range(len(admitted) - 1, -1, -1):
            carried += whole[i + 1]
            out[i] += carried
        return out


class AdaptiveLimit:
    """Slow start, then a gradient limit on router-seen ITL/TTFT, bounded by the server's KV.

    Defaults are deployment-independent: latency targets are ratios to each replica's own
    observed floor, the server signals are relative (waiting > 0, KV near full), and the KV
    bound is the server's own capacity over what its sequences hold at the coming peak,
    projected from the calls' ages and the sizes recent calls reached (before any call
    has ended, over the size of the sequences it holds now).

    Phases:
        slow start: double the limit once per scrape (and add one per busy completion) while
            the limit is in use, the server shows no saturation and ITL stays within
            `slow_start_itl_tolerance` x its floor. A burst reaches a useful limit in a few
            seconds; the first congestion signal ends slow start for good.
        steady: Gradient2-style moves toward `limit * gradient + sqrt(limit)`.

    Args:
        initial: Starting limit.
        min_limit: The limit never goes below this.
        max_limit: ... nor above this.
        itl_tolerance: Target ITL as a multiple of its floor (the knee).
        ttft_tolerance: Target TTFT as a multiple of its floor (server-side queueing); used
            only when the server's own gauges are not read (see `_ttft_counts`).
        slow_start_itl_tolerance: Slow start ends once ITL passes this multiple of its floor.
        smoothing: Weight of each new estimate (Gradient2's smoothing).
        min_gradient: The most one sample may shrink the estimate by.
        backoff: Multiplicative decrease on an overload signal.
        backoff_cooldown_s: At most one back-off per this many seconds (gauges lag).
        kv_hold: KV usage at which growth stops.
        kv_fill: The fill the KV bound's projection aims at, at the cache's projected peak.
            Above `kv_hold`: the peak is a projection from mean sizes, and a cache whose
            projected peak is 90% full sits well below that most of the time. Probes of
            2026-11-27 (3 seeds, with a queue counted after `burst_drain_s`): heavy 395.8,
            395.9, 392.1, 391.1, 388.5 and 392.5 s at 95, 96, 97, 98, 99 and 100%;
            agentic-long 1,695.3 s at 95% and 1,660.1 s at 99% (28-32 preemptions a run
            against 12-23; fixed-8 has 42). A preemption costs a recompute, and the
            emulator charges it; a cache left empty costs more on these workloads. On the
            scripted cache that is halved and restored (tests/unit/test_limit_recovery.py)
            99% preempts 4 times in the 210 s after the halving and 4 in the 300 s after
            the restore (95%: 2 and 3), while serving 34 and 69 calls (30 and 65).
        kv_saturated: KV usage at which the server counts as saturated (no growth; the KV
            bound, not a back-off, answers it).
        window: Samples in the recent-latency median.
        max_growth_per_s: Growth cap per second (as a fraction) after slow start, so that
            the limit cannot outrun the server's gauges between two scrapes.
        burst_drain_s: A queue counts once it has been seen at every scrape for this many
            seconds (see `_queue_reference`), and then only if the server's prefill, at the
            rate it prefilled over that time, would take longer than this to clear it (see
            `_prefill_burst`).
    """

    def __init__(
        self,
        *,
        initial: int = 16,
        min_limit: int = 2,
        max_limit: int = 1024,
        itl_tolerance: float = 2.5,
        ttft_tolerance: float = 10.0,
        slow_start_itl_tolerance: float = 2.0,
        smoothing: float = 0.2,
        min_gradient: float = 0.5,
        backoff: float = 0.75,
        backoff_cooldown_s: float = 3.0,
        kv_hold: float = 0.90,
        kv_fill: float = 0.99,
        kv_saturated: float = 0.97,
        window: int = 16,
        max_growth_per_s: float = 0.25,
        burst_drain_s: float = 2.0,
    ) -> None:
        if not 1 <= min_limit <= initial <= max_limit:
            raise ValueError("need 1 <= min_limit <= initial <= max_limit")
        self._estimate = float(initial)
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.itl_tolerance = itl_tolerance
        self.ttft_tolerance = ttft_tolerance
        self.slow_start_itl_tolerance = slow_start_itl_tolerance
        self.smoothing = smoothing
        self.min_gradient = min_gradient
        self.backoff = backoff
        self.backoff_cooldown_s = backoff_cooldown_s
        self.kv_hold = kv_hold
        self.kv_fill = kv_fill
        self.kv_saturated = kv_saturated
        self.max_growth_per_s = max_growth_per_s
        self.burst_drain_s = burst_drain_s
        self.slow_start = True
        self.kv_capacity_tokens: int | None = None
        self._kv_bound: float | None = None
        self._growth_from = (-math.inf, float(initial))  # (since, estimate then)
        self._itl = _LatencyTrack(window)
        self._tpot = _LatencyTrack(window)
        self._ttft = _LatencyTrack(window)
        self._sizes = _CallSizeTrack(window)
        self._in_flight_calls: Sequence[tuple[float, str]] | None = None
        self._tokens = _TokenClock()
        self._projecting = False  # the KV bound came from the projection
        self._last_in_flight = 0.0
        self._last_backoff_at = -math.inf
        self._watch_since: float | None = None
        self._stale_after_s = math.inf
        self._snapshot: ServerSnapshot | None = None
        self._previous: ServerSnapshot | None = None
        # The ok scrapes since the server's queue was last seen empty (or a scrape failed),
        # the oldest first: the queue rule reads them back `burst_drain_s` (see
        # `_queue_reference`).
        self._queued: deque[ServerSnapshot] = deque()
        # The server's queue has not emptied since a preemption at this time (see
        # `_kv_pressure`); None: it has, or no preemption was seen.
        self._queue_since_preemption: float | None = None

    @property
    def limit(self) -> int:
        """The current limit: the estimate, never above what the KV cache holds."""
        value = self._estimate if self._kv_bound is None else min(self._estimate, self._kv_bound)
        return max(self.min_limit, min(self.max_limit, int(value)))

    @property
    def estimate(self) -> float:
        """The unrounded limit estimate (before the KV bound)."""
        return self._estimate

    @property
    def kv_bound(self) -> float | None:
        """Calls that fit in `kv_fill` of the KV cache at its projected peak (in `kv_hold` of
        it at the sizes seen now, before the projection can be made)."""
        return self._kv_bound

    def set_kv_capacity(self, tokens: int) -> None:
        """The server's KV capacity in tokens (`cache_config_info`: blocks x block size)."""
        self.kv_capacity_tokens = tokens if tokens > 0 else None

    def watch_server(self, now: float, stale_after_s: float) -> None:
        """Scrapes start now; a snapshot older than `stale_after_s` then means saturated."""
        self._watch_since = now
        self._stale_after_s = stale_after_s

    def server_state(self, now: float) -> ServerState:
        """What the last scrape says: spare, hold (no growth), saturated, or unknown."""
        if self._watch_since is None:
            return "unknown"
        snap = self._snapshot
        if snap is None:
            # Give the first scrape its chance before calling the server saturated.
            return "hold" if now - self._watch_since <= self._stale_after_s else "saturated"
        if not snap.ok or now - snap.taken_at > self._stale_after_s:
            return "saturated"
        if self._preempted_since_last_scrape():
            return "saturated"
        # A queue seen once can be a burst waiting for its prefill chunks; one seen at every
        # scrape for `burst_drain_s` and not shorter is a queue, unless prefill clears it fast.
        ref = self._queue_reference()
        if ref is not None and snap.waiting >= ref.waiting and not self._prefill_burst(snap, ref):
            return "saturated"
        if snap.kv_usage is not None and snap.kv_usage >= self.kv_saturated:
            return "saturated"
        if snap.waiting > 0 or (snap.kv_usage is not None and snap.kv_usage >= self.kv_hold):
            return "hold"
        return "spare"

    def _preempted_since_last_scrape(self) -> bool:
        """Whether the server's preemption counter rose between the last two ok scrapes."""
        snap, prev = self._snapshot, self._previous
        return (
            snap is not None
            and prev is not None
            and prev.ok
            and snap.preemptions_total > prev.preemptions_total
        )

    def _queue_reference(self) -> ServerSnapshot | None:
        """The scrape the queue rule compares the last one with, if the queue lasted that long.

        The latest scrape at least `burst_drain_s` before the last (the one before it, when
        scrapes are further apart), with the server's queue non-empty at it and at every
        scrape since: `on_snapshot` keeps `_queued` pruned so that this is its first entry.
        A single prompt of 14k tokens takes a 32B server on an H100 about two seconds to
        prefill, and no prefill ends between two scrapes a second apart: on the seed's
        three sessions (seed-calibrated-multi, seed 1) four such reviews queued at once
        read as a compute queue at the second scrape and cut the limit from 16 to 3.
        """
        if len(self._queued) < 2:
            return None
        first, last = self._queued[0], self._queued[-1]
        return first if last.taken_at - first.taken_at >= self.burst_drain_s else None

    def _prefill_burst(self, snap: ServerSnapshot, prev: ServerSnapshot) -> bool:
        """Whether the server's queue is prompts its prefill clears within `burst_drain_s`.

        The queue's prompts are taken to be of the mean size the server has prefilled
        (`vllm:prompt_tokens_total` over the TTFT histogram's count), cleared at the prompt
        tokens per second it prefilled since `prev` (the queue rule's reference scrape). On
        the seed's own three sessions (seed-calibrated-multi, seed 0) review calls of about
        14k prompt tokens reach the 32B server together: its queue grows from 1 to 2 over
        two scrapes while it prefills 13,800 tokens a second, and reading that as compute
        cut the limit from 16 to 3 for the rest of the run. A server whose decodes fill its
        step's token budget prefills slowly, and its queue still counts.
        """
        seconds = snap.taken_at - prev.taken_at
        prefilled = snap.prompt_tokens_total - prev.prompt_tokens_total
        if seconds <= 0 or prefilled <= 0 or snap.ttft_count <= 0:
            return False  # no prefill since (or a restarted server's counters): a queue
        mean_prompt = snap.prompt_tokens_total / snap.ttft_count
        return snap.waiting * mean_prompt / (prefilled / seconds) <= self.burst_drain_s

    def _kv_pressure(self, now: float) -> bool:
        """Whether a fresh scrape puts the saturation on the KV cache, not on compute.

        A cache at `kv_hold` or more, or preemptions (vLLM preempts only for blocks), means
        the server holds as many sequences as fit and queues the rest for blocks, which it
        hands out exactly as they free. So does a queue that has not emptied since a
        preemption, with the cache below `kv_hold`: vLLM puts a preempted sequence back at
        the head of its queue and admits nothing past it until its blocks are free (on
        `heavy`, a 14k-token review waited 8 s beside 19% of the cache, and backing off for
        it as for a compute queue cut the limit from 12 to 7 for a minute). The sequences
        holding the blocks end within a call's life: a queue that outlasts the longest time
        recent calls held their slots, with no preemption since, is compute again. A KV
        bound that projects the calls in flight already sizes the limit to what fits;
        cutting the estimate as well would leave blocks idle once the sequences end.
        Without the projection (no call has ended yet, or no ages from the admission) the
        bound sees only present sizes, and the back-off stays.
        """
        snap = self._snapshot
        if not self._projecting:
            return False  # a bound from the sizes seen now cannot see them grow: back off
        if snap is None or not snap.ok or now - snap.taken_at > self._stale_after_s:
            return False
        preempted = self._preempted_since_last_scrape()
        waiting_for_blocks = False
        if (since := self._queue_since_preemption) is not None and snap.waiting > 0:
            life = self._sizes.longest_service_s()
            waiting_for_blocks = life is None or now - since <= life
        full = snap.kv_usage is not None and snap.kv_usage >= self.kv_hold
        return preempted or waiting_for_blocks or full

    def on_snapshot(self, snapshot: ServerSnapshot, now: float) -> None:
        """Keep the scrape; bound by KV, back off when saturated, double in slow start."""
        last = self._snapshot
        if snapshot.ok and last is not None and last.ok:
            self._previous = last
            if snapshot.preemptions_total > last.preemptions_total:
                self._queue_since_preemption = now
            elif snapshot.waiting <= 0:
                self._queue_since_preemption = None
        elif not snapshot.ok:
            self._previous = None
            self._queue_since_preemption = None  # nothing known about the queue
        if snapshot.ok and snapshot.waiting > 0:
            # Drop the oldest while the next is old enough to be the reference itself.
            self._queued.append(snapshot)
            while len(self._queued) > 2 and (
                snapshot.taken_at - self._queued[1].taken_at >= self.burst_drain_s
            ):
                self._queued.popleft()
        else:
            self._queued.clear()
        self._snapshot = snapshot
        if snapshot.ok:
            self._update_kv_bound(snapshot, now)
        state = self.server_state(now)
        if state == "saturated":
            self.slow_start = False
            if not self._kv_pressure(now):
                # The server's own count is the load now (a sample's is an average over a
                # call that may have started long before), but it also counts other clients'
                # requests: back off from no more than this router holds (the calls the
                # admission reports, else the last sample's count).
                loads = [snapshot.running + snapshot.waiting] if snapshot.ok else []
                held = len(self._in_flight_calls or ())
                if held > 0:
                    loads.append(held)
                elif self._last_in_flight > 0:
                    loads.append(self._last_in_flight)
                self._back_off(now, min(loads, default=None))
            return
        busy = max(snapshot.running + snapshot.waiting, self._last_in_flight) >= self._estimate / 2
        if self.slow_start and state == "spare" and busy and self._latency_ok():
            self._slow_start_grow(now, self._estimate * 2)

    def _slow_start_grow(self, now: float, value: float) -> None:
        # At most a doubling per second, completions and scrapes together: the server's
        # gauges need a scrape or two to show the queue an overshoot would cause.
        since, base = self._growth_from
        if now - since >= 1.0:
            since, base = self._growth_from = (now, self._estimate)
        self._grow_to(min(value, 2 * base))

    def set_in_flight(self, calls: Sequence[tuple[float, str]]) -> None:
        """(age, kind) of each call holding a slot; given before each snapshot."""
        self._in_flight_calls = list(calls)

    def note_output_cap(self, kind: str, max_tokens: int) -> None:
        """A call of `kind` may generate up to `max_tokens`: its size until one such ends."""
        self._sizes.note_cap(kind, max_tokens)

    def _update_kv_bound(self, snap: ServerSnapshot, now: float) -> None:
        if snap.kv_usage is None:
            return
        capacity = self.kv_capacity_tokens
        if capacity is not None and self._in_flight_calls is not None:
            # Sequences grow until they end: project the calls in flight from their ages
            # and recent calls' sizes, so that a young batch (a restart, a new phase) is
            # not taken for a batch of small sequences.
            used = snap.kv_usage * capacity
            room = self.kv_fill * capacity
            calls = self._in_flight_calls
            generated = self._tokens.read(snap, [now - age for age, _ in calls])
            fitting = self._sizes.fitting(calls, used, int(snap.running), room, generated)
            self._projecting = fitting is not None
            if fitting is not None:
                self._move_kv_bound(fitting)
                return
        if snap.running < 1 or snap.kv_usage <= 0:
            return  # nothing held: keep the last bound, the sizes it saw are still likely
        if capacity is not None:
            tokens_per_seq = snap.kv_usage * capacity / snap.running
            bound = self.kv_hold * capacity / tokens_per_seq
        else:  # the same ratio, in fractions of the cache
            bound = self.kv_hold * snap.running / snap.kv_usage
        self._move_kv_bound(bound)

    def _move_kv_bound(self, bound: float) -> None:
        # Sequences grow while they decode: trust a shrinking bound at once, a growing one slowly.
        if self._kv_bound is None or bound < self._kv_bound:
            self._kv_bound = bound
        else:
            self._kv_bound += 0.25 * (bound - self._kv_bound)

    def _latency_ok(self) -> bool:
        """ITL (or TPOT) still near its floor and TTFT still short: slow start may go on."""
        for track, tolerance in (
            (self._itl, self.slow_start_itl_tolerance),
            (self._tpot, self.slow_start_itl_tolerance),
            (self._ttft, self.ttft_tolerance) if self._ttft_counts() else (self._ttft, math.inf),
        ):
            gradient = track.gradient(tolerance)
            if gradient is not None and gradient < 1.0:
                return False
        return True

    def _ttft_counts(self) -> bool:
        """Whether router-seen TTFT steers the limit: only without the server's own gauges.

        TTFT mixes queueing with prefill, and prefill grows with the prompt: a 20k-token
        review prompt takes many times a short plan prompt's first token on an idle server,
        which a TTFT floor would read as queueing. A server that reports its queue
        (`vllm:num_requests_waiting`) says how much of the wait is queueing; the limit reads
        that instead (`server_state`).
        """
        return self._watch_since is None

    def _grow_to(self, value: float) -> None:
        ceiling = self.max_limit if self._kv_bound is None else max(self._kv_bound, self.min_limit)
        if value > self._estimate:
            self._set(min(value, max(self._estimate, 2 * ceiling)))

    def on_sample(self, sample: Sample) -> None:
        """Slow start: one more per busy completion; then Gradient2-style moves."""
        if sample.dropped:
            # A shed or timed-out call while fresh gauges show no queue and room in the KV
            # cache is a fault (a flaky proxy, one hung call), not overload: no back-off.
            if self.server_state(sample.at) != "spare":
                self._back_off(sample.at, sample.in_flight)
            return
        if not sample.ok:
            return
        self._last_in_flight = sample.in_flight
        self._sizes.add_call(sample)
        if sample.itl_s is not None:
            self._itl.add(sample.itl_s)
        if sample.tpot_s is not None:
            self._tpot.add(sample.tpot_s)
        if sample.ttft_s is not None:
            self._ttft.add(sample.ttft_s)
        state = self.server_state(sample.at)
        if state == "saturated":
            self.slow_start = False
            if not self._kv_pressure(sample.at):
                self._back_off(sample.at, sample.in_flight)
            return
        # Grow only while the limit is in use: an idle replica says nothing about the knee.
        busy = sample.in_flight >= self._estimate / 2
        if self.slow_start:
            if not self._latency_ok():
                self.slow_start = False  # past the knee: steady from here
            else:
                if busy and state != "hold":
                    self._slow_start_grow(sample.at, self._estimate + 1)
                return
        gradients = [
            g
            for g in (
                self._itl.gradient(self.itl_tolerance) if sample.itl_s is not None else None,
                self._tpot.gradient(self.itl_tolerance) if sample.tpot_s is not None else None,
                self._ttft.gradient(self.ttft_tolerance)
                if sample.ttft_s is not None and self._ttft_counts()
                else None,
            )
            if g is not None
        ]
        gradient = max(self.min_gradient, min(gradients, default=1.0))
        allowance = math.sqrt(self._estimate) if busy and state != "hold" else 0.0
        if gradient >= 1.0 and allowance == 0.0:
            return
        # This call ran at a load above the limit (admitted before a decrease): the
        # decrease its latency asks for is made already. Shrinking again for each such
        # call would compound one overload into a collapse.
        if gradient < 1.0 and sample.in_flight * gradient >= self._estimate:
            return
        target = self._estimate * gradient + allowance
        new = (1 - self.smoothing) * self._estimate + self.smoothing * target
        if new > self._estimate:
            since, base = self._growth_from
            if sample.at - since >= 1.0:
                since, base = self._growth_from = (sample.at, self._estimate)
            new = max(self._estimate, min(new, base * (1 + self.max_growth_per_s)))
            self._grow_to(new)
            return
        self._set(new)

    def _back_off(self, now: float, load: float | None) -> None:
        """Shrink to `backoff` x the load that overloaded the server, once per cooldown.

        Calls admitted before an earlier back-off keep the server overloaded until they
        end: backing off from the limit again every cooldown would compound one episode
        into a collapse to the minimum, while the load they ran at says how far to go.
        Without a known load, back off from the limit.
        """
        self.slow_start = False
        if now - self._last_backoff_at < self.backoff_cooldown_s:
            return
        enforced = min(self._estimate, float(self.limit))  # never from above what is enforced
        target = enforced * self.backoff if load is None else min(enforced, load * self.backoff)
        if target >= enforced:
            return  # the load already fell below what the last back-off aimed at
        self._last_backoff_at = now
        self._set(target)

    def _set(self, value: float) -> None:
        self._estimate = max(float(self.min_limit), min(float(self.max_limit), value))


_FIXED_RE = re.compile(r"fixed-([1-9][0-9]*)")


def make_limit(policy: str) -> Limit:
    """Build a limit from a policy string: "unlimited", "fixed-N" (N >= 1) or "adaptive".

    The one parser of limit strings: settings and benchmark policies check theirs here.

    Raises:
        ValueError: an unknown policy, naming the forms allowed.
    """
    if policy == "unlimited":
        return FixedLimit(UNLIMITED)
    if policy == "adaptive":
        return AdaptiveLimit()
    if fixed := _FIXED_RE.fullmatch(policy):
        return FixedLimit(int(fixed.group(1)))
    raise ValueError(
        f"unknown limit policy {policy!r}: use adaptive, unlimited or fixed-N (N >= 1)"
    )
