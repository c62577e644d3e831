"""`tandem emulate`: serve one emulated vLLM over HTTP on a real clock."""

from __future__ import annotations

import argparse

from serving.emulator.profiles import PROFILES, Profile, get_profile


def profile_arg(name: str) -> Profile:
    """argparse type: any name `get_profile` accepts, a built-in or a profile file."""
    try:
        return get_profile(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run uvicorn until interrupted; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="tandem emulate",
        description="Serve an emulated vLLM (OpenAI API, /metrics) with H100 or CPU timing.",
    )
    parser.add_argument(
        "--profile",
        required=True,
        type=profile_arg,
        help=f"a built-in profile ({', '.join(sorted(PROFILES))}) or a profile file (.yaml)",
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    import uvicorn

    from serving.emulator.app import create_app

    # One step per sleep on a real clock, so streamed tokens arrive one step apart.
    app = create_app(
        args.profile,
        seed=args.seed,
        served_model_name=args.served_model_name,
        max_coalesced_steps=1,
    )
    # asyncio's loop: uvloop's millisecond timer granularity would stretch each step a little.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, loop="asyncio")
    return 0
