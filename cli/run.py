"""`tandem run` and `tandem resume`: sessions of the workflow, live progress, a summary.

Ctrl-C stops admitting work and cancels every session: each writes its manifest as
`interrupted` with the files it finished, the summary and a `tandem resume` line per
unfinished session are printed, and the exit code is 130.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console

from cli.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError
from graph.settings import Settings, load_settings, redact
from nodes.context import MAX_REQUEST_CHARS, ServerOptions
from routing.orders import OrderName

if TYPE_CHECKING:
    from graph.runtime import Runtime
    from graph.sessions import SessionResult

DEMO_REQUEST = (
    "Build a small Python package `textstats` that reads a text file and reports word "
    "statistics. Files: textstats/__init__.py (version and public API), textstats/tokenize.py "
    "(split text into lowercase words), textstats/counts.py (word frequencies, top-N), "
    "textstats/report.py (format a report as text or JSON), textstats/cli.py (argparse entry "
    "point), tests/test_counts.py (pytest tests), pyproject.toml and README.md."
)
STAGES = ("plan", "code", "review")
# The longest request accepted, in characters: longer ones are refused before anything is
# written (the planner's prompt carries the whole request).
# A session that ends with one of these needs no resume.
FINISHED = ("ok", "partial")
# Columns of the summary when stdout is a file or a pipe.
PLAIN_WIDTH = 160

Clock = Literal["real", "virtual"]


def parse_max_tokens(text: str) -> dict[str, int]:
    """`plan=512,code=768` → {"plan": 512, "code": 768}; stages plan, code, review.

    Raises:
        typer.BadParameter: an unknown stage or a cap that is not a positive integer.
    """
    caps: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        stage, _, value = part.partition("=")
        if stage not in STAGES or not value.isdigit() or int(value) < 1:
            raise typer.BadParameter(
                f"bad item {part!r}: use STAGE=N with STAGE in {', '.join(STAGES)} and N >= 1"
            )
        caps[stage] = int(value)
    return caps


def check_limit(value: str | None) -> str | None:
    """Typer callback: a `--limit` value `make_limit` accepts (or none)."""
    from routing.limits import make_limit

    if value is not None:
        try:
            make_limit(value)
        except ValueError as exc:
            raise typer.BadParameter(f"{value!r}: {exc}") from None
    return value


def check_max_tokens(value: str | None) -> str | None:
    """Typer callback: a `--max-tokens` value `parse_max_tokens` accepts (or none)."""
    if value is not None:
        parse_max_tokens(value)
    return value


def read_request(request: str | None, request_file: Path | None, demo: bool) -> str:
    """The request from exactly one of: the argument, `--request-file`, `--demo`.

    Raises:
        CliError: none or several given; the file missing, unreadable, binary or empty; the
            request longer than `MAX_REQUEST_CHARS`.
    """
    given = [name for name, on in (("REQUEST", request is not None), ("--request-file",
             request_file is not None), ("--demo", demo)) if on]  # fmt: skip
    if len(given) != 1:
        which = " and ".join(given) if given else "none"
        raise CliError(f"run: give one of REQUEST, --request-file FILE or --demo (got {which})")
    if request_file is not None:
        text = _read_request_file(request_file)
    elif request is not None:
        text = request
    else:
        text = DEMO_REQUEST
    if not text.strip():
        raise CliError("run: the request is empty")
    if len(text) > MAX_REQUEST_CHARS:
        raise CliError(
            f"run: the request is {len(text)} characters; the limit is {MAX_REQUEST_CHARS}"
        )
    return text


def _read_request_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CliError(f"--request-file {path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"--request-file {path}: is a directory, not a file") from None
    except OSError as exc:
        raise CliError(f"--request-file {path}: cannot read ({exc.strerror})") from None
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"), len(data), "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError(
            f"--request-file {path}: not UTF-8 text (a binary file?); give a text file"
        ) from None


def resolve_clock(clock: Clock | None, settings: Settings) -> bool:
    """True for the virtual clock: the default on the built-in emulator, refused elsewhere.

    With shared stores configured the clock is real: other workers and the stores'
    timeouts run on real time.

    Raises:
        CliError: `--clock virtual` while real servers or shared stores are configured.
    """
    shared = settings.admission_url is not None or settings.checkpoint_url is not None
    if clock is None:
        return settings.emulated and not shared
    if clock == "virtual" and not settings.emulated:
        raise CliError(
            "--clock virtual only works on the built-in emulator: real vLLM servers are "
            "configured (TANDEM_REASONING_URL / TANDEM_ENDPOINTS_FILE) and take real time, so "
            "virtual durations would be invented; use --clock real or unset them"
        )
    if clock == "virtual" and shared:
        raise CliError(
            "--clock virtual does not mix with shared stores (TANDEM_ADMISSION_URL / "
            "TANDEM_CHECKPOINT_URL): other processes and the stores' timeouts run on real "
            "time; use --clock real"
        )
    return clock == "virtual"


def check_workspace(workspace: Path) -> None:
    """Refuse a workspace that cannot be created or written, before anything runs.

    Raises:
        CliError: naming the folder and the reason.
    """
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workspace):
            pass
    except OSError as exc:
        raise CliError(
            f"workspace {workspace} is not writable ({exc.strerror or exc}); "
            "set TANDEM_WORKSPACE to a folder you can write"
        ) from None


def build_runtime_or_explain(
    settings: Settings, *, limit: str | None = None, order: str | None = None
) -> Runtime:
    """`graph.runtime.build_runtime`, with a bad endpoints file or profile named.

    Raises:
        CliError: the endpoints file or an emulator profile is unusable.
    """
    import yaml

    from graph.runtime import build_runtime

    if settings.endpoints_file is not None:
        where = f"endpoints file {settings.endpoints_file} (TANDEM_ENDPOINTS_FILE)"
    elif settings.emulated:
        where = "TANDEM_EMULATOR_REASONING_PROFILE / TANDEM_EMULATOR_CODER_PROFILE"
    else:
        where = "TANDEM_REASONING_URL / TANDEM_CODER_URL"
    try:
        return build_runtime(settings, limit=limit, order=order)
    except FileNotFoundError:
        raise CliError(f"{where}: no such file") from None
    except OSError as exc:
        raise CliError(f"{where}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CliError(f"{where}: not valid YAML ({problem})") from None
    except (ValueError, TypeError) as exc:
        raise CliError(f"{where}: {exc}") from None


async def preflight_or_explain(runtime: Runtime) -> None:
    """Ask every configured server for its models before anything runs.

    Raises:
        CliError: naming each URL that does not answer or does not serve its model.
    """
    if runtime.settings.emulated:
        return  # the built-in emulator is in this process
    problems = await runtime.preflight()
    if problems:
        lines = "\n".join(f"  {line}" for line in problems)
        raise CliError(f"run: the configured servers are not ready:\n{lines}")


def serve_metrics(runtime: Runtime, port: int, console: Console) -> None:
    """Serve the router's metrics on localhost `port`.

    Raises:
        CliError: the port is taken or not allowed.
    """
    try:
        bound = runtime.metrics.serve(port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CliError(
                f"metrics port {port} is in use; choose another with --metrics-port "
                "or TANDEM_METRICS_PORT"
            ) from None
        raise CliError(f"metrics port {port}: {exc.strerror or exc}") from None
    console.print(f"tandem metrics on http://127.0.0.1:{bound}/metrics", highlight=False)


@contextlib.asynccontextmanager
async def checkpointer(settings: Settings, enabled: bool) -> AsyncIterator[Any]:
    """The checkpointer: Postgres at TANDEM_CHECKPOINT_URL, else SQLite in the workspace.

    None when disabled. Opening raises `graph.checkpoints.CheckpointStoreUnavailable`,
    naming the store (password redacted).
    """
    if not enabled:
        yield None
        return
    from graph.checkpoints import open_checkpointer

    settings.workspace.mkdir(parents=True, exist_ok=True)
    async with open_checkpointer(settings.checkpoint_store()) as saver:
        yield saver


@contextlib.asynccontextmanager
async def stores_or_explain(command: str) -> AsyncIterator[None]:
    """Turn an unreachable shared store (Redis admission, Postgres checkpoints) into a usage
    error naming it; their own messages redact passwords."""
    from graph.checkpoints import CheckpointStoreUnavailable
    from routing.shared_admission import AdmissionStoreUnavailable

    try:
        yield
    except (AdmissionStoreUnavailable, CheckpointStoreUnavailable) as exc:
        raise CliError(f"{command}: {exc}") from None


@contextlib.contextmanager
def ctrl_c_sets(stop: asyncio.Event) -> Iterator[None]:
    """While inside, the first Ctrl-C sets `stop`; a second one quits at once."""
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        if stop.is_set():
            loop.remove_signal_handler(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            return
        print(
            "\ntandem: interrupted; stopping sessions and writing manifests "
            "(Ctrl-C again to quit at once)",
            file=sys.stderr,
            flush=True,
        )
        stop.set()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def output_console() -> Console:
    """stdout; tables get room to show whole headers when it is not a terminal (a log)."""
    console = Console(soft_wrap=False)
    if not console.is_terminal:
        console = Console(soft_wrap=False, width=PLAIN_WIDTH)
    return console


def exit_code(results: list[SessionResult], interrupted: bool) -> int:
    """130 when interrupted, 1 when a session did not finish ok or partial, else 0."""
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if all(r.status in FINISHED for r in results) else EXIT_FAILED


def print_resume_hints(
    console: Console, results: list[SessionResult], *, checkpoints: bool
) -> None:
    """A `tandem resume` line per session that did not finish."""
    unfinished = [r for r in results if r.status not in FINISHED]
    if not unfinished:
        return
    if not checkpoints:
        console.print("no checkpoints were kept (--no-checkpoint): these sessions cannot resume")
        return
    for r in unfinished:
        console.print(f"resume {r.session_id} ({r.status}): tandem resume {r.session_id}",
                      highlight=False)  # fmt: skip


def run(
    request: Annotated[
        str | None, typer.Argument(help="What to build, in words.", show_default=False)
    ] = None,
    request_file: Annotated[
        Path | None,
        typer.Option(help="Read the request from this UTF-8 text file.", show_default=False),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Use the built-in demo request (a small package).")
    ] = False,
    sessions: Annotated[int, typer.Option(min=1, help="Sessions to run concurrently.")] = 1,
    clock: Annotated[
        Clock | None,
        typer.Option(
            help="virtual: emulated GPU time passes instantly (the default on the built-in "
            "emulator; refused against real servers). Default: real with real servers.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        str | None,
        typer.Option(
            callback=check_limit,
            help="Admission limit per GPU: adaptive | unlimited | fixed-N (default: TANDEM_LIMIT).",
            show_default=False,
        ),
    ] = None,
    order: Annotated[
        OrderName | None,
        typer.Option(
            help="Admission order across sessions (default: TANDEM_ORDER).", show_default=False
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve tandem_ Prometheus metrics on this localhost port "
            "(default: TANDEM_METRICS_PORT).",
            show_default=False,
        ),
    ] = None,
    no_checkpoint: Annotated[
        bool,
        typer.Option("--no-checkpoint", help="Keep no checkpoints (no resume)."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print the summary only.")] = False,
    max_tokens: Annotated[
        str | None,
        typer.Option(
            callback=check_max_tokens,
            help="Output token caps per stage, e.g. plan=512,code=768,review=384.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run sessions of the workflow: plan, parallel coders, review.

    Files go to TANDEM_WORKSPACE/<session>/ with a manifest.json. Ctrl-C writes every
    session's manifest as interrupted and prints how to resume (exit 130).
    """
    from serving.clock import run as run_on_clock

    settings = load_settings()
    text = read_request(request, request_file, demo)
    virtual = resolve_clock(clock, settings)
    check_workspace(settings.workspace)
    caps = parse_max_tokens(max_tokens) if max_tokens else {}
    options = _RunOptions(
        sessions=sessions,
        limit=limit,
        order=order,
        metrics_port=metrics_port if metrics_port is not None else settings.metrics_port,
        checkpoint=not no_checkpoint,
        quiet=quiet,
        max_tokens=caps,
    )
    code = run_on_clock(_run_sessions(settings, text, options, virtual), virtual=virtual)
    raise typer.Exit(code)


@dataclass(frozen=True)
class _RunOptions:
    """The `tandem run` options the async part needs."""

    sessions: int
    limit: str | None
    order: str | None
    metrics_port: int | None
    checkpoint: bool
    quiet: bool
    max_tokens: dict[str, int]


async def _run_sessions(
    settings: Settings, request: str, options: _RunOptions, virtual: bool
) -> int:
    from cli.progress import SessionBoard
    from cli.summary import summary
    from graph.graph import build_graph
    from graph.sessions import new_session_id, run_many
    from routing.fanout import FanoutPolicy

    console = output_console()
    runtime = build_runtime_or_explain(settings, limit=options.limit, order=options.order)
    stop = asyncio.Event()
    try:
        await preflight_or_explain(runtime)
        if options.metrics_port is not None:
            serve_metrics(runtime, options.metrics_port, console)
        context = settings.run_context()
        if options.max_tokens:
            context = context.merged({"max_tokens": options.max_tokens})
        fanout = FanoutPolicy(max_parallel=context.max_parallel_agents)
        where = (
            "the built-in emulator "
            f"({settings.emulator_reasoning_profile} + {settings.emulator_coder_profile})"
            if settings.emulated
            else "the configured vLLM endpoints"
        )
        console.print(
            f"tandem: {options.sessions} session(s) on {where}, "
            f"clock={'virtual (emulated seconds)' if virtual else 'real'}, "
            f"limit={options.limit or settings.limit}, workspace={settings.workspace}",
            highlight=False,
            soft_wrap=True,
        )

        def on_code(sid: str, done: int, total: int) -> None:
            runtime.metrics.session_progress(sid, done, total)
            runtime.metrics.parallel_tasks(
                sum(lane.admission.in_flight for lane in runtime.router.lanes("coder"))
            )

        board = SessionBoard(console, virtual=virtual, quiet=options.quiet)
        async with (
            stores_or_explain("run"),
            checkpointer(settings, options.checkpoint) as saver,
            runtime.router,
        ):
            graph = build_graph(
                runtime.models,
                defaults=context,
                options=ServerOptions(workspace=settings.workspace),
                checkpointer=saver,
                fanout=fanout,
            )
            requests = [(new_session_id(), request) for _ in range(options.sessions)]
            with ctrl_c_sets(stop), board:
                results = await run_many(
                    graph,
                    requests,
                    context=context,
                    fanout=fanout,
                    workspace=settings.workspace,
                    on_code_done=on_code,
                    on_stage=runtime.metrics.stage_latency,
                    on_event=board.on_event,
                    stop=stop,
                )
            stats = runtime.router.stats()
        for result in results:
            runtime.metrics.session_ended(result.session_id)
    finally:
        await runtime.aclose()
    console.print()
    console.print(summary(results, virtual=virtual, router_stats=stats))
    print_resume_hints(console, results, checkpoints=options.checkpoint)
    return exit_code(results, stop.is_set())


def resume(
    session_id: Annotated[
        str,
        typer.Argument(
            help="The session to continue: its folder name under TANDEM_WORKSPACE.",
            show_default=False,
        ),
    ],
    clock: Annotated[
        Clock | None,
        typer.Option(
            help="virtual: emulated GPU time passes instantly (default on the built-in "
            "emulator; refused against real servers).",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="Print the summary only.")] = False,
) -> None:
    """Continue an interrupted or failed session from its checkpoint.

    Exit 0 when the session ends ok or partial, 1 when it fails, 130 on Ctrl-C.
    """
    from nodes.paths import UnsafePathError
    from nodes.workspace import check_session_id
    from serving.clock import run as run_on_clock

    settings = load_settings()
    try:
        check_session_id(session_id)
    except UnsafePathError as exc:
        raise CliError(f"resume: {exc}") from None
    store = settings.checkpoint_store()
    if isinstance(store, Path) and not store.exists():
        raise CliError(f"resume: no checkpoints at {store} (is TANDEM_WORKSPACE the run's?)")
    virtual = resolve_clock(clock, settings)
    code = run_on_clock(_resume_session(session_id, settings, virtual, quiet), virtual=virtual)
    raise typer.Exit(code)


async def _resume_session(session_id: str, settings: Settings, virtual: bool, quiet: bool) -> int:
    from langchain_core.runnables import RunnableConfig

    from cli.progress import SessionBoard
    from cli.summary import summary
    from graph.graph import build_graph
    from graph.sessions import run_session
    from routing.fanout import FanoutPolicy

    console = output_console()
    store = settings.checkpoint_store()
    where = redact(str(store))
    runtime = build_runtime_or_explain(settings)
    try:
        await preflight_or_explain(runtime)
    except CliError:
        await runtime.aclose()
        raise
    context = settings.run_context()
    fanout = FanoutPolicy(max_parallel=context.max_parallel_agents)
    stop = asyncio.Event()
    try:
        async with stores_or_explain("resume"), checkpointer(settings, True) as saver:
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
                raise CliError(f"resume: no session {session_id} in {where}")
            if not snapshot.next:
                status = str(snapshot.values.get("status"))
                console.print(f"tandem resume: session {session_id} already finished ({status})",
                              highlight=False)  # fmt: skip
                return EXIT_OK if status in FINISHED else EXIT_FAILED
            console.print(f"tandem: resuming {session_id} at {', '.join(snapshot.next)}",
                          highlight=False)  # fmt: skip
            board = SessionBoard(console, virtual=virtual, quiet=quiet)
            async with runtime.router:
                with ctrl_c_sets(stop), board:
                    task = asyncio.create_task(
                        run_session(
                            graph,
                            None,
                            session_id,
                            context=context,
                            fanout=fanout,
                            workspace=settings.workspace,
                            on_event=board.on_event,
                            resume=True,
                        )
                    )
                    waiter = asyncio.create_task(stop.wait())
                    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    if not task.done():
                        task.cancel()
                    waiter.cancel()
                    result = await task
    finally:
        await runtime.aclose()
    console.print()
    console.print(summary([result], virtual=virtual))
    print_resume_hints(console, [result], checkpoints=True)
    return exit_code([result], stop.is_set())
