"""Runs a workload under each policy with the real graph and router, and measures it.

Virtual clock: the emulators, the router and every session share one looptime loop; the
graph talks to the emulators through an in-process streaming transport. Real clock: the same
over loopback HTTP, to emulators started here or to the servers in `TANDEM_*` settings.

Prefix cache, two figures per role. `prefix_cache_hit_rate`: the servers' own counters over
the run (hit tokens / queried tokens, from `/metrics`). `prefix_shareable_hit_share`: of the
prompt tokens that a cache could have served, the share it did serve. A prompt's shareable
prefix is the longest run of whole KV blocks it shares with an earlier prompt of the same
session on the same role (earlier: submitted before it; only prompts the server admitted
count, as sources and as queries), capped as the server caps a hit (never the prompt's last
token). The served part is the prompt's cached tokens, at most its shareable prefix: tokens
cached from another session's prompt count only where the session's own prompts could have
supplied them too. Emulated servers only: real ones do not name their requests' blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.policies import Policy
from bench.workloads import Workload
from graph.graph import build_graph
from graph.runtime import GPU_OF, build_runtime, emulator_apps, in_process_endpoints
from graph.sessions import SessionResult, run_many
from graph.settings import Settings
from nodes.context import RunContext, ServerOptions, TokenCaps
from nodes.review import review_calls, review_share
from routing.endpoints import Replica
from routing.exporter import TandemMetrics
from routing.vllm_metrics import ServerSnapshot, parse_metrics, prefix_hit_rate_between
from serving.clock import now
from serving.emulator.profiles import Profile, get_profile, saturated_time_s, solo_latency_s
from serving.roles import ROLES, Role

# Settings' defaults, not the environment's `TANDEM_*`: figures must not depend on the shell
# they were run from. Policies set the limit, order and run context; endpoints are given.
BENCH_SETTINGS = Settings.model_construct()
STAGES: tuple[str, ...] = ("plan", "code", "review")


def retry_jitter(workload: Workload) -> Callable[[], float]:
    """The draw that spreads a run's retry back-offs, seeded by its workload and seed.

    A call that fails (a 503 from a full server queue, or a timeout) is retried after a
    random back-off. Drawn from the process's random source, that back-off made a run on the
    virtual clock differ from the same run in another process (agentic-long fixed-64, seed 0,
    when the request bound was 600 s: 1,666.8, 1,678.7 or 1,690.8 s); seeded, the run repeats
    from one process to the next, and every policy of a seed draws the same back-offs.
    """
    return random.Random(f"tandem-bench-retry:{workload.name}:{workload.seed}").random


@dataclass
class RequestSpan:
    """One request as the server saw it (for the Gantt chart and the lower bound)."""

    role: str
    session_id: str
    stage: str
    arrival_s: float
    start_s: float
    end_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    # Ended by the client (a timeout) or the server: output_tokens is what it generated.
    aborted: bool = False
    # Prompt tokens an earlier prompt of the session on this role could have cached.
    shareable_tokens: int = 0


@dataclass
class PolicyRun:
    """Everything measured for one policy."""

    policy: Policy
    sessions: list[SessionResult]
    arrivals_s: list[float]
    t0: float
    t_end: float
    busy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    generation_tokens: dict[str, int] = field(default_factory=dict)
    preemptions: int = 0
    requests: int = 0
    spans: list[RequestSpan] = field(default_factory=list)
    router_stats: dict[str, Any] = field(default_factory=dict)
    lower_bound: dict[str, float] | None = None
    # Per review placement ("reasoning", "coder"): the bound of this run's requests with every
    # review served there (see `placement_bounds`).
    placement_bounds: dict[str, dict[str, float]] = field(default_factory=dict)
    # The profiles the servers ran (or were declared to run, for real servers); None: unknown.
    profiles: dict[str, Profile] | None = None
    # Real servers only: (prompt tokens, requests) per role from /metrics, for saturation.
    served: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Per role: the servers' prefix-cache hit rate over the run (None: nothing queried).
    prefix_cache_hit_rate: dict[str, float | None] = field(default_factory=dict)

    @property
    def makespan_s(self) -> float:
        return self.t_end - self.t0

    def result(self) -> dict[str, Any]:
        """The JSON record of this policy (field names are a contract).

        `lower_bound_s` and `efficiency` are this run's own here; the report replaces them with
        the workload run's common bound (`bench.report.apply_common_bound`).
        """
        makespan = max(self.makespan_s, 1e-9)
        latencies = sorted(
            s.finished_at - (self.t0 + a)
            for s, a in zip(self.sessions, self.arrivals_s, strict=True)
        )
        tasks = sum(s.files_ok for s in self.sessions)
        calls = {role: sum(review_calls(s.usage)[role] for s in self.sessions) for role in ROLES}
        bound = self.lower_bound["lower_bound_s"] if self.lower_bound else None
        own = None if bound is None else round(bound, 3)
        own_efficiency = None if bound is None else round(bound / makespan, 4)
        return {
            "policy": self.policy.name,
            "makespan_s": round(makespan, 3),
            "lower_bound_s": own,
            "efficiency": own_efficiency,
            "tasks_per_s": round(tasks / makespan, 4),
            "session_latency_mean_s": round(statistics.fmean(latencies), 3),
            "session_latency_p50_s": round(_percentile(latencies, 50), 3),
            "session_latency_p95_s": round(_percentile(latencies, 95), 3),
            "gpu_busy": {
                r: round(_busy_fraction(self.busy.get(r, []), self.t0, self.t_end), 4)
                for r in ROLES
            },
            "tokens_per_s": {
                r: round(self.generation_tokens.get(r, 0) / makespan, 1) for r in ROLES
            },
            "preemptions": self.preemptions,
            "requests": self.requests,
            "sessions_ok": sum(1 for s in self.sessions if s.status in ("ok", "partial")),
            "sessions_failed": sum(1 for s in self.sessions if s.status not in ("ok", "partial")),
            "files_ok": tasks,
            "lower_bound_parts": self._bound_parts(),
            "router": self.router_stats,
            "description": self.policy.description,
            "review_on": self.policy.review_on,
            "review_share": review_share(calls),
            "review_calls": calls,
            "engine_priority": self.policy.engine_priority,
            "lower_bound_own_s": own,
            "efficiency_own": own_efficiency,
            "gpu_saturation": self._saturation(makespan),
            "stage_s": stage_times_s(self.spans),
            "prefix_cache_hit_rate": {
                r: _round(self.prefix_cache_hit_rate.get(r), 4) for r in ROLES
            },
            "prefix_shareable_hit_share": prefix_shareable_hit_share(self.spans),
        }

    def _bound_parts(self) -> dict[str, Any] | None:
        if self.lower_bound is None:
            return None
        rounded = {k: round(v, 3) for k, v in self.lower_bound.items()}
        by_review_on = {
            where: {k: round(v, 3) for k, v in parts.items()}
            for where, parts in self.placement_bounds.items()
        }
        return {**rounded, "by_review_on": by_review_on}

    def _saturation(self, makespan_s: float) -> dict[str, float | None]:
        """Per role: generated tokens / what the profile generates saturated over the makespan."""
        out: dict[str, float | None] = {}
        for role in ROLES:
            profile = self.profiles.get(role) if self.profiles else None
            context = self._mean_context_tokens(role)
            if profile is None or context is None:
                out[role] = None
                continue
            capacity = saturated_decode_tokens_per_s(profile, context) * makespan_s
            out[role] = round(self.generation_tokens.get(role, 0) / capacity, 4)
        return out

    def _mean_context_tokens(self, role: str) -> float | None:
        """Mean context behind each token `role` generated.

        From the spans: sum of o (p + o / 2) over sum of o, for requests of p prompt and o
        output tokens (a request holds p + o / 2 on average while it decodes). Real servers
        give only totals: mean prompt + half the mean output per request.
        """
        if role in self.served:
            prompt_tokens, requests = self.served[role]
            if requests <= 0:
                return 0.0
            return (prompt_tokens + self.generation_tokens.get(role, 0) / 2) / requests
        if self.profiles is None:
            return None
        spans = [s for s in self.spans if s.role == role and s.output_tokens > 0]
        generated = sum(s.output_tokens for s in spans)
        if not generated:
            return 0.0
        held = sum(s.output_tokens * (s.prompt_tokens + s.output_tokens / 2) for s in spans)
        return held / generated


def saturated_decode_tokens_per_s(profile: Profile, mean_context_tokens: float) -> float:
    """Tokens per second `profile` generates with its largest batch of decodes.

    The batch is `max_num_seqs`, capped by how many sequences of `mean_context_tokens` fit in
    the KV cache (at least 1); each holds `mean_context_tokens` of context. Prefill is left out:
    this is the decode rate a saturated server sustains.
    """
    context = max(1.0, mean_context_tokens)
    batch = max(1, min(profile.max_num_seqs, int(profile.kv_cache_tokens // context)))
    step_s = profile.step_s(0, batch, round(batch * context))
    return batch / step_s


def shareable_prefix_tokens(
    prompts: Sequence[tuple[str, Sequence[int], int]], block_size: int
) -> list[int]:
    """Each prompt's shareable prefix, in tokens (see the module docstring).

    Args:
        prompts: `(session_id, block hash chain, prompt tokens)` of one role's admitted
            prompts, in submission order. The hashes chain, so a prompt's first n blocks
            match an earlier prompt's exactly when its n-th hash was seen before.
        block_size: Tokens per KV block.
    """
    seen: dict[str, set[int]] = {}
    out: list[int] = []
    for session_id, hashes, prompt_tokens in prompts:
        earlier = seen.setdefault(session_id, set())
        cap = min(len(hashes), max(0, (prompt_tokens - 1) // block_size))
        blocks = 0
        while blocks < cap and hashes[blocks] in earlier:
            blocks += 1
        out.append(blocks * block_size)
        earlier.update(hashes)
    return out


def prefix_shareable_hit_share(spans: Sequence[RequestSpan]) -> dict[str, float | None] | None:
    """Per role: cached tokens within shareable prefixes / shareable tokens (None: none).

    None as a whole when no spans were recorded (real servers).
    """
    if not spans:
        return None
    out: dict[str, float | None] = {}
    for role in ROLES:
        mine = [s for s in spans if s.role == role]
        shareable = sum(s.shareable_tokens for s in mine)
        served = sum(min(s.cached_tokens, s.shareable_tokens) for s in mine)
        out[role] = round(served / shareable, 4) if shareable else None
    return out


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _stage_phases(items: Sequence[RequestSpan]) -> list[tuple[str, list[RequestSpan]]]:
    """A session's requests in arrival order, grouped into runs of one stage (fix rounds too)."""
    phases: list[tuple[str, list[RequestSpan]]] = []
    for span in sorted(items, key=lambda s: (s.arrival_s, s.stage)):
        if phases and phases[-1][0] == span.stage:
            phases[-1][1].append(span)
        else:
            phases.append((span.stage, [span]))
    return phases


def stage_times_s(spans: Sequence[RequestSpan]) -> dict[str, float] | None:
    """Mean per-session seconds in each stage ("plan", "code", "review").

    A stage's time in a session is, per round, its first request's arrival to its last
    request's finish, summed over the rounds (fix rounds count in code and review). None when
    no spans were recorded (real servers).
    """
    by_session: dict[str, list[RequestSpan]] = {}
    for span in spans:
        by_session.setdefault(span.session_id, []).append(span)
    if not by_session:
        return None
    totals = {stage: 0.0 for stage in STAGES}
    for items in by_session.values():
        for stage, phase in _stage_phases(items):
            if stage in totals:
                totals[stage] += max(s.end_s for s in phase) - min(s.arrival_s for s in phase)
    return {stage: round(total / len(by_session), 3) for stage, total in totals.items()}


def _percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: stable and explainable)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * pct // 100)))
    return ordered[int(rank) - 1]


def _busy_fraction(intervals: Sequence[tuple[float, float]], t0: float, t1: float) -> float:
    total = 0.0
    for start, end in intervals:
        lo, hi = max(start, t0), min(end, t1)
        if hi > lo:
            total += hi - lo
    return total / (t1 - t0) if t1 > t0 else 0.0


def lower_bound(
    spans: Sequence[RequestSpan],
    profiles: dict[str, Profile],
    arrivals: dict[str, float],
    t0: float,
) -> dict[str, float]:
    """The best makespan possible for the requests this run made, on these profiles.

    The larger of (a) each GPU's work at its saturated throughput (`saturated_time_s`: all of
    that GPU's requests present at once, best batching), and (b) each session's critical path
    from its arrival: its stages run in order (plan, code round, review, …), a stage can end no
    sooner than its slowest request served alone on an idle server (`solo_latency_s`).
    """
    # An aborted request counts with the tokens it generated; one that generated none may not
    # have finished its prefill either, so it counts not at all.
    spans = [s for s in spans if not (s.aborted and s.output_tokens == 0)]
    parts: dict[str, float] = {}
    for role in ROLES:
        reqs = [
            (s.prompt_tokens, s.output_tokens, s.cached_tokens) for s in spans if s.role == role
        ]
        parts[f"{role}_saturated_s"] = saturated_time_s(profiles[role], reqs) if reqs else 0.0
    critical = 0.0
    by_session: dict[str, list[RequestSpan]] = {}
    for span in spans:
        by_session.setdefault(span.session_id, []).append(span)
    for sid, items in by_session.items():
        path = sum(
            max(
                solo_latency_s(
                    profiles[span.role],
                    max(1, span.prompt_tokens - span.cached_tokens),
                    span.output_tokens,
                )
                for span in phase
            )
            for _stage, phase in _stage_phases(items)
        )
        critical = max(critical, arrivals.get(sid, t0) - t0 + path)
    parts["critical_path_s"] = critical
    parts["lower_bound_s"] = max(parts.values())
    return parts


def placement_bounds(
    spans: Sequence[RequestSpan],
    profiles: dict[str, Profile],
    arrivals: dict[str, float],
    t0: float,
) -> dict[str, dict[str, float]]:
    """`lower_bound` of this run's requests with every review served on each role.

    A review request carries the same prompt whichever GPU serves it, and the emulator draws
    its length from its content, so it is the same request on either GPU. On the reasoning
    model its answer splits into reasoning and content, with the same token total. The cached
    prefix is kept as this run saw it (an approximation: the other GPU's cache may differ).
    """
    bounds: dict[str, dict[str, float]] = {}
    for where in ROLES:
        moved = [
            dataclasses.replace(span, role=where) if span.stage == "review" else span
            for span in spans
        ]
        bounds[where] = lower_bound(moved, profiles, arrivals, t0)
    return bounds


def resolve_profiles(
    profiles: Mapping[Role, str], min_output_frac: float | None = None
) -> dict[Role, Profile]:
    """The profile of each role (a name or a .yaml path), with the workload's output fraction."""
    resolved: dict[Role, Profile] = {}
    for role in ROLES:
        profile = get_profile(profiles[role])
        if min_output_frac is not None:
            profile = dataclasses.replace(profile, min_output_frac=min_output_frac)
        resolved[role] = profile
    return resolved


async def run_policy_emulated(
    workload: Workload,
    policy: Policy,
    *,
    profiles: Mapping[Role, str],
    seed: int = 0,
    real_clock: bool = False,
    progress: Callable[[str], None] | None = None,
    metrics: TandemMetrics | None = None,
) -> PolicyRun:
    """One policy against fresh emulators (in-process, or over loopback HTTP on a real clock)."""
    models: dict[Role, str] = {role: f"tandem-{role}" for role in ROLES}
    prof = resolve_profiles(profiles, workload.tokens.min_output_frac)
    apps = emulator_apps(prof, models, seed, engine_priority=policy.engine_priority)
    servers: list[Any] = []
    if real_clock:
        endpoints: dict[Role, list[Replica]] = {}
        for role in ROLES:
            url, server = await _serve_loopback(apps[role])
            servers.append(server)
            endpoints[role] = [
                Replica(
                    url=url,
                    model=models[role],
                    gpu=GPU_OF[role],
                    priority=policy.engine_priority,
                )
            ]
    else:
        endpoints = in_process_endpoints(apps, models)
    before = {role: _scrape_app(apps[role]) for role in ROLES}
    try:
        run = await _run_with_router(workload, policy, endpoints, progress, metrics)
    finally:
        for server in servers:
            server.should_exit = True
        for app in apps.values():
            await app.state.engine.aclose()
    engines = {role: apps[role].state.engine for role in ROLES}
    for role, engine in engines.items():
        run.prefix_cache_hit_rate[role] = prefix_hit_rate_between(
            [(before[role], _scrape_app(apps[role]))]
        )
        run.busy[role] = list(engine.busy_intervals)
        run.generation_tokens[role] = engine.stats.generation_tokens
        run.preemptions += engine.stats.preemptions
        run.requests += len(engine.records)
        admitted = [rec for rec in engine.records if rec.first_scheduled_s is not None]
        counts = shareable_prefix_tokens(
            [(rec.session_id, rec.block_hashes, rec.prompt_tokens) for rec in admitted],
            engine.profile.block_size,
        )
        shareable = {id(rec): n for rec, n in zip(admitted, counts, strict=True)}
        for rec in engine.records:
            if rec.finish_s is None:
                continue
            run.spans.append(
                RequestSpan(
                    role=role,
                    session_id=rec.session_id,
                    stage=rec.stage,
                    arrival_s=rec.arrival_s,
                    start_s=rec.first_scheduled_s
                    if rec.first_scheduled_s is not None
                    else rec.arrival_s,
                    end_s=rec.finish_s,
                    prompt_tokens=rec.prompt_tokens,
                    output_tokens=rec.generated_tokens
                    if rec.finish_reason == "abort"
                    else rec.generated_tokens or rec.output_tokens,
                    cached_tokens=rec.cached_tokens,
                    aborted=rec.finish_reason == "abort",
                    shareable_tokens=shareable.get(id(rec), 0),
                )
            )
    arrivals = {workload.session_id(i): run.t0 + a for i, a in enumerate(run.arrivals_s)}
    run.profiles = {str(role): profile for role, profile in prof.items()}
    run.lower_bound = lower_bound(run.spans, run.profiles, arrivals, run.t0)
    run.placement_bounds = placement_bounds(run.spans, run.profiles, arrivals, run.t0)
    return run


def _scrape_app(app: Any) -> ServerSnapshot:
    """The emulator's `/metrics` page, read from its registry (no request, no clock step)."""
    from prometheus_client import generate_latest

    return parse_metrics(generate_latest(app.state.registry).decode(), now())


async def _run_with_router(
    workload: Workload,
    policy: Policy,
    endpoints: dict[Role, list[Replica]],
    progress: Callable[[str], None] | None,
    metrics: TandemMetrics | None = None,
) -> PolicyRun:
    # One exporter may serve every policy of a bench run in turn (`--metrics-port`).
    metrics = metrics or TandemMetrics(gpu=False)
    runtime = build_runtime(
        BENCH_SETTINGS,
        limit=policy.limit,
        order=policy.order,
        endpoints=endpoints,
        metrics=metrics,
        retry_jitter=retry_jitter(workload),
    )
    fanout = policy.fanout()
    requests = [(workload.session_id(i), workload.request(i)) for i in range(workload.sessions)]
    arrivals = workload.arrivals_s()
    with tempfile.TemporaryDirectory(prefix="tandem-bench-") as workspace:
        context = RunContext(
            review_on=policy.review_on,  # type: ignore[arg-type]
            max_parallel_agents=policy.fanout_cap,
            max_files=max(workload.tasks, 1),
            max_tokens=TokenCaps.model_validate(workload.max_tokens),
        )
        graph = build_graph(
            runtime.models,
            defaults=context,
            options=ServerOptions(workspace=Path(workspace)),
            fanout=fanout,
            name=f"tandem-bench-{policy.name}",
        )
        try:
            await runtime.router.start()
            t0 = now()
            sessions = await run_many(
                graph,
                requests,
                context=context,
                fanout=fanout,
                workspace=Path(workspace),
                progress=progress,
                on_code_done=metrics.session_progress,
                on_stage=metrics.stage_latency,
                concurrent=policy.concurrent_sessions,
                arrivals_s=arrivals,
            )
            stats = runtime.router.stats()
        finally:
            await runtime.aclose()
    t_end = max(s.finished_at for s in sessions)
    return PolicyRun(
        policy=policy,
        sessions=sessions,
        arrivals_s=arrivals,
        t0=t0,
        t_end=t_end,
        router_stats=stats,
    )


async def _serve_loopback(app: Any) -> tuple[str, Any]:
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    asyncio.get_running_loop().create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.02)
    return f"http://127.0.0.1:{port}/v1", server


async def run_policy_env(
    workload: Workload,
    policy: Policy,
    endpoints: dict[Role, list[Replica]],
    *,
    sample_interval_s: float = 0.25,
    progress: Callable[[str], None] | None = None,
    metrics: TandemMetrics | None = None,
    profiles: Mapping[Role, Profile] | None = None,
) -> PolicyRun:
    """One policy against real servers: busy time and tokens come from their `/metrics`.

    `gpu_busy` is the fraction of /metrics samples (every `sample_interval_s`) that showed at
    least one running request; tokens and preemptions are counter deltas over the run.
    `gpu_saturation` needs `profiles` (the servers' declared profiles); else it is null.
    A replica sends vLLM's `priority` only when it runs the priority policy (its `priority`
    flag) and the policy asks for engine priority.
    """
    from bench.sampler import MetricsSampler

    endpoints = {
        role: [
            dataclasses.replace(r, priority=r.priority and policy.engine_priority) for r in replicas
        ]
        for role, replicas in endpoints.items()
    }
    sampler = MetricsSampler(endpoints, interval_s=sample_interval_s)
    await sampler.start()
    try:
        run = await _run_with_router(workload, policy, endpoints, progress, metrics)
    finally:
        await sampler.stop()
    for role in ROLES:
        run.busy[role] = sampler.busy_intervals(role)
        run.generation_tokens[role] = int(sampler.delta(role, "generation_tokens"))
        run.served[role] = (sampler.delta(role, "prompt_tokens"), sampler.delta(role, "requests"))
    run.profiles = {str(r): p for r, p in profiles.items()} if profiles else None
    run.prefix_cache_hit_rate = {role: sampler.prefix_hit_rate(role) for role in ROLES}
    run.preemptions = int(sum(sampler.delta(role, "preemptions") for role in ROLES))
    run.requests = int(sum(sampler.delta(role, "requests") for role in ROLES))
    return run
