"""`tandem bench`: run a workload under several policies and report them side by side."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bench.policies import SWEEP, Policy, get_policy
from bench.report import aggregate_seeds, apply_common_bound, format_table, plot_gantt
from bench.runner import PolicyRun, resolve_profiles, run_policy_emulated, run_policy_env
from bench.workloads import Workload, get_workload
from routing.calls import Role

DEFAULT_PROFILES = {"reasoning": "h100-nvl-reasoning-32b", "coder": "h100-nvl-coder-8b"}
DEFAULT_POLICIES = "seed-current,seed-phase1,seed-phase3,adaptive"


@dataclass(frozen=True)
class BenchOptions:
    """What `tandem bench` was asked for (see `cli/bench.py` for each option's meaning)."""

    workload: str = "seed-multi"
    sessions: int | None = None
    tasks: int | None = None
    arrival_spread_s: float | None = None
    policies: str = DEFAULT_POLICIES
    clock: Literal["virtual", "real"] = "virtual"
    endpoints: Literal["emulated", "env"] = "emulated"
    reasoning_profile: str | None = None
    coder_profile: str | None = None
    seed: int = 0
    seeds: int = 1
    max_tokens: str | None = None
    json_path: str | None = None
    plot: str | None = None
    table_path: str | None = None
    metrics_port: int | None = None
    quiet: bool = False


def _policy_names(text: str) -> list[str]:
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if item in ("sweep", "sweep+auto", "sweep+coder"):
            suffix = item[len("sweep") :]
            names.extend(f"fixed-{n}{suffix}" for n in SWEEP)
        elif item:
            names.append(item)
    return names


def run_bench(args: BenchOptions) -> int:
    """Run the benchmark `args` describes, print its table, write the files it names.

    Returns:
        0 when every policy's sessions succeeded, 1 when some failed, 2 for bad options.
    """
    try:
        workload = get_workload(
            args.workload,
            sessions=args.sessions,
            tasks=args.tasks,
            arrival_spread_s=args.arrival_spread_s,
            seed=args.seed,
        )
        policies = [get_policy(n) for n in _policy_names(args.policies)]
        if args.max_tokens:
            caps = dict(workload.max_tokens)
            for part in args.max_tokens.split(","):
                stage, _, value = part.partition("=")
                if stage not in caps or not value.isdigit():
                    raise ValueError(f"--max-tokens: bad item {part!r}")
                caps[stage] = int(value)
            tokens = dataclasses.replace(workload.tokens, max_tokens=caps)
            workload = dataclasses.replace(workload, tokens=tokens)
        if args.seeds < 1:
            raise ValueError("--seeds must be at least 1")
        profiles = _profiles(args)
        if profiles:
            resolve_profiles(profiles)  # a bad name or file stops here, naming it
    except ValueError as exc:
        print(f"tandem bench: {exc}", file=sys.stderr)
        return 2
    if args.endpoints == "env" and _emulated_settings():
        print(
            "tandem bench --endpoints env: set TANDEM_REASONING_URL and TANDEM_CODER_URL",
            file=sys.stderr,
        )
        return 2
    if args.endpoints == "env" and args.clock == "virtual":
        print(
            "tandem bench: --endpoints env needs --clock real (real servers keep real time)",
            file=sys.stderr,
        )
        return 2
    report, runs = _bench(workload, policies, args, profiles)
    table = format_table(report)
    print(table)
    _write(args.table_path, table + "\n")
    _write(args.json_path, json.dumps(report, indent=2, sort_keys=False) + "\n")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        title = f"{workload.name}: {workload.sessions} x {workload.tasks} files · " + (
            f"{profiles['reasoning']} + {profiles['coder']}"
            if args.endpoints == "emulated"
            else "real servers"
        )
        plot_gantt(runs, args.plot, title)
        print(f"wrote {args.plot}")
    return 0 if all(r["sessions_failed"] == 0 for r in report["results"]) else 1


def _write(path: str | None, text: str) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"wrote {path}")


def _emulated_settings() -> bool:
    from graph.settings import load_settings

    return load_settings().emulated


def _profiles(args: BenchOptions) -> dict[Role, str]:
    """Profiles by role: the defaults on emulators; on real servers only those given."""
    given = {"reasoning": args.reasoning_profile, "coder": args.coder_profile}
    if args.endpoints == "env":
        if not any(given.values()):
            return {}
        if not all(given.values()):
            raise ValueError("--endpoints env: give both --reasoning-profile and --coder-profile")
    return {role: given[role] or DEFAULT_PROFILES[role] for role in ("reasoning", "coder")}


def _bench(
    workload: Workload, policies: list[Policy], args: BenchOptions, profiles: dict[Role, str]
) -> tuple[dict[str, Any], list[PolicyRun]]:
    """Every policy on every seed; the report's results are means over seeds.

    Each run has a loop of its own (`serving.clock.run`): on the virtual clock every run
    starts at time 0, so a run's figures do not depend on which runs came before it (times
    far from 0 round differently, and a tie broken the other way moved agentic-long's
    fixed-64 on seed 0 from 1,678.7 s to 1,690.8 s).
    """
    from serving.clock import run as run_on_clock

    virtual = args.clock == "virtual"
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    metrics = None
    if args.metrics_port is not None:
        from routing.exporter import TandemMetrics

        metrics = TandemMetrics()
        port = metrics.serve(args.metrics_port)
        if say:
            say(f"tandem metrics on http://127.0.0.1:{port}/metrics")
    endpoints = None
    if args.endpoints == "env":
        from graph.runtime import configured_endpoints
        from graph.settings import load_settings

        settings = load_settings()
        if settings.emulated:
            raise SystemExit(
                "tandem bench --endpoints env: set TANDEM_REASONING_URL and TANDEM_CODER_URL"
            )
        endpoints = configured_endpoints(settings)
    seeds = [args.seed + i for i in range(args.seeds)]
    first_runs: list[PolicyRun] = []
    per_policy: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in policies]
    bounds: list[dict[str, Any]] = []
    for seed in seeds:
        seeded = dataclasses.replace(workload, seed=seed)
        runs = []
        for policy in policies:
            if say:
                say(f"== seed {seed} · {policy.name}: {policy.description}")
            if endpoints is None:
                one_run = run_policy_emulated(
                    seeded,
                    policy,
                    profiles=profiles,
                    seed=seed,
                    real_clock=not virtual,
                    progress=None,
                    metrics=metrics,
                )
            else:  # real servers: `run_bench` refused the virtual clock
                declared = resolve_profiles(profiles) if profiles else None
                one_run = run_policy_env(
                    seeded, policy, endpoints, progress=None, metrics=metrics, profiles=declared
                )
            run = run_on_clock(one_run, virtual=virtual)
            runs.append(run)
            if say:
                r = run.result()
                say(
                    f"   makespan {r['makespan_s']:.1f} s, own bound {r['lower_bound_own_s']}, "
                    f"sessions ok {r['sessions_ok']}"
                )
        records = [run.result() for run in runs]
        bound = apply_common_bound(records)
        if bound is not None:
            bounds.append({"seed": seed, **bound})
        for index, record in enumerate(records):
            per_policy[index].append((seed, record))
        if not first_runs:
            first_runs = runs
    report = {
        "workload": workload.name,
        "clock": args.clock,
        "endpoints": args.endpoints,
        "profiles": profiles or "env",
        "sessions": workload.sessions,
        "tasks_per_session": workload.tasks,
        "arrival_spread_s": workload.arrival_spread_s,
        "max_tokens": workload.max_tokens,
        "seed": args.seed,
        "seeds": seeds,
        "min_output_frac": workload.tokens.min_output_frac,
        "overrides": workload.overrides,
        "profile_names": {role: p.name for role, p in resolve_profiles(profiles).items()}
        if profiles
        else None,
        "lower_bound_s": round(sum(b["lower_bound_s"] for b in bounds) / len(bounds), 4)
        if bounds
        else None,
        "lower_bound": bounds or None,
        "results": [aggregate_seeds(items) for items in per_policy],
    }
    return report, first_runs
