"""The `tandem` root command: `--version`, and one command per job.

tandem run       run sessions of the workflow (plan, parallel coders, review)
tandem resume    continue an interrupted or failed session from its checkpoint
tandem emulate   serve one emulated vLLM over HTTP
tandem serve     start real vLLM CPU servers, or fit-check and print a GPU profile
tandem bench     benchmark admission policies side by side
tandem calibrate fit an emulator profile to a running vLLM
tandem worker    run sessions pulled from a shared queue (Redis)
tandem submit    queue sessions for the workers
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer
from typer._click.exceptions import ClickException

from cli import bench, calibrate, emulate, run, serve, worker
from cli.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError, clean
from graph.settings import SettingsError

app = typer.Typer(
    name="tandem",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def tandem_version() -> str:
    """The installed package's version ("unknown" when run from a bare checkout)."""
    try:
        return version("tandem")
    except PackageNotFoundError:
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tandem {tandem_version()}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Plan → parallel coders → review on self-hosted vLLM GPUs, with a shared router.

    Exit codes: 0 ok, 1 some sessions failed, 2 usage or configuration error,
    130 interrupted (Ctrl-C).
    """


app.command("run", no_args_is_help=False)(run.run)
app.command("resume")(run.resume)
app.command("emulate")(emulate.emulate)
app.command("serve")(serve.serve)
app.command("bench")(bench.bench)
app.command("calibrate")(calibrate.calibrate)
app.command("worker")(worker.worker)
app.command("submit")(worker.submit)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `tandem` with `argv` (default: the process's arguments); returns the exit code.

    Errors the user can fix print one line naming the thing that is wrong, never a traceback.
    """
    try:
        result = app(
            args=list(sys.argv[1:] if argv is None else argv),
            prog_name="tandem",
            standalone_mode=False,
        )
    except CliError as exc:
        print(f"tandem: {clean(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except SettingsError as exc:
        print(f"tandem: {clean(str(exc.code))}", file=sys.stderr)
        return EXIT_USAGE
    except ClickException as exc:
        exc.show()
        return exc.exit_code
    except typer.Abort:
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else EXIT_OK
