"""`tandem emulate`: serve one emulated vLLM over HTTP (OpenAI API and /metrics)."""

from __future__ import annotations

from typing import Annotated

import typer

from serving.emulator.profiles import PROFILES, Profile, get_profile


def profile_arg(name: str) -> Profile:
    """Any name `get_profile` accepts: a built-in profile, an alias, or a profile file.

    Raises:
        typer.BadParameter: naming the profile and listing the known ones.
    """
    try:
        return get_profile(name)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc), param_hint="'--profile'") from None


def emulate(
    profile: Annotated[
        str,
        typer.Option(
            help=f"A built-in profile ({', '.join(sorted(PROFILES))}) or a profile file (.yaml).",
            show_default=False,
        ),
    ],
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on.")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    seed: Annotated[int, typer.Option(help="Seed of the emulated outputs.")] = 0,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            help="Model name clients ask for (default: the profile's).", show_default=False
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "info",
) -> None:
    """Serve an emulated vLLM with H100 or CPU timing on a real clock, until Ctrl-C."""
    from serving.emulator.cli import serve_emulator

    serve_emulator(
        profile_arg(profile),
        port=port,
        host=host,
        seed=seed,
        served_model_name=served_model_name,
        log_level=log_level,
    )
