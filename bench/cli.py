"""`tandem bench`: run a workload under several policies and report them side by side."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.policies import SWEEP, get_policy
from bench.report import format_table, plot_gantt
from bench.runner import PolicyRun, run_policy_emulated, run_policy_env
from bench.workloads import WORKLOADS, Workload, get_workload
from routing.calls import Role

DEFAULT_PROFILES = {"reasoning": "h100-reasoning-32b", "coder": "h100-coder-8b"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench", description=__doc__)
    p.add_argument("--workload", default="seed-multi", help=f"{', '.join(WORKLOADS)} or adhoc")
    p.add_argument("--sessions", type=int, help="ad hoc: number of sessions")
    p.add_argument("--tasks", type=int, help="ad hoc: files per session")
    p.add_argument(
        "--arrival-spread-s", type=float, help="ad hoc: arrivals spread over this many seconds"
    )
    p.add_argument(
        "--policies",
        default="seed-current,seed-phase1,seed-phase3,adaptive",
        help="comma-separated: seed-current, seed-phase1, seed-phase3, fixed-N, fixed-N+auto, "
        "adaptive, adaptive-reasoning, adaptive-fifo; "
        "'sweep' expands to fixed-4 … fixed-256 ('sweep+auto': fixed-N+auto)",
    )
    p.add_argument("--clock", choices=["virtual", "real"], default="virtual")
    p.add_argument("--endpoints", choices=["emulated", "env"], default="emulated")
    p.add_argument("--reasoning-profile", default=DEFAULT_PROFILES["reasoning"])
    p.add_argument("--coder-profile", default=DEFAULT_PROFILES["coder"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-tokens", help="override per-stage caps, e.g. plan=256,code=128,review=128"
    )
    p.add_argument("--json", dest="json_path", help="write the report here")
    p.add_argument("--plot", help="write the Gantt chart (PNG) here")
    p.add_argument("--metrics-port", type=int, help="serve tandem_ metrics on this localhost port")
    p.add_argument("--quiet", action="store_true")
    return p


def _policy_names(text: str) -> list[str]:
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if item in ("sweep", "sweep+auto", "sweep+coder"):
            suffix = item[len("sweep") :]
            names.extend(f"fixed-{n}{suffix}" for n in SWEEP)
        elif item:
            names.append(item)
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tandem bench`."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
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
            workload = dataclasses.replace(workload, max_tokens=caps)
    except ValueError as exc:
        print(f"tandem bench: {exc}", file=sys.stderr)
        return 2
    if args.endpoints == "env" and args.clock == "virtual":
        print(
            "tandem bench: --endpoints env needs --clock real (real servers keep real time)",
            file=sys.stderr,
        )
        return 2
    profiles: dict[Role, str] = {"reasoning": args.reasoning_profile, "coder": args.coder_profile}
    from serving.clock import run

    report, runs = run(_bench(workload, policies, args, profiles), virtual=args.clock == "virtual")
    print(format_table(report))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
        print(f"wrote {args.json_path}")
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


async def _bench(
    workload: Workload, policies: list[Any], args: argparse.Namespace, profiles: dict[Role, str]
) -> tuple[dict[str, Any], list[PolicyRun]]:
    runs: list[PolicyRun] = []
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
    for policy in policies:
        if say:
            say(f"== {policy.name}: {policy.description}")
        if endpoints is None:
            run = await run_policy_emulated(
                workload,
                policy,
                profiles=profiles,
                seed=args.seed,
                real_clock=args.clock == "real",
                progress=None,
                metrics=metrics,
            )
        else:
            run = await run_policy_env(workload, policy, endpoints, progress=None, metrics=metrics)
        runs.append(run)
        if say:
            r = run.result()
            say(
                f"   makespan {r['makespan_s']:.1f} s, efficiency {r['efficiency']}, "
                f"sessions ok {r['sessions_ok']}"
            )
    report = {
        "workload": workload.name,
        "clock": args.clock,
        "endpoints": args.endpoints,
        "profiles": profiles if args.endpoints == "emulated" else "env",
        "sessions": workload.sessions,
        "tasks_per_session": workload.tasks,
        "arrival_spread_s": workload.arrival_spread_s,
        "max_tokens": workload.max_tokens,
        "seed": args.seed,
        "results": [run.result() for run in runs],
    }
    return report, runs
