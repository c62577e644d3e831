"""Limit algorithms on recorded sample sequences: where the limit goes, and why."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence

import pytest

from routing.admission import Admission, Outcome
from routing.calls import CallInfo, call_scope
from routing.limits import UNLIMITED, AdaptiveLimit, FixedLimit, Sample, make_limit
from routing.vllm_metrics import ServerSnapshot

ItlModel = Callable[[float], float]


def _drive(
    limit: AdaptiveLimit,
    itl_of: ItlModel,
    *,
    samples: int = 3000,
    dt: float = 0.02,
    ttft_of: ItlModel | None = None,
    snapshot_of: Callable[[float, float], ServerSnapshot] | None = None,
) -> list[int]:
    """Saturating demand: every request sees a batch as large as the current limit."""
    history = []
    t = 0.0
    next_scrape = 1.0
    for _ in range(samples):
        t += dt
        b = float(limit.limit)
        if snapshot_of is not None and t >= next_scrape:
            limit.on_snapshot(snapshot_of(b, t), t)
            next_scrape += 1.0
        ttft = ttft_of(b) if ttft_of else None
        limit.on_sample(Sample(at=t, in_flight=b, itl_s=itl_of(b), ttft_s=ttft))
        history.append(limit.limit)
    return history


def _cpu_throughput(b: float) -> float:
    # vLLM's CPU build measured on 2 cores: concurrency -> tokens/s, --max-num-seqs 32.
    points = [(1, 170.0), (4, 474.0), (16, 1152.0), (32, 1170.0)]
    b = min(b, 32.0)
    for (b0, x0), (b1, x1) in itertools.pairwise(points):
        if b <= b1:
            return x0 + (x1 - x0) * (b - b0) / (b1 - b0)
    return points[-1][1]


def test_fixed_and_policy_strings() -> None:
    fixed = FixedLimit(10)
    fixed.on_sample(Sample(at=1.0, in_flight=10, dropped=True))
    assert fixed.limit == 10
    assert make_limit("fixed-25").limit == 25
    assert make_limit("unlimited").limit == UNLIMITED
    assert isinstance(make_limit("adaptive"), AdaptiveLimit)
    for bad in ("fixed-0", "fixed-x", "aimd", "fixed-01", "fixed- 3", "fixed-3_0", "fixed-4+coder"):
        with pytest.raises(ValueError):
            make_limit(bad)


def test_h100_8b_grows_to_a_large_batch() -> None:
    # NIM/BLIS-like decode step: 4.6 ms + 0.04 ms per sequence in the batch.
    limit = AdaptiveLimit()
    history = _drive(limit, lambda b: 0.0046 + 0.00004 * b)
    assert history[0] >= 8
    assert 120 <= limit.limit <= 320, limit.limit
    assert max(history[-300:]) - min(history[-300:]) <= 0.15 * limit.limit  # settled


def test_cpu_server_settles_near_its_knee() -> None:
    # ITL = b / throughput(b); past 32 sequences the server queues: TTFT climbs.
    limit = AdaptiveLimit()
    _drive(
        limit,
        lambda b: min(b, 32.0) / _cpu_throughput(b),
        ttft_of=lambda b: 0.05 + max(0.0, b - 32.0) * 0.25,
    )
    assert 10 <= limit.limit <= 40, limit.limit


def test_small_kv_cache_server_is_held_by_server_signals() -> None:
    # A 32B model whose KV cache fills at 12 sequences: latency barely moves, vLLM
    # queues and preempts instead.
    preempted = [0.0]

    def snapshot(b: float, t: float) -> ServerSnapshot:
        over = max(0.0, b - 12.0)
        if over:
            preempted[0] += over
        return ServerSnapshot(
            taken_at=t,
            running=min(b, 12.0),
            waiting=over,
            kv_usage=min(1.0, b / 12.0),
            preemptions_total=preempted[0],
        )

    limit = AdaptiveLimit()
    limit.watch_server(0.0, stale_after_s=3.0)
    history = _drive(limit, lambda b: 0.025 + 0.0001 * b, snapshot_of=snapshot)
    assert max(history) <= 20
    assert 2 <= limit.limit <= 16, limit.limit


def test_idle_replica_does_not_grow() -> None:
    limit = AdaptiveLimit(initial=8)
    for i in range(500):
        limit.on_sample(Sample(at=i * 0.1, in_flight=2, itl_s=0.01))
    assert limit.limit == 8


def test_rising_itl_shrinks_the_limit() -> None:
    limit = AdaptiveLimit(initial=64)
    seq = [0.010] * 40 + [0.040] * 200  # the batch got 4x slower per token
    for i, itl in enumerate(seq):
        limit.on_sample(Sample(at=i * 0.1, in_flight=64, itl_s=itl))
    assert limit.limit < 40


def test_one_lucky_sample_does_not_set_the_floor() -> None:
    limit = AdaptiveLimit(initial=16)
    seq = [0.001] + [0.010] * 300  # one coalesced, too-fast reading
    for i, itl in enumerate(seq):
        limit.on_sample(Sample(at=i * 0.1, in_flight=limit.limit, itl_s=itl))
    assert limit.limit > 16


def test_calls_admitted_before_a_back_off_do_not_compound_it() -> None:
    # The server's queue stays while 100 calls admitted under the old limit drain.
    limit = AdaptiveLimit(initial=100, backoff=0.5, backoff_cooldown_s=3.0)
    limit.watch_server(0.0, stale_after_s=3.0)
    for t in range(1, 13):
        queue = ServerSnapshot(taken_at=t, running=100 - 2 * t, waiting=4, kv_usage=0.5)
        limit.on_snapshot(queue, float(t))
    # A queue from t = 3 (seen for burst_drain_s), a back-off every 3 s: half the load at the
    # last one (t = 12: 76 running + 4 waiting), not 100 / 2**4.
    assert limit.limit == 40


def test_a_full_kv_cache_is_left_to_a_projecting_kv_bound() -> None:
    # A full cache, then a preemption: the server holds what fits and hands out blocks as
    # sequences end. A KV bound that projects the calls in flight sizes the limit to that;
    # the estimate is not cut as for a compute queue, which would leave blocks idle later.
    def fill(limit: AdaptiveLimit) -> None:
        limit.on_snapshot(_quiet(12, 1.0, kv_usage=0.99), 1.0)
        full = ServerSnapshot(taken_at=2.0, running=12, kv_usage=0.99, preemptions_total=1)
        limit.on_snapshot(full, 2.0)

    projecting = _learned()
    projecting.backoff_cooldown_s = 0.0
    projecting.set_in_flight([(50.0, "plan")] * 12)
    fill(projecting)
    assert projecting.server_state(2.0) == "saturated"
    assert projecting.estimate == 64 and not projecting.slow_start
    assert projecting.limit <= 12
    # Before any call has ended the bound sees only present sizes: back off from the load.
    blind = AdaptiveLimit(initial=64, backoff_cooldown_s=0.0)
    blind.set_kv_capacity(70_000)
    blind.watch_server(0.0, stale_after_s=3.0)
    fill(blind)
    assert blind.estimate == 9  # 0.75 x 12 running
    # A queue with half the cache free is a compute queue: back off, projection or not.
    compute = _learned()
    compute.backoff_cooldown_s = 0.0
    compute.set_in_flight([(50.0, "plan")] * 12)
    compute.on_snapshot(_quiet(12, 1.0, waiting=2, kv_usage=0.5), 1.0)
    compute.on_snapshot(_quiet(12, 2.0, waiting=2, kv_usage=0.5), 2.0)
    compute.on_snapshot(_quiet(12, 3.0, waiting=2, kv_usage=0.5), 3.0)
    # 0.75 x the 12 calls this router holds: the server's 14 (12 running + 2 waiting) count
    # another client's requests too.
    assert compute.estimate == 9


def test_a_queue_behind_a_preemption_waits_for_blocks_not_compute() -> None:
    # vLLM preempts a 14k-token sequence and puts it back at the head of its queue: it
    # waits for blocks beside a cache 80% full, and nothing is admitted past it. That is
    # the KV bound's to answer; once the queue has emptied, a queue is compute again.
    def snap(t: float, *, waiting: float, preemptions: float, kv: float = 0.8) -> ServerSnapshot:
        return ServerSnapshot(
            taken_at=t, running=11, waiting=waiting, kv_usage=kv, preemptions_total=preemptions
        )

    limit = _learned()
    limit.backoff_cooldown_s = 0.0
    limit.set_in_flight([(95.0, "plan")] * 12)  # near their end: 11 fit
    limit.on_snapshot(snap(1.0, waiting=0, preemptions=0, kv=0.85), 1.0)
    limit.on_snapshot(snap(2.0, waiting=1, preemptions=1), 2.0)
    for t in (3.0, 4.0, 5.0, 6.0):
        limit.on_snapshot(snap(t, waiting=1, preemptions=1), t)
        assert limit.server_state(t) == ("hold" if t < 4.0 else "saturated")
    assert limit.estimate == 64
    limit.on_snapshot(snap(7.0, waiting=0, preemptions=1), 7.0)
    for t in (8.0, 9.0, 10.0):
        limit.on_snapshot(snap(t, waiting=2, preemptions=1), t)
    assert limit.estimate == 9  # 0.75 x the 12 calls this router holds
    # A queue that never empties after a preemption outlasts the sequences that held the
    # blocks (a call holds its slot 100 s here): past that it is a compute queue.
    stuck = _learned()
    stuck.backoff_cooldown_s = 0.0
    stuck.set_in_flight([(95.0, "plan")] * 12)
    stuck.on_snapshot(snap(1.0, waiting=0, preemptions=0, kv=0.85), 1.0)
    for t in range(2, 103):
        stuck.on_snapshot(snap(float(t), waiting=1, preemptions=1), float(t))
    assert stuck.estimate == 64  # t = 102: 100 s since the preemption at t = 2
    stuck.on_snapshot(snap(103.0, waiting=1, preemptions=1), 103.0)
    assert stuck.estimate == 9
    # The same queue with no preemption before it is a compute queue from the start.
    compute = _learned()
    compute.backoff_cooldown_s = 0.0
    compute.set_in_flight([(95.0, "plan")] * 12)
    for t in (1.0, 2.0, 3.0):
        compute.on_snapshot(snap(t, waiting=1, preemptions=0), t)
    assert compute.estimate == 9


def test_latency_of_calls_run_above_the_limit_does_not_shrink_it_again() -> None:
    limit = AdaptiveLimit(initial=64)
    for i in range(40):
        limit.on_sample(Sample(at=i * 0.1, in_flight=limit.limit, itl_s=0.010))
    for i in range(20):
        limit.on_sample(Sample(at=4 + i * 0.1, in_flight=limit.limit, itl_s=0.030))
    shrunk = limit.limit
    # The calls admitted before the decrease finish now, measured at 200 in flight.
    for i in range(200):
        limit.on_sample(Sample(at=6 + i * 0.1, in_flight=200, itl_s=0.030))
    assert limit.limit == shrunk


def test_rising_itl_shrinks_toward_the_load_it_was_measured_at() -> None:
    limit = AdaptiveLimit(initial=64)
    for i in range(40):
        limit.on_sample(Sample(at=i * 0.1, in_flight=64, itl_s=0.010))
    for i in range(400):  # 4x slower per token at the full limit: the limit gives way
        limit.on_sample(Sample(at=4 + i * 0.1, in_flight=limit.limit, itl_s=0.040))
    assert limit.limit <= 16


def test_dropped_calls_back_off_once_per_cooldown() -> None:
    limit = AdaptiveLimit(initial=100, backoff=0.5, backoff_cooldown_s=3.0)
    for t in (1.0, 1.5, 2.0):
        limit.on_sample(Sample(at=t, in_flight=100, ok=False, dropped=True))
    assert limit.limit == 50
    limit.on_sample(Sample(at=4.5, in_flight=50, ok=False, dropped=True))
    assert limit.limit == 25


def test_stale_or_failed_scrape_counts_as_saturated() -> None:
    limit = AdaptiveLimit(initial=32, backoff=0.5, backoff_cooldown_s=0.0)
    assert limit.server_state(0.0) == "unknown"  # no scraper: latency alone decides
    limit.watch_server(0.0, stale_after_s=3.0)
    assert limit.server_state(1.0) == "hold"  # first scrape still due: no growth
    assert limit.server_state(4.0) == "saturated"  # it never came
    limit.on_snapshot(ServerSnapshot(taken_at=4.0, running=5, kv_usage=0.1), 4.0)
    assert limit.server_state(4.5) == "spare"
    assert limit.server_state(8.0) == "saturated"  # 4 s old: stale, never idle
    limit.on_sample(Sample(at=8.0, in_flight=32, itl_s=0.01))
    assert limit.limit == 16
    limit.on_sample(Sample(at=8.5, in_flight=16, itl_s=0.01))  # the load followed
    assert limit.limit == 8
    limit.on_snapshot(ServerSnapshot.failed(9.0, "connection refused"), 9.0)
    assert limit.server_state(9.0) == "saturated"
    assert limit.limit == 8  # no news of the load since it was halved: no compounding


def test_server_signals() -> None:
    limit = AdaptiveLimit(backoff_cooldown_s=0.0)
    limit.watch_server(0.0, stale_after_s=3.0)
    limit.on_snapshot(ServerSnapshot(taken_at=1.0, waiting=2, kv_usage=0.5), 1.0)
    assert limit.server_state(1.0) == "hold"  # one scrape of waiting: maybe a burst
    limit.on_snapshot(ServerSnapshot(taken_at=2.0, waiting=2, kv_usage=0.5), 2.0)
    assert limit.server_state(2.0) == "hold"  # for 1 s: maybe a prompt still in prefill
    limit.on_snapshot(ServerSnapshot(taken_at=3.0, waiting=2, kv_usage=0.5), 3.0)
    assert limit.server_state(3.0) == "saturated"  # for burst_drain_s, not shorter: a queue
    limit.on_snapshot(ServerSnapshot(taken_at=4.0, kv_usage=0.93), 4.0)
    assert limit.server_state(4.0) == "hold"
    limit.on_snapshot(ServerSnapshot(taken_at=5.0, kv_usage=0.99), 5.0)
    assert limit.server_state(5.0) == "saturated"
    limit.on_snapshot(ServerSnapshot(taken_at=6.0, kv_usage=0.5, preemptions_total=1), 6.0)
    assert limit.server_state(6.0) == "saturated"  # preemptions rose
    limit.on_snapshot(ServerSnapshot(taken_at=7.0, kv_usage=0.5, preemptions_total=1), 7.0)
    assert limit.server_state(7.0) == "spare"
    assert limit.limit == limit.min_limit or limit.limit < 8


def _scraper(limit: AdaptiveLimit, kv_usage: float) -> Callable[[float, int, float, int], str]:
    """Feed `limit` a scrape of 2 running calls (time, waiting, prompt tokens, prefills)."""

    def scrape(t: float, waiting: int, prompt_tokens: float, prefilled: int) -> str:
        snap = ServerSnapshot(
            taken_at=t, running=2, waiting=waiting, kv_usage=kv_usage,
            prompt_tokens_total=prompt_tokens, ttft_count=prefilled,
        )  # fmt: skip
        limit.on_snapshot(snap, t)
        return limit.server_state(t)

    return scrape


def test_a_queue_that_prefill_clears_within_burst_drain_s_is_a_burst() -> None:
    limit = AdaptiveLimit(initial=16, backoff=0.5, backoff_cooldown_s=0.0)
    limit.watch_server(0.0, stale_after_s=3.0)
    scrape = _scraper(limit, kv_usage=0.3)
    assert scrape(1.0, 1, 1_500, 3) == "hold"
    assert scrape(2.0, 2, 15_300, 4) == "hold"  # queued for 1 s only
    # Queued for 2 s and grown, but it prefilled 13,800 prompt tokens a second since t = 1,
    # which clear 2 x 5,820 in 0.84 s.
    assert scrape(3.0, 2, 29_100, 5) == "hold"
    assert limit.estimate == 16
    # 450 tokens a second since t = 3 would take 27 s: a queue.
    assert scrape(4.0, 2, 29_300, 5) == "hold"  # 7,000 a second since t = 2: 1.7 s
    assert scrape(5.0, 2, 30_000, 5) == "saturated"
    assert limit.estimate == 2  # backed off from the 4 calls the server holds
    # No prefill at all since t = 4: a queue too.
    assert scrape(6.0, 2, 30_000, 5) == "saturated"


def test_a_prompt_still_in_prefill_at_the_next_scrape_is_not_a_queue() -> None:
    # The seed's three sessions (seed-calibrated-multi, seed 1): four reviews of about 14.5k
    # prompt tokens reach the 32B server within two seconds. One takes it 2 s to prefill, so
    # at the scrape after the queue appeared none has ended and the counters show no prefill.
    limit = AdaptiveLimit(initial=16, backoff=0.5, backoff_cooldown_s=0.0)
    limit.watch_server(0.0, stale_after_s=3.0)
    scrape = _scraper(limit, kv_usage=0.23)
    assert scrape(37.0, 1, 1_527, 3) == "hold"
    assert scrape(38.0, 2, 1_527, 3) == "hold"  # was read as a compute queue: 16 -> 3
    # 14,589 tokens prefilled since t = 37: the two waiting clear in 1.1 s.
    assert scrape(39.0, 2, 16_116, 4) == "hold"
    assert limit.estimate == 16
    # Scrapes further apart than burst_drain_s: the queue counts at the second of them.
    sparse = AdaptiveLimit(initial=16, backoff_cooldown_s=0.0)
    sparse.watch_server(0.0, stale_after_s=10.0)
    for t in (5.0, 10.0):
        sparse.on_snapshot(ServerSnapshot(taken_at=t, running=8, waiting=4, kv_usage=0.3), t)
    assert sparse.server_state(10.0) == "saturated" and sparse.estimate == 9


def test_limit_stays_within_bounds() -> None:
    limit = AdaptiveLimit(initial=4, min_limit=2, max_limit=64)
    for i in range(2000):
        limit.on_sample(Sample(at=i * 0.01, in_flight=limit.limit, itl_s=0.01))
    assert limit.limit == 64
    for i in range(200):
        limit.on_sample(Sample(at=100 + i * 5.0, in_flight=limit.limit, ok=False, dropped=True))
    assert limit.limit == 2


def _quiet(running: float, t: float, *, waiting: float = 0.0, kv_usage: float) -> ServerSnapshot:
    return ServerSnapshot(taken_at=t, running=running, waiting=waiting, kv_usage=kv_usage)


def test_slow_start_doubles_per_scrape_on_a_burst() -> None:
    # 400 calls arrive at once on an idle H100: no queue inside vLLM, KV a quarter used.
    limit = AdaptiveLimit()
    limit.watch_server(0.0, stale_after_s=3.0)
    seen = [limit.limit]
    for t in range(1, 6):
        limit.on_snapshot(_quiet(limit.limit, float(t), kv_usage=0.25 * limit.limit / 256), t)
        seen.append(limit.limit)
    assert seen == [16, 32, 64, 128, 256, 512]
    assert limit.slow_start


def test_slow_start_needs_the_limit_in_use_and_a_spare_server() -> None:
    limit = AdaptiveLimit(initial=16)
    limit.watch_server(0.0, stale_after_s=3.0)
    limit.on_snapshot(_quiet(3, 1.0, kv_usage=0.01), 1.0)  # 3 of 16 used: nothing learnt
    assert limit.limit == 16
    limit.on_snapshot(_quiet(16, 2.0, kv_usage=0.95), 2.0)  # KV nearly full: hold
    assert limit.estimate == 16 and limit.limit == 15  # and 0.9 / (0.95 / 16) fit


def test_slow_start_ends_at_the_first_congestion_signal() -> None:
    limit = AdaptiveLimit(initial=64, backoff_cooldown_s=0.0)
    limit.watch_server(0.0, stale_after_s=3.0)
    limit.on_snapshot(_quiet(32, 1.0, waiting=8, kv_usage=0.2), 1.0)
    assert limit.slow_start and limit.limit == 64  # one scrape of waiting: a burst, hold
    limit.on_snapshot(_quiet(32, 2.0, waiting=8, kv_usage=0.2), 2.0)
    assert limit.slow_start and limit.limit == 64  # still under burst_drain_s
    limit.on_snapshot(_quiet(32, 3.0, waiting=8, kv_usage=0.2), 3.0)
    # A queue that does not drain: back to 0.75 x the 40 calls the server held.
    assert not limit.slow_start and limit.limit == 30
    limit.on_snapshot(_quiet(30, 4.0, kv_usage=0.2), 4.0)
    assert limit.limit == 30  # no more doubling after slow start


def test_a_draining_prefill_burst_is_not_saturation() -> None:
    limit = AdaptiveLimit(initial=64, backoff_cooldown_s=0.0)
    limit.watch_server(0.0, stale_after_s=3.0)
    limit.on_snapshot(_quiet(40, 1.0, waiting=24, kv_usage=0.3), 1.0)
    limit.on_snapshot(_quiet(56, 2.0, waiting=8, kv_usage=0.4), 2.0)
    assert limit.server_state(2.0) == "hold"
    assert limit.limit == 64 and limit.slow_start


def test_kv_capacity_bounds_the_limit_by_sequence_size() -> None:
    # cache_config_info: 4,375 blocks x 16 = 70k tokens; 4 running sequences hold half of
    # it (8,750 tokens each): 0.9 x 70k / 8,750 = 7 such sequences fit.
    limit = AdaptiveLimit(initial=64)
    limit.set_kv_capacity(4375 * 16)
    limit.watch_server(0.0, stale_after_s=3.0)
    limit.on_snapshot(_quiet(4, 1.0, kv_usage=0.5), 1.0)
    assert limit.kv_bound == pytest.approx(7.2)
    assert limit.limit == 7 and limit.estimate == 64
    # Smaller sequences later: the bound rises, but only gradually.
    limit.on_snapshot(_quiet(4, 2.0, kv_usage=0.1), 2.0)
    assert 7 < limit.limit < 36


def test_new_cpu_fit_stops_at_max_num_seqs() -> None:
    # The refitted 2-core CPU vLLM (1 -> 896 tok/s ... 32 -> 15092, max-num-seqs 32): ITL
    # barely doubles by 32; the server then queues (waiting > 0) and preempts nothing.
    def throughput(b: float) -> float:
        points = [(1, 896.0), (4, 3647.0), (16, 10886.0), (32, 15092.0)]
        b = min(b, 32.0)
        for (b0, x0), (b1, x1) in itertools.pairwise(points):
            if b <= b1:
                return x0 + (x1 - x0) * (b - b0) / (b1 - b0)
        return points[-1][1]

    def snapshot(b: float, t: float) -> ServerSnapshot:
        return ServerSnapshot(
            taken_at=t, running=min(b, 32.0), waiting=max(0.0, b - 32.0), kv_usage=0.01
        )

    limit = AdaptiveLimit()
    limit.watch_server(0.0, stale_after_s=3.0)
    history = _drive(limit, lambda b: min(b, 32.0) / throughput(b), snapshot_of=snapshot)
    assert max(history) <= 64  # slow start doubles at most once a second
    assert 16 <= limit.limit <= 48, limit.limit
    assert max(history[-500:]) <= 48


def test_ttft_steers_the_limit_only_without_the_servers_queue_gauge() -> None:
    # Long prompts take long to prefill on an idle server: TTFT forty times the floor of the
    # short-prompt phase, with no queue at all. With the server's gauges read, that is not
    # taken for queueing; without them the limit must assume it is.
    def long_prompt_phase() -> ItlModel:
        calls = itertools.count()
        # Short plan prompts first, then a phase of 20k-token review prompts.
        return lambda b: 0.05 if next(calls) < 1000 else 2.0

    def idle_queue(b: float, t: float) -> ServerSnapshot:
        return ServerSnapshot(taken_at=t, running=b, waiting=0, kv_usage=0.3)

    watched = AdaptiveLimit()
    watched.watch_server(0.0, stale_after_s=5.0)
    _drive(
        watched,
        lambda b: 0.0046 + 0.00004 * b,
        ttft_of=long_prompt_phase(),
        snapshot_of=idle_queue,
    )
    blind = AdaptiveLimit()
    _drive(blind, lambda b: 0.0046 + 0.00004 * b, ttft_of=long_prompt_phase())
    assert watched.limit >= 120, watched.limit
    assert blind.limit < watched.limit / 2, blind.limit


def _learned(answers: int = 20) -> AdaptiveLimit:
    """A limit that has seen calls of 4,000 tokens, each holding its slot for 100 s."""
    limit = AdaptiveLimit(initial=64)
    limit.set_kv_capacity(70_000)
    limit.watch_server(0.0, stale_after_s=3.0)
    for _ in range(answers):
        limit.on_sample(
            Sample(at=1.0, in_flight=1, ttft_s=1.0, itl_s=99.0 / 3999, service_s=100.0, kind="plan")
        )
    return limit


def test_a_young_batch_is_projected_to_its_final_size() -> None:
    # Ten calls a second old hold 1,040 tokens each (a 1,000-token prompt): by their end
    # each holds 5,000. 0.99 x 70k / 5,000 = 13.9 fit, not 0.99 x 70k / 1,040 = 67.
    limit = _learned()
    limit.set_in_flight([(1.0, "plan")] * 10)
    limit.on_snapshot(ServerSnapshot(taken_at=2.0, running=10, kv_usage=10 * 1_040 / 70_000), 2.0)
    assert limit.kv_bound == pytest.approx(13.9, abs=0.1)
    assert limit.limit == 13


def test_the_prompt_is_what_the_cache_holds_beyond_the_tokens_generated() -> None:
    # Calls were seen to make 4,000 tokens in 100 s. Ten now 50 s old hold 2,000 tokens
    # each, but a larger batch decodes slower: the server's counter says each has generated
    # 1,000, so 1,000 of the 2,000 is prompt, and each ends at 5,000. Taken to be halfway
    # through their output by age, they would seem to have no prompt at all.
    def run(generated: float) -> float | None:
        limit = _learned()
        limit.set_in_flight([])  # the calls are admitted just after this scrape
        start = ServerSnapshot(taken_at=100.0, running=10, kv_usage=10 / 70)
        limit.on_snapshot(start, 100.0)
        limit.set_in_flight([(50.0, "plan")] * 10)
        now = ServerSnapshot(
            taken_at=150.0, running=10, kv_usage=2 / 7, generation_tokens_total=generated
        )
        limit.on_snapshot(now, 150.0)
        return limit.kv_bound

    # Just before they end, in 50 s: 10 x 5,000 held, fresh calls grown to 1,000 + 2,000
    # each; 0.99 x 70k leaves room for 19,300 / 3,000 of them.
    assert run(10 * 1_000) == pytest.approx(10 + 19_300 / 3_000)
    # A server without the counter: by age, 10 x 4,000 at the end, fresh ones at 2,000.
    assert run(0) == pytest.approx(10 + 29_300 / 2_000)


def test_a_staggered_batch_is_not_held_to_every_call_at_its_final_size() -> None:
    # Twelve calls spread over their 100 s: as the old ones end, the young ones grow into
    # their room. More fit than twelve at 5,000 tokens each, at least the 21 of their mean.
    limit = _learned()
    ages = [100.0 * (i + 0.5) / 12 for i in range(12)]
    used = sum(1_000 + 4_000 * age / 100.0 for age in ages)
    limit.set_in_flight([(age, "plan") for age in ages])
    limit.on_snapshot(ServerSnapshot(taken_at=2.0, running=12, kv_usage=used / 70_000), 2.0)
    assert limit.limit >= 21, limit.kv_bound


def _unlearned(**caps: int) -> AdaptiveLimit:
    """A limit on a 70k-token cache that has seen no call end, told these output caps."""
    limit = AdaptiveLimit(initial=64)
    limit.set_kv_capacity(70_000)
    limit.watch_server(0.0, stale_after_s=3.0)
    for kind, tokens in caps.items():
        limit.note_output_cap(kind, tokens)
    return limit


def _young_plans(limit: AdaptiveLimit) -> AdaptiveLimit:
    """Feed `limit` ten plans a second old, holding 1,040 tokens each (a 1,000-token prompt)."""
    limit.set_in_flight([(1.0, "plan")] * 10)
    limit.on_snapshot(ServerSnapshot(taken_at=2.0, running=10, kv_usage=10 * 1_040 / 70_000), 2.0)
    return limit


def test_the_projection_waits_for_a_completed_call() -> None:
    # Before any call has ended nothing says how far calls grow: the sizes seen now bound it.
    limit = _young_plans(_unlearned())
    assert limit.kv_bound == pytest.approx(0.9 * 70_000 / 1_040)


def test_before_a_call_has_ended_a_capped_call_is_taken_at_a_share_of_its_cap() -> None:
    # Ten young plans capped at 8,000 output tokens are each taken at 1,040 + 0.4 x 8,000
    # until one ends, so 0.99 x 70k / 4,240 = 16.3 calls fit, not the 64 their present size
    # says.
    limit = _young_plans(_unlearned(plan=8_000))
    assert limit.kv_bound == pytest.approx(0.99 * 70_000 / (1_040 + 0.4 * 8_000), abs=0.01)
    assert limit.limit == 16
    # Once calls of the kind have ended, their size replaces the cap: the same young batch
    # is projected as by a limit that never saw a cap.
    capped, uncapped = _learned(), _learned()
    capped.note_output_cap("plan", 16_000)  # at 0.4 of its cap, 9 calls would fit
    for learned in (capped, uncapped):
        _young_plans(learned)
    assert capped.kv_bound == pytest.approx(13.9, abs=0.1)
    assert capped.kv_bound == uncapped.kv_bound


def test_a_kind_without_a_cap_is_not_bounded_by_another_kinds_cap() -> None:
    # Reviews carry a cap; plans do not and none has ended: the plans in flight leave the
    # projection unknown, and the sizes seen now bound it, as before any cap.
    limit = _young_plans(_unlearned(review=6_000))
    assert limit.kv_bound == pytest.approx(0.9 * 70_000 / 1_040)


class _InFlightSpy(FixedLimit):
    def __init__(self) -> None:
        super().__init__(4)
        self.calls: list[list[tuple[float, str]]] = []

    def set_in_flight(self, calls: Sequence[tuple[float, str]]) -> None:
        self.calls.append(sorted(calls))


@pytest.mark.looptime
async def test_admission_tells_the_limit_its_calls_ages_and_stages() -> None:
    spy = _InFlightSpy()
    admission = Admission("reasoning", spy)
    with call_scope(CallInfo("a", "plan", "reasoning")):
        first = await admission.acquire("a")
    with call_scope(CallInfo("b", "review", "reasoning")):
        second = await admission.acquire("b")
    await asyncio.sleep(5.0)
    late = await admission.acquire("c")  # outside any call scope
    await asyncio.sleep(1.0)
    admission.on_snapshot(ServerSnapshot(taken_at=6.0))
    first.release(Outcome())
    admission.on_snapshot(ServerSnapshot(taken_at=6.0))
    assert spy.calls == [
        [(1.0, "-"), (6.0, "plan"), (6.0, "review")],
        [(1.0, "-"), (6.0, "review")],
    ]
    second.release(Outcome())
    late.release(Outcome())


def test_sizes_are_kept_per_kind_of_call() -> None:
    # Plans generate 4,000 tokens over 100 s; reviews hold a long prompt and generate 400
    # over 10 s. Ten young reviews are projected as reviews, not as the plans seen before.
    limit = _learned()
    for _ in range(20):
        limit.on_sample(
            Sample(at=1.0, in_flight=1, ttft_s=1.0, itl_s=9.0 / 399, service_s=10.0, kind="review")
        )
    limit.set_in_flight([(1.0, "review")] * 4)
    used = 4 * (10_000 + 40)
    limit.on_snapshot(ServerSnapshot(taken_at=2.0, running=4, kv_usage=used / 70_000), 2.0)
    # 0.99 x 70k / (10,000 + 400) = 6.66 reviews fit; as plans (5,000-token answers) 4.95.
    assert limit.kv_bound == pytest.approx(6.66, abs=0.05)
