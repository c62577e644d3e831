"""One session through the real graph on the in-process emulator, on the virtual clock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graph.graph import build_graph
from graph.runtime import build_runtime
from graph.settings import load_settings
from nodes.context import ServerOptions
from serving.clock import run
from serving.roles import Role


def package_request(files: int) -> str:
    """A request for `files` Python modules the emulated planner plans by name."""
    paths = ", ".join(f"pkg/file_{i}.py" for i in range(files))
    return f"Create a Python package of {files} simple modules. Files: {paths}"


def emulated_session(
    tmp_path: Path,
    request: str,
    context: dict[str, Any],
    *,
    records_of: Role,
    review_batch_chars: int | None = None,
) -> tuple[dict[str, Any], list[Any]]:
    """Run session "s1" (review on the coder, `context` over the defaults) and return its
    final state and the `records_of` server's engine records."""

    async def main() -> tuple[dict[str, Any], list[Any]]:
        settings = load_settings(workspace=tmp_path, review_on="coder")
        runtime = build_runtime(settings)
        ctx = settings.run_context().merged(context)
        extra = {} if review_batch_chars is None else {"review_batch_chars": review_batch_chars}
        options = ServerOptions(workspace=settings.workspace, **extra)
        graph = build_graph(runtime.models, defaults=ctx, options=options)
        try:
            out = await graph.ainvoke({"request": request, "session_id": "s1"})
        finally:
            await runtime.aclose()
        return out, list(runtime.emulators[records_of].state.engine.records)

    return run(main(), virtual=True)
