"""`tandem bench`: run a workload under several policies and report them side by side."""

from __future__ import annotations

import errno
from typing import Annotated, Literal

import typer

from bench.cli import DEFAULT_POLICIES, DEFAULT_PROFILES, BenchOptions
from bench.policies import POLICY_NAMES
from bench.workloads import WORKLOADS
from cli.errors import CliError


def bench(
    workload: Annotated[
        str, typer.Option(help=f"A workload ({', '.join(WORKLOADS)}) or adhoc.")
    ] = "seed-multi",
    sessions: Annotated[
        int | None, typer.Option(min=1, help="Ad hoc: number of sessions.", show_default=False)
    ] = None,
    tasks: Annotated[
        int | None, typer.Option(min=1, help="Ad hoc: files per session.", show_default=False)
    ] = None,
    arrival_spread_s: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="Ad hoc: arrivals spread over this many seconds.", show_default=False
        ),
    ] = None,
    policies: Annotated[
        str,
        typer.Option(
            help=f"Comma-separated: {POLICY_NAMES}; 'sweep' expands to fixed-4 … fixed-256 "
            "('sweep+auto': fixed-N+auto)."
        ),
    ] = DEFAULT_POLICIES,
    clock: Annotated[
        Literal["virtual", "real"],
        typer.Option(help="virtual: emulated seconds pass instantly (emulated endpoints only)."),
    ] = "virtual",
    endpoints: Annotated[
        Literal["emulated", "env"],
        typer.Option(help="emulated: in-process emulators; env: the TANDEM_*_URL servers."),
    ] = "emulated",
    reasoning_profile: Annotated[
        str | None,
        typer.Option(
            help=f"Profile name or .yaml file (default {DEFAULT_PROFILES['reasoning']}; with "
            "--endpoints env: the servers' profile, for gpu_saturation).",
            show_default=False,
        ),
    ] = None,
    coder_profile: Annotated[
        str | None,
        typer.Option(
            help=f"Profile name or .yaml file (default {DEFAULT_PROFILES['coder']}).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="First workload and emulator seed.")] = 0,
    seeds: Annotated[
        int, typer.Option(min=1, help="Run this many seeds (seed, seed+1, …); report means.")
    ] = 1,
    max_tokens: Annotated[
        str | None,
        typer.Option(
            help="Override per-stage caps, e.g. plan=256,code=128,review=128.", show_default=False
        ),
    ] = None,
    json_path: Annotated[
        str | None, typer.Option("--json", help="Write the report (JSON) here.", show_default=False)
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option(help="Write the Gantt chart (PNG, the first seed) here.", show_default=False),
    ] = None,
    table_path: Annotated[
        str | None,
        typer.Option("--table", help="Write the printed table (text) here.", show_default=False),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve tandem_ metrics on this localhost port.",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print the table only.")] = False,
) -> None:
    """Benchmark admission policies side by side on one workload.

    Exit 0 when every policy's sessions succeeded, 1 when some failed, 2 for bad options.
    """
    from bench.cli import run_bench

    options = BenchOptions(
        workload=workload,
        sessions=sessions,
        tasks=tasks,
        arrival_spread_s=arrival_spread_s,
        policies=policies,
        clock=clock,
        endpoints=endpoints,
        reasoning_profile=reasoning_profile,
        coder_profile=coder_profile,
        seed=seed,
        seeds=seeds,
        max_tokens=max_tokens,
        json_path=json_path,
        plot=plot,
        table_path=table_path,
        metrics_port=metrics_port,
        quiet=quiet,
    )
    try:
        code = run_bench(options)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and metrics_port is not None:
            raise CliError(f"bench: metrics port {metrics_port} is in use") from None
        raise
    raise typer.Exit(code)
