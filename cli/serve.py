"""`tandem serve`: start the real vLLM CPU servers, or fit-check and print a GPU profile.

tandem serve --backend vllm-cpu                       # tiny random model, until Ctrl-C
tandem serve --backend vllm-cpu --model smollm2-135m  # a real instruct model (converted once)
tandem serve --profile h100-pair --print              # fit check, then the `vllm serve` lines
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Literal

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cli.errors import CliError
from graph.settings import load_settings
from serving.roles import Role
from serving.serve_cli import CPU_MODELS


@contextlib.contextmanager
def spinner(what: str) -> Iterator[None]:
    """A spinner with elapsed seconds on stderr while `what` goes on (a line elsewhere)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        console.print(f"{what} …", highlight=False)
        yield
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        progress.add_task(what, total=None)
        yield


def _check_model(value: str) -> str:
    if value not in CPU_MODELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(sorted(CPU_MODELS))}")
    return value


def serve(
    backend: Annotated[
        Literal["vllm-cpu"] | None,
        typer.Option(help="Start real servers on this backend.", show_default=False),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            help="Launch profile name (serving/profiles/) or YAML path "
            "(default: h100-pair with --print, the model's own with --backend).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            callback=_check_model,
            help="CPU backend: tiny (random weights) or smollm2-135m (real; fetched once).",
        ),
    ] = "tiny",
    print_commands: Annotated[
        bool, typer.Option("--print", help="Fit-check the profile and print its commands.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds to wait for the servers to answer.")
    ] = 300.0,
    no_install: Annotated[
        bool, typer.Option("--no-install", help="Fail instead of installing a missing .venv-vllm.")
    ] = False,
) -> None:
    """Start real vLLM servers (CPU build), or fit-check a GPU profile and print its commands.

    With --backend the servers stay up until Ctrl-C; the `export` lines they print point
    `tandem run` at them.
    """
    from serving.serve_cli import print_profile, serve_cpu

    if print_commands:
        name = profile or "h100-pair"
        settings = load_settings()
        # The servers serve the names Tandem sends; the key stays in its variable.
        served: dict[Role, str] = {
            "reasoning": settings.reasoning_model,
            "coder": settings.coder_model,
        }
        key_env = "TANDEM_API_KEY" if settings.api_key.get_secret_value() != "EMPTY" else None
        try:
            raise typer.Exit(print_profile(name, served, key_env))
        except (OSError, ValueError, ValidationError) as exc:
            raise CliError(f"serve: launch profile {name}: {_first_line(exc)}") from None
    if backend == "vllm-cpu":
        try:
            code = serve_cpu(profile, timeout, not no_install, model, waiting=spinner)
        except (OSError, ValueError, ValidationError) as exc:
            raise CliError(f"serve: {_first_line(exc)}") from None
        raise typer.Exit(code)
    raise CliError("serve: choose --backend vllm-cpu, or --profile NAME --print")


def _first_line(exc: BaseException) -> str:
    """The first lines of an error's text (a validation error names the field on line 2)."""
    lines = str(exc).strip().splitlines()
    return "; ".join(line.strip() for line in lines[:3]) if lines else type(exc).__name__
