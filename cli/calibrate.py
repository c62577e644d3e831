"""`tandem calibrate`: measure a running vLLM server and write an emulator profile file."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from serving.calibrate import (
    DEFAULT_LEVELS,
    DEFAULT_MAX_NUM_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_OUTPUT_TOKENS,
    DEFAULT_REASONING_FRAC,
)


def _check_levels(value: str) -> str:
    items = [x.strip() for x in value.split(",") if x.strip()]
    if not items or not all(x.isdigit() and int(x) >= 1 for x in items):
        raise typer.BadParameter(f"{value!r}: give positive integers separated by commas")
    return value


def calibrate(
    url: Annotated[
        str, typer.Option(help="The server's base URL, ending in /v1.", show_default=False)
    ],
    model: Annotated[str, typer.Option(help="The served model name.", show_default=False)],
    out: Annotated[str, typer.Option(help="Profile file to write (.yaml).", show_default=False)],
    name: Annotated[
        str | None,
        typer.Option(help="Profile name (default: the file's stem).", show_default=False),
    ] = None,
    role: Annotated[
        Literal["coder", "reasoning"], typer.Option(help="The role the profile serves.")
    ] = "coder",
    reasoning_frac: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Share of output tokens that are reasoning (role reasoning)."
        ),
    ] = DEFAULT_REASONING_FRAC,
    levels: Annotated[
        str,
        typer.Option(
            callback=_check_levels, help="Concurrency levels of the decode waves (comma-separated)."
        ),
    ] = ",".join(map(str, DEFAULT_LEVELS)),
    max_concurrency: Annotated[
        int | None, typer.Option(min=1, help="Drop levels above this.", show_default=False)
    ] = None,
    output_tokens: Annotated[
        int, typer.Option(min=1, help="Output tokens per request in the decode waves.")
    ] = DEFAULT_OUTPUT_TOKENS,
    max_num_seqs: Annotated[
        int,
        typer.Option(
            min=1,
            help="The server's --max-num-seqs (vLLM does not report it; vLLM's API-server "
            "default below H100 class; H100/H200 1024, CPU build 128).",
        ),
    ] = DEFAULT_MAX_NUM_SEQS,
    max_num_batched_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="The server's --max-num-batched-tokens (not reported; vLLM's default below "
            "H100 class and on CPU; H100/H200 8192).",
        ),
    ] = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    kv_cache_tokens: Annotated[
        int | None,
        typer.Option(
            min=1, help="KV cache size, if /metrics does not report it.", show_default=False
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Measurements per point.")] = 3,
    quick: Annotated[bool, typer.Option("--quick", help="2 rounds, 3 TTFT lengths.")] = False,
    guided: Annotated[
        bool,
        typer.Option(
            help="Also time lone requests guided by Tandem's plan schema (structured output's "
            "per-step cost, `guided_seq_s`)."
        ),
    ] = True,
    api_key: Annotated[
        str,
        typer.Option(
            envvar="TANDEM_API_KEY",
            help="Bearer token for the server (default: TANDEM_API_KEY, else EMPTY).",
            show_default=False,
        ),
    ] = "EMPTY",
) -> None:
    """Measure a running vLLM server and write an emulator profile file.

    Exit 0 when the profile was written, 1 when the server could not be measured.
    """
    from nodes.llm import response_format_for
    from nodes.schemas import Plan
    from serving.calibrate import CalibrateOptions
    from serving.calibrate import calibrate as run_calibration

    options = CalibrateOptions(
        url=url,
        model=model,
        out=out,
        name=name,
        role=role,
        reasoning_frac=reasoning_frac,
        levels=levels,
        max_concurrency=max_concurrency,
        output_tokens=output_tokens,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        kv_cache_tokens=kv_cache_tokens,
        rounds=rounds,
        quick=quick,
        api_key=api_key,
        guided_format=response_format_for(Plan) if guided else None,
    )
    raise typer.Exit(run_calibration(options))
