"""The `tandem` command: run, resume, emulate, serve, bench, calibrate."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graph.settings import Settings, load_settings

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig

DEMO_REQUEST = (
    "Build a small Python package `textstats` that reads a text file and reports word "
    "statistics. Files: textstats/__init__.py (version and public API), textstats/tokenize.py "
    "(split text into lowercase words), textstats/counts.py (word frequencies, top-N), "
    "textstats/report.py (format a report as text or JSON), textstats/cli.py (argparse entry "
    "point), tests/test_counts.py (pytest tests), pyproject.toml and README.md."
)


def _run_parser(sub: Any) -> None:
    run = sub.add_parser("run", help="run sessions of the workflow")
    run.add_argument("request", nargs="?", help="what to build")
    run.add_argument("--request-file", help="read the request from this file")
    run.add_argument("--demo", action="store_true", help="use the built-in demo request")
    run.add_argument("--sessions", type=int, default=1, help="concurrent sessions (default 1)")
    run.add_argument(
        "--clock",
        choices=["real", "virtual"],
        help="virtual: emulated GPU time passes instantly (default when emulated)",
    )
    run.add_argument("--limit", help="admission limit per GPU: adaptive | unlimited | fixed-N")
    run.add_argument("--order", choices=["fifo", "las"], help="admission order across sessions")
    run.add_argument("--metrics-port", type=int, help="serve tandem_ metrics on this port")
    run.add_argument("--no-checkpoint", action="store_true", help="do not keep SQLite checkpoints")
    run.add_argument("--quiet", action="store_true", help="print the summary only")
    run.add_argument(
        "--max-tokens",
        type=parse_max_tokens,
        default={},
        help="output token caps per stage, e.g. plan=512,code=768,review=384",
    )
    resume = sub.add_parser("resume", help="continue an interrupted or failed session")
    resume.add_argument("session_id")
    resume.add_argument("--clock", choices=["real", "virtual"])


STAGES = ("plan", "code", "review")


def parse_max_tokens(text: str) -> dict[str, int]:
    """`plan=512,code=768` → {"plan": 512, "code": 768}; stages plan, code, review.

    Raises:
        argparse.ArgumentTypeError: an unknown stage or a cap that is not a positive integer.
    """
    caps: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        stage, _, value = part.partition("=")
        if stage not in STAGES or not value.isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(
                f"bad item {part!r}: use STAGE=N with STAGE in {', '.join(STAGES)} and N >= 1"
            )
        caps[stage] = int(value)
    return caps


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tandem` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with their own parsers live in their own rooms.
    if args_list and args_list[0] == "emulate":
        from serving.emulator.cli import main as emulate_main

        return emulate_main(args_list[1:])
    if args_list and args_list[0] == "serve":
        from serving.serve_cli import main as serve_main

        settings = load_settings()
        return serve_main(
            args_list[1:],
            served_names={"reasoning": settings.reasoning_model, "coder": settings.coder_model},
            api_key_env="TANDEM_API_KEY"
            if settings.api_key.get_secret_value() != "EMPTY"
            else None,
        )
    if args_list and args_list[0] == "bench":
        from bench.cli import main as bench_main

        return bench_main(args_list[1:])
    if args_list and args_list[0] == "calibrate":
        from serving.calibrate import main as calibrate_main

        return calibrate_main(args_list[1:])
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    sub.add_parser("emulate", help="serve an emulated vLLM (tandem emulate --help)")
    sub.add_parser("serve", help="start real vLLM servers (tandem serve --help)")
    sub.add_parser("bench", help="benchmark policies side by side (tandem bench --help)")
    sub.add_parser(
        "calibrate", help="fit an emulator profile to a running vLLM (tandem calibrate --help)"
    )
    args = parser.parse_args(args_list)
    settings = load_settings()
    if args.command == "run":
        return _cmd_run(args, settings)
    return _cmd_resume(args, settings)


def _cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from serving.clock import run

    if args.request_file:
        request = Path(args.request_file).read_text(encoding="utf-8")
    elif args.request:
        request = args.request
    elif args.demo:
        request = DEMO_REQUEST
    else:
        print("tandem run: give a REQUEST, --request-file F or --demo", file=sys.stderr)
        return 2
    if args.sessions < 1:
        print("tandem run: --sessions must be >= 1", file=sys.stderr)
        return 2
    virtual = (args.clock or ("virtual" if settings.emulated else "real")) == "virtual"
    return run(_run_async(args, settings, request, virtual), virtual=virtual)


@contextlib.asynccontextmanager
async def _checkpointer(settings: Settings, enabled: bool) -> AsyncIterator[Any]:
    """The SQLite checkpointer in the workspace (None when disabled)."""
    if not enabled:
        yield None
        return
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    settings.workspace.mkdir(parents=True, exist_ok=True)
    async with AsyncSqliteSaver.from_conn_string(
        str(settings.workspace / "checkpoints.db")
    ) as saver:
        yield saver


async def _run_async(
    args: argparse.Namespace, settings: Settings, request: str, virtual: bool
) -> int:
    from graph.graph import build_graph
    from graph.runtime import build_runtime
    from graph.sessions import format_table, new_session_id, run_many
    from nodes.context import ServerOptions
    from routing.fanout import FanoutPolicy

    runtime = build_runtime(settings, limit=args.limit, order=args.order)
    port = args.metrics_port if args.metrics_port is not None else settings.metrics_port
    if port is not None:
        runtime.metrics.serve(port)
        print(f"tandem metrics on http://127.0.0.1:{port}/metrics")
    context = settings.run_context()
    if args.max_tokens:
        context = context.merged({"max_tokens": args.max_tokens})
    fanout = FanoutPolicy(max_parallel=context.max_parallel_agents)
    where = (
        "built-in emulator "
        f"({settings.emulator_reasoning_profile} + {settings.emulator_coder_profile})"
        if settings.emulated
        else "configured vLLM endpoints"
    )
    print(
        f"tandem: {args.sessions} session(s) on {where}, clock={'virtual' if virtual else 'real'}, "
        f"limit={args.limit or settings.limit}, workspace={settings.workspace}"
    )
    progress = None if args.quiet else (lambda line: print(line, flush=True))

    def on_code(sid: str, done: int, total: int) -> None:
        runtime.metrics.session_progress(sid, done, total)
        runtime.metrics.parallel_tasks(
            sum(lane.admission.in_flight for lane in runtime.router.lanes("coder"))
        )
        if progress and (done == total or done % 5 == 0):
            progress(f"[{sid}] code: {done}/{total} files")

    try:
        async with _checkpointer(settings, not args.no_checkpoint) as saver, runtime.router:
            graph = build_graph(
                runtime.models,
                defaults=context,
                options=ServerOptions(workspace=settings.workspace),
                checkpointer=saver,
                fanout=fanout,
            )
            requests = [(new_session_id(), request) for _ in range(args.sessions)]
            results = await run_many(
                graph,
                requests,
                context=context,
                fanout=fanout,
                workspace=settings.workspace,
                progress=progress,
                on_code_done=on_code,
                on_stage=runtime.metrics.stage_latency,
            )
            stats = runtime.router.stats()
    finally:
        await runtime.aclose()
    print()
    print(format_table(results))
    print()
    print("router:", stats)
    return 0 if all(r.status in ("ok", "partial") for r in results) else 1


def _cmd_resume(args: argparse.Namespace, settings: Settings) -> int:
    from serving.clock import run

    virtual = (args.clock or ("virtual" if settings.emulated else "real")) == "virtual"
    return run(_resume_async(args.session_id, settings), virtual=virtual)


async def _resume_async(session_id: str, settings: Settings) -> int:
    from graph.graph import build_graph
    from graph.runtime import build_runtime
    from graph.sessions import format_table, run_session
    from nodes.context import ServerOptions
    from nodes.workspace import check_session_id
    from routing.fanout import FanoutPolicy

    check_session_id(session_id)
    db = settings.workspace / "checkpoints.db"
    if not db.exists():
        print(f"tandem resume: no checkpoints at {db}", file=sys.stderr)
        return 2
    runtime = build_runtime(settings)
    context = settings.run_context()
    fanout = FanoutPolicy(max_parallel=context.max_parallel_agents)
    try:
        async with _checkpointer(settings, True) as saver:
            graph = build_graph(
                runtime.models,
                defaults=context,
                options=ServerOptions(workspace=settings.workspace),
                checkpointer=saver,
                fanout=fanout,
            )
            config: RunnableConfig = {"configurable": {"thread_id": session_id}}
            snapshot = await graph.aget_state(config)
            if not snapshot.values:
                print(f"tandem resume: no session {session_id} in {db}", file=sys.stderr)
                return 2
            if not snapshot.next:
                print(
                    f"tandem resume: session {session_id} already finished "
                    f"({snapshot.values.get('status')})"
                )
                return 0
            print(f"tandem: resuming {session_id} at {', '.join(snapshot.next)}")
            async with runtime.router:
                result = await run_session(
                    graph,
                    None,
                    session_id,
                    context=context,
                    fanout=fanout,
                    workspace=settings.workspace,
                    progress=lambda line: print(line, flush=True),
                    resume=True,
                )
    finally:
        await runtime.aclose()
    print(format_table([result]))
    return 0 if result.status in ("ok", "partial") else 1


if __name__ == "__main__":
    raise SystemExit(main())
