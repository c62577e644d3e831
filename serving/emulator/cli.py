"""`tandem emulate`: serve one emulated vLLM over HTTP on a real clock."""

from __future__ import annotations

from serving.emulator.profiles import Profile


def serve_emulator(
    profile: Profile,
    *,
    port: int,
    host: str = "127.0.0.1",
    seed: int = 0,
    served_model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve `profile` as an OpenAI-compatible vLLM (with /metrics) until interrupted.

    Args:
        profile: The engine's timing and limits.
        port: TCP port to listen on.
        host: Address to bind.
        seed: Seed of the emulated outputs.
        served_model_name: The model name clients ask for (default: the profile's).
        log_level: uvicorn's log level.
    """
    import uvicorn

    from serving.emulator.app import create_app

    # One step per sleep on a real clock, so streamed tokens arrive one step apart.
    app = create_app(
        profile,
        seed=seed,
        served_model_name=served_model_name,
        max_coalesced_steps=1,
    )
    # asyncio's loop: uvloop's millisecond timer granularity would stretch each step a little.
    uvicorn.run(app, host=host, port=port, log_level=log_level, loop="asyncio")
