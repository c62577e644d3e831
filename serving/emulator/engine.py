"""A continuous-batching engine that behaves like vLLM V1's scheduler, in (virtual) time.

One asyncio task runs the step loop: each step schedules the running requests first (decodes
and unfinished prefill chunks), then admits waiting requests (chunked prefill, at most
`max_num_batched_tokens` tokens and `max_num_seqs` sequences), sleeps the profile's step time,
and samples one token for every sequence whose tokens are all computed.

KV cache: a finite pool of `block_size`-token blocks. When a running request needs a block
and none is free, a running request is preempted by recompute (its blocks freed, back to the
waiting queue), as vLLM V1 does: under the `fcfs` policy the most recently admitted one, under
`priority` the one with the largest `(priority, arrival)`.

Scheduling policy (vLLM's `--scheduling-policy`): `fcfs` serves the waiting queue in arrival
order (a preempted request goes back to its front); `priority` keeps it ordered by
`(priority, arrival)`, lower first, and a request with a non-zero priority is refused under
`fcfs`, as vLLM refuses it. As in vLLM V1, priority never preempts a running request for a
waiting one: it decides who waits, who is admitted first, and who is preempted when the KV
cache runs out. Prefix cache: full prompt
blocks are named by a hash chain; blocks of finished requests stay cached until evicted LRU.

Speed: while the batch is all decodes and nothing can change the schedule (no finish, no
block shortage, no admission possible, no arrival or abort), the loop sleeps once for many
steps and applies them in bulk. An arrival or abort wakes it; it then stops at the next step
boundary, so the schedule is the same as stepping one step at a time. Per-step work is
O(running), and nothing is kept per token.

Streaming: a waiting client is woken with the first token, then every
`stream_interval_tokens` tokens and at the end, as vLLM's `--stream-interval`; on a virtual
clock the interval is coarse, so events per answer stay bounded however large the batch.

Timing comes only from the running loop's clock and `asyncio` timers, so under a looptime
loop the same requests give the same records. On a real clock steps keep absolute deadlines
(`next_step_start_s`), so the loop's wake-up lateness does not add to every step.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import heapq
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

from serving.emulator.profiles import Profile

CHARS_PER_TOKEN = 4
# Tokens per streamed event on a virtual clock: a decode step stopped by every admission
# and finish in a large batch must not turn into one client-side event each.
VIRTUAL_STREAM_INTERVAL_TOKENS = 256

FinishReason = Literal["stop", "length", "abort"]
SchedulingPolicy = Literal["fcfs", "priority"]
SCHEDULING_POLICIES: tuple[SchedulingPolicy, ...] = ("fcfs", "priority")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
# vLLM's buckets for tokens per engine step (its CUDA-graph capture sizes and beyond).
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                   50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


def count_tokens(text: str) -> int:
    """Approximate token count: one token per `CHARS_PER_TOKEN` characters."""
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def prompt_block_hashes(text: str, block_size: int) -> list[int]:
    """Hash chain over the full token blocks of `text`.

    Tokens are fixed `CHARS_PER_TOKEN`-character chunks, so a block's token ids are a
    function of its characters and hashing the characters names the block as hashing the
    ids would, without making a Python object per token.
    """
    span = block_size * CHARS_PER_TOKEN
    full_blocks = len(text) // span
    hashes: list[int] = []
    prev = b"\0" * 8
    for i in range(full_blocks):
        digest = hashlib.blake2b(
            prev + text[i * span : (i + 1) * span].encode(), digest_size=8
        ).digest()
        hashes.append(int.from_bytes(digest, "big"))
        prev = digest
    return hashes


class Histogram:
    """Prometheus-style cumulative histogram that takes a count per observation."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Record `n` observations of `value`."""
        self.counts[bisect.bisect_left(self.buckets, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[tuple[str, int]]:
        """`(le, cumulative count)` pairs ending with `+Inf`."""
        out: list[tuple[str, int]] = []
        running = 0
        for le, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((le, running))
        return out


@dataclass
class EngineStats:
    """Counters and histograms in vLLM V1's terms, read by the /metrics collector."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    request_success: dict[str, int] = field(default_factory=dict)
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(ITL_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    queue: Histogram = field(default_factory=lambda: Histogram(REQUEST_BUCKETS))
    # Tokens per engine step (prefill and decode), vLLM's `vllm:iteration_tokens_total`: its
    # count is the number of steps the engine ran.
    iteration_tokens: Histogram = field(default_factory=lambda: Histogram(ITERATION_TOKEN_BUCKETS))


@dataclass
class RequestRecord:
    """What happened to one request, in engine-clock seconds (None: not reached)."""

    request_id: str
    session_id: str
    stage: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    guided: bool = False
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    cached_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    finish_reason: FinishReason | None = None
    # The prompt's full-block hash chain: two prompts share their first n blocks exactly
    # when their first n hashes are equal (the benchmark's shareable-prefix count).
    block_hashes: list[int] = field(default_factory=list, repr=False)


class BlockPool:
    """KV blocks: fresh, free-unhashed, free-but-cached (LRU), and in use with refcounts."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._next_fresh = 0
        self._free_plain: list[int] = []
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._refs: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._by_hash: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (evicting cached ones if needed)."""
        return self.num_blocks - self._next_fresh + len(self._free_plain) + len(self._free_cached)

    @property
    def num_used(self) -> int:
        """Blocks referenced by running requests."""
        return self.num_blocks - self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks: never-used first, then plain free, then evict LRU cached ones."""
        out: list[int] = []
        fresh = min(n, self.num_blocks - self._next_fresh)
        if fresh:
            out.extend(range(self._next_fresh, self._next_fresh + fresh))
            self._next_fresh += fresh
        while len(out) < n and self._free_plain:
            out.append(self._free_plain.pop())
        while len(out) < n:
            block, _ = self._free_cached.popitem(last=False)
            h = self._hash_of.pop(block)
            if self._by_hash.get(h) == block:
                del self._by_hash[h]
            out.append(block)
        for block in out:
            self._refs[block] = 1
        return out

    def lookup(self, hashes: list[int], max_blocks: int) -> list[int]:
        """The cached blocks for the longest prefix of `hashes`, at most `max_blocks`."""
        hits: list[int] = []
        for h in hashes[:max_blocks]:
            block = self._by_hash.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def free_among(self, blocks: list[int]) -> int:
        """How many of `blocks` are free (cached, refcount 0)."""
        return sum(1 for b in blocks if b in self._free_cached)

    def touch(self, blocks: list[int]) -> None:
        """Reference cached blocks a new request reuses."""
        for block in blocks:
            if block in self._free_cached:
                del self._free_cached[block]
                self._refs[block] = 1
            else:
                self._refs[block] += 1

    def register(self, block: int, h: int) -> None:
        """Name a full prompt block by its hash, unless that hash is cached already."""
        if h not in self._by_hash:
            self._by_hash[h] = block
            self._hash_of[block] = h

    def free(self, blocks: list[int]) -> None:
        """Release a request's blocks; tail blocks first, so they are evicted first."""
        for block in reversed(blocks):
            refs = self._refs[block] - 1
            if refs:
                self._refs[block] = refs
                continue
            del self._refs[block]
            if block in self._hash_of:
                self._free_cached[block] = None
            else:
                self._free_plain.append(block)


class _Seq:
    """Scheduler state of one request."""

    __slots__ = (
        "aborted",
        "block_hashes",
        "blocks",
        "computed",
        "finished",
        "generated",
        "notify_at",
        "num_registered",
        "num_tokens",
        "order",
        "prefill_done",
        "record",
        "target",
        "waiter",
    )

    def __init__(self, record: RequestRecord, block_hashes: list[int], order: int) -> None:
        self.record = record
        self.order = order  # arrival order: ties of (priority, arrival time) go to the first
        self.block_hashes = block_hashes
        self.blocks: list[int] = []
        self.computed = 0
        self.num_tokens = record.prompt_tokens
        self.generated = 0
        self.target = record.output_tokens
        self.num_registered = 0
        self.prefill_done = False
        self.finished = False
        self.aborted = False
        self.waiter: asyncio.Future[None] | None = None
        self.notify_at = 1  # wake the waiter once this many tokens exist

    def rank(self) -> tuple[int, float, int]:
        """vLLM's priority order: lower priority value first, then earlier arrival."""
        return (self.record.priority, self.record.arrival_s, self.order)

    def __lt__(self, other: _Seq) -> bool:
        return self.rank() < other.rank()


class WaitingQueue:
    """The waiting queue: arrival order (`fcfs`) or a heap by `(priority, arrival)`."""

    def __init__(self, policy: SchedulingPolicy) -> None:
        self.policy = policy
        self._fifo: deque[_Seq] = deque()
        self._heap: list[_Seq] = []

    def __len__(self) -> int:
        return len(self._fifo) + len(self._heap)

    def __iter__(self) -> Iterator[_Seq]:
        yield from self._fifo
        yield from self._heap

    def add(self, seq: _Seq) -> None:
        """Queue a new request."""
        if self.policy == "priority":
            heapq.heappush(self._heap, seq)
        else:
            self._fifo.append(seq)

    def add_preempted(self, seq: _Seq) -> None:
        """Queue a preempted request: the front under fcfs, its rank under priority."""
        if self.policy == "priority":
            heapq.heappush(self._heap, seq)
        else:
            self._fifo.appendleft(seq)

    def peek(self) -> _Seq:
        """The request to admit next."""
        return self._heap[0] if self.policy == "priority" else self._fifo[0]

    def pop(self) -> _Seq:
        """Take the request `peek` returned."""
        return heapq.heappop(self._heap) if self.policy == "priority" else self._fifo.popleft()

    def remove(self, seq: _Seq) -> None:
        """Drop a request (aborted while waiting); no-op when absent."""
        if seq in self._fifo:
            self._fifo.remove(seq)
        elif seq in self._heap:
            self._heap.remove(seq)
            heapq.heapify(self._heap)

    def clear(self) -> None:
        """Drop every request."""
        self._fifo.clear()
        self._heap.clear()


class RequestHandle:
    """A submitted request: wait for its tokens, read its record, or abort it."""

    def __init__(self, engine: Engine, seq: _Seq) -> None:
        self._engine = engine
        self._seq = seq

    @property
    def record(self) -> RequestRecord:
        """The request's record (live: it fills in as the request runs)."""
        return self._seq.record

    @property
    def generated(self) -> int:
        """Tokens generated so far."""
        return self._seq.generated

    @property
    def finished(self) -> bool:
        """True once the request finished or was aborted."""
        return self._seq.finished

    async def wait_tokens(self, seen: int) -> int:
        """Wait for the next streamed tokens after `seen`, or the end; return the count.

        The first token is streamed as soon as it exists; later ones once
        `stream_interval_tokens` more exist (see `Engine`), or when the request ends.
        """
        interval = 1 if seen == 0 else self._engine.stream_interval_tokens
        await self._wait_until(seen + interval)
        return self._seq.generated

    async def result(self) -> RequestRecord:
        """Wait for the request to end and return its record."""
        await self._wait_until(self._seq.target + 1)
        return self._seq.record

    async def _wait_until(self, tokens: int) -> None:
        seq = self._seq
        seq.notify_at = tokens
        while seq.generated < tokens and not seq.finished:
            if seq.waiter is None or seq.waiter.done():
                seq.waiter = asyncio.get_running_loop().create_future()
            await seq.waiter

    def abort(self) -> None:
        """Abort the request (client gone): its KV blocks are freed now."""
        self._engine.abort(self)


@dataclass
class _Step:
    """One scheduled step: the sequences, their new tokens, and the step's terms."""

    seqs: list[tuple[_Seq, int]]
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    stable: bool
    preempted: bool
    guided_seqs: int = 0


_TIMER = "timer"
_WAKE = "wake"


class Engine:
    """vLLM V1-like continuous batching over a `Profile`, on the running loop's clock.

    Args:
        profile: The emulated server.
        max_coalesced_steps: Most steps to sleep through at once when nothing can change the
            schedule (None: no limit). Use 1 on a real clock so streamed tokens arrive one
            step apart; the schedule and records are the same either way.
        stream_interval_tokens: Tokens per streamed event after the first token, as vLLM's
            `--stream-interval` (the first token and the end are streamed at once). Default:
            1 when steps are bounded (a real clock), else `VIRTUAL_STREAM_INTERVAL_TOKENS`,
            so that events per answer do not grow with the batch on a virtual clock. Only
            when tokens reach the client changes; the schedule and records do not.
        scheduling_policy: vLLM's `--scheduling-policy`: `fcfs` (vLLM's default) or
            `priority`.
    """

    def __init__(
        self,
        profile: Profile,
        *,
        max_coalesced_steps: int | None = None,
        stream_interval_tokens: int | None = None,
        scheduling_policy: SchedulingPolicy = "fcfs",
    ) -> None:
        if scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}")
        if stream_interval_tokens is None:
            stream_interval_tokens = (
                VIRTUAL_STREAM_INTERVAL_TOKENS if max_coalesced_steps is None else 1
            )
        if stream_interval_tokens < 1:
            raise ValueError("stream_interval_tokens must be at least 1")
        self.profile = profile
        self.max_coalesced_steps = max_coalesced_steps
        self.stream_interval_tokens = stream_interval_tokens
        self.scheduling_policy: SchedulingPolicy = scheduling_policy
        self.pool = BlockPool(profile.num_gpu_blocks)
        self.stats = EngineStats()
        self.records: list[RequestRecord] = []
        self.busy_intervals: list[tuple[float, float]] = []
        self.steps = 0
        self._running: list[_Seq] = []
        self._waiting = WaitingQueue(scheduling_policy)
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[str] | None = None
        self._counter = 0
        self._was_busy = False
        self._step_end: float | None = None  # when the last step was due to end

    # -- public API ---------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        """Requests holding a running slot."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission (new or preempted)."""
        return len(self._waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use by requests (0-1), as vllm:kv_cache_usage_perc."""
        return self.pool.num_used / self.pool.num_blocks

    def submit(
        self,
        prompt_text: str,
        output_tokens: int,
        *,
        session_id: str = "-",
        stage: str = "-",
        request_id: str | None = None,
        priority: int = 0,
        guided: bool = False,
    ) -> RequestHandle:
        """Queue a request; it is admitted at the next step boundary.

        Args:
            prompt_text: The rendered prompt; its length gives the token count and its
                full blocks the prefix-cache hashes.
            output_tokens: Tokens the request will generate (at least 1).
            session_id: Attribution for the benchmark's records.
            stage: Attribution for the benchmark's records.
            request_id: Defaults to a counter.
            priority: vLLM's per-request priority (lower is served earlier); must be 0
                under the `fcfs` policy.
            guided: Under structured output: each of its decode steps costs the profile's
                `guided_seq_s` more.

        Raises:
            ValueError: the prompt does not fit in the KV cache, or a non-zero priority
                under the `fcfs` policy.
        """
        if priority and self.scheduling_policy != "priority":
            raise ValueError(
                f"Got priority {priority} but Priority scheduling is not enabled "
                "(start the server with --scheduling-policy priority)."
            )
        loop = asyncio.get_running_loop()
        prompt_tokens = count_tokens(prompt_text)
        if prompt_tokens + 1 > self.profile.kv_cache_tokens:
            raise ValueError("prompt does not fit in the KV cache")
        self._counter += 1
        record = RequestRecord(
            request_id=request_id or f"req-{self._counter}",
            session_id=session_id,
            stage=stage,
            arrival_s=loop.time(),
            prompt_tokens=prompt_tokens,
            output_tokens=max(1, output_tokens),
            priority=priority,
            guided=guided,
        )
        record.block_hashes = prompt_block_hashes(prompt_text, self.profile.block_size)
        self.records.append(record)
        seq = _Seq(record, record.block_hashes, self._counter)
        self._waiting.add(seq)
        if self._task is None:
            self._task = loop.create_task(self._run(), name=f"emulator-{self.profile.name}")
        self._poke()
        return RequestHandle(self, seq)

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request and free its KV blocks (no-op if it already ended)."""
        seq = handle._seq
        if seq.finished:
            return
        seq.aborted = True
        if seq in self._running:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self.pool.free(seq.blocks)
        seq.blocks = []
        self._finish(seq, asyncio.get_running_loop().time(), "abort")
        self._poke()

    async def aclose(self) -> None:
        """Stop the step loop and end every pending request as aborted."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        now = asyncio.get_running_loop().time()
        for seq in [*self._running, *self._waiting]:
            self.pool.free(seq.blocks)
            seq.blocks = []
            self._finish(seq, now, "abort")
        self._running.clear()
        self._waiting.clear()

    # -- the step loop ------------------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(_WAKE)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                step = self._schedule() if (self._running or self._waiting) else None
                if step is not None and not step.seqs and step.preempted:
                    continue  # everything running was preempted: admit from the queue now
                if step is None or not step.seqs:
                    self._was_busy = False
                    self._step_end = None
                    self._wake = loop.create_future()
                    await self._wake
                    continue
                await self._execute(step, loop)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug here must not leave clients waiting forever
            for seq in [*self._running, *self._waiting]:
                if seq.waiter is not None and not seq.waiter.done():
                    seq.waiter.set_exception(exc)
            raise

    async def _execute(self, step: _Step, loop: asyncio.AbstractEventLoop) -> None:
        profile = self.profile
        first = profile.step_s(
            step.prefill_tokens, step.decode_seqs, step.context_tokens, step.guided_seqs
        )
        t0 = next_step_start_s(loop.time(), self._step_end, first)
        k = self._coalescible_steps(step) if step.stable else 1
        if k == 1:
            bounds = [t0 + first]
        else:
            bounds = profile.decode_step_ends_s(
                t0, step.decode_seqs, step.context_tokens, step.guided_seqs, k
            )
        self._wake = loop.create_future()
        timer = loop.call_at(bounds[-1], _resolve, self._wake, _TIMER)
        how = await self._wake
        timer.cancel()
        done = k
        if how == _WAKE:
            now = loop.time()
            done = min(k, bisect.bisect_left(bounds, now) + 1)
            if bounds[done - 1] > now:
                await asyncio.sleep(bounds[done - 1] - now)
        self._wake = None
        self._step_end = bounds[done - 1]
        self._mark_busy(t0, bounds[done - 1])
        if k == 1:
            self._apply_single(step, t0, bounds[0])
        else:
            self._apply_decodes(step, done, t0, bounds)

    def _mark_busy(self, start: float, end: float) -> None:
        if self._was_busy and self.busy_intervals:
            self.busy_intervals[-1] = (self.busy_intervals[-1][0], end)
        else:
            self.busy_intervals.append((start, end))
        self._was_busy = True

    def _schedule(self) -> _Step:
        """Pick this step's batch, as vLLM V1: running first, then the waiting queue."""
        profile = self.profile
        budget = profile.max_num_batched_tokens
        scheduled: list[tuple[_Seq, int]] = []
        preempted = False
        i = 0
        while i < len(self._running) and budget > 0:
            seq = self._running[i]
            num_new = min(seq.num_tokens - seq.computed, budget)
            while not self._allocate(seq, seq.computed + num_new):
                if self.scheduling_policy == "priority":
                    victim = max(self._running, key=_Seq.rank)
                    self._running.remove(victim)
                    for j, (done_seq, done_new) in enumerate(scheduled):
                        if done_seq is victim:  # scheduled earlier this step: undo it
                            del scheduled[j]
                            budget += done_new
                            i -= 1
                            break
                else:
                    victim = self._running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                i += 1
                continue
            break
        all_running = len(scheduled) == len(self._running)
        admitted = False
        if not preempted:
            while self._waiting and len(self._running) < profile.max_num_seqs and budget > 0:
                seq = self._waiting.peek()
                if not self._admit(seq, budget):
                    break
                self._waiting.pop()
                self._running.append(seq)
                num_new = min(seq.num_tokens - seq.computed, budget)
                scheduled.append((seq, num_new))
                budget -= num_new
                admitted = True
        prefill_tokens = 0
        decode_seqs = 0
        guided_seqs = 0
        context = 0
        for seq, num_new in scheduled:
            if seq.prefill_done:
                decode_seqs += 1
                guided_seqs += seq.record.guided
            else:
                prefill_tokens += num_new
            context += seq.computed + num_new
        stable = bool(scheduled) and all_running and prefill_tokens == 0
        stable = stable and not preempted and not admitted
        return _Step(
            scheduled, prefill_tokens, decode_seqs, context, stable, preempted, guided_seqs
        )

    def _allocate(self, seq: _Seq, total_tokens: int) -> bool:
        need = -(-total_tokens // self.profile.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.blocks.extend(self.pool.allocate(need))
        return True

    def _admit(self, seq: _Seq, budget: int) -> bool:
        """Look up the prefix cache and allocate the first chunk; False if it cannot fit."""
        bs = self.profile.block_size
        max_hit_blocks = min(len(seq.block_hashes), (seq.num_tokens - 1) // bs)
        hits = self.pool.lookup(seq.block_hashes, max_hit_blocks)
        hit_tokens = len(hits) * bs
        num_new = min(seq.num_tokens - hit_tokens, budget)
        need = -(-(hit_tokens + num_new) // bs) - len(hits)
        if need > self.pool.num_free - self.pool.free_among(hits):
            return False
        self.pool.touch(hits)
        seq.blocks = hits
        seq.computed = hit_tokens
        seq.num_registered = len(hits)
        seq.blocks.extend(self.pool.allocate(need))
        self.stats.prefix_cache_queries += seq.num_tokens
        self.stats.prefix_cache_hits += hit_tokens
        record = seq.record
        if record.first_scheduled_s is None:
            record.cached_tokens = hit_tokens
        return True

    def _preempt(self, seq: _Seq) -> None:
        self.pool.free(seq.blocks)
        seq.blocks = []
        seq.computed = 0
        seq.num_registered = 0
        seq.prefill_done = False
        seq.record.preemptions += 1
        self.stats.preemptions += 1
        self._waiting.add_preempted(seq)

    def _coalescible_steps(self, step: _Step) -> int:
        """How many identical decode steps can run before anything changes the schedule."""
        k_max = min(seq.target - seq.generated for seq, _ in step.seqs)
        if self.max_coalesced_steps is not None:
            k_max = min(k_max, self.max_coalesced_steps)
        if k_max <= 1:
            return 1
        bs = self.profile.block_size
        free = self.pool.num_free
        # Step 1's blocks are allocated; steps 2..k need blocks as sequences cross boundaries.
        seqs = [(seq.computed, len(seq.blocks)) for seq, _ in step.seqs]

        def fits(k: int) -> bool:
            need = 0
            for computed, held in seqs:
                extra = -(-(computed + k) // bs) - held
                if extra > 0:
                    need += extra
            return need <= free

        lo, hi = 1, k_max
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _apply_single(self, step: _Step, t0: float, t1: float) -> None:
        """Account one step of any kind that ended at `t1`."""
        self.steps += 1
        self.stats.iteration_tokens.observe(step.prefill_tokens + step.decode_seqs)
        bs = self.profile.block_size
        dt = t1 - t0
        for seq, num_new in step.seqs:
            if seq.aborted:
                continue
            record = seq.record
            if record.first_scheduled_s is None:
                # A step kept on its deadline may start just before a late arrival.
                record.first_scheduled_s = max(t0, record.arrival_s)
                self.stats.queue.observe(record.first_scheduled_s - record.arrival_s)
            seq.computed += num_new
            full = min(seq.computed // bs, len(seq.block_hashes))
            for idx in range(seq.num_registered, full):
                self.pool.register(seq.blocks[idx], seq.block_hashes[idx])
            seq.num_registered = max(seq.num_registered, full)
            if seq.computed < seq.num_tokens:
                continue
            if seq.prefill_done:
                self.stats.itl.observe(dt)
            seq.prefill_done = True
            self._sample(seq, 1, t1)

    def _apply_decodes(self, step: _Step, done: int, t0: float, bounds: list[float]) -> None:
        """Account `done` coalesced decode steps."""
        self.steps += done
        self.stats.iteration_tokens.observe(step.decode_seqs, done)
        prev = t0
        n = sum(1 for seq, _ in step.seqs if not seq.aborted)
        for t in bounds[:done]:
            self.stats.itl.observe(t - prev, n)
            prev = t
        end = bounds[done - 1]
        live = [seq for seq, _ in step.seqs if not seq.aborted]
        # Allocate all before any finish frees blocks, as stepping one at a time would.
        # Blocks for steps 2..done were checked free by _coalescible_steps.
        for seq in live:
            self._allocate(seq, seq.computed + done)
            seq.computed += done
        for seq in live:
            self._sample(seq, done, end)

    def _sample(self, seq: _Seq, n: int, at: float) -> None:
        record = seq.record
        seq.generated += n
        seq.num_tokens += n
        record.generated_tokens = seq.generated
        self.stats.generation_tokens += n
        if record.first_token_s is None:
            record.first_token_s = at
            self.stats.prompt_tokens += record.prompt_tokens
            self.stats.ttft.observe(at - record.arrival_s)
        if seq.generated >= seq.target:
            self._running.remove(seq)
            self.pool.free(seq.blocks)
            seq.blocks = []
            self._finish(seq, at, "stop")
        elif seq.waiter is not None and not seq.waiter.done() and seq.generated >= seq.notify_at:
            seq.waiter.set_result(None)

    def _finish(self, seq: _Seq, at: float, reason: FinishReason) -> None:
        seq.finished = True
        record = seq.record
        record.finish_s = at
        record.finish_reason = reason
        self.stats.request_success[reason] = self.stats.request_success.get(reason, 0) + 1
        if reason != "abort":
            self.stats.e2e.observe(at - record.arrival_s)
        if seq.waiter is not None and not seq.waiter.done():
            seq.waiter.set_result(None)


def next_step_start_s(now_s: float, previous_end_s: float | None, step_s: float) -> float:
    """When a step starts: the previous step's deadline while the engine keeps up, else now.

    Steps are timed against absolute deadlines (next end = previous end + step time), so
    the event loop's lateness in waking up does not add to every step. A step that follows
    an idle engine starts now; so does one the loop is late for by a whole step or more
    (resynchronise): that time is lost rather than caught up with a burst of short steps.
    On a virtual clock timers fire on time and the start is always now.
    """
    if previous_end_s is None or now_s - previous_end_s >= step_s:
        return now_s
    return min(now_s, previous_end_s)


def _resolve(fut: asyncio.Future[str], value: str) -> None:
    if not fut.done():
        fut.set_result(value)
