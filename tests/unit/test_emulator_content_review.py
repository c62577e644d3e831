"""Through the real graph on the in-process emulator: a reviewer reads what the coders wrote,
so a 20-file review prompt carries about the sum of the 20 files' tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from graph.graph import build_graph
from graph.runtime import build_runtime
from graph.settings import load_settings
from nodes.context import ServerOptions
from nodes.llm import dumps_compact
from nodes.review import REVIEW_SYSTEM
from serving.clock import run
from serving.emulator.engine import count_tokens

FILES = 20
# Per file the review prompt adds a `### FILE:` header and a check line, and drops the
# coder's fence language tag: a few dozen characters either way.
PER_FILE_SLACK_TOKENS = 25


def _session(tmp_path: Path) -> tuple[dict[str, Any], list[Any]]:
    async def main() -> tuple[dict[str, Any], list[Any]]:
        settings = load_settings(workspace=tmp_path, review_on="coder")
        runtime = build_runtime(settings)
        ctx = settings.run_context().merged(
            {"max_tokens": {"plan": 2048, "code": 1024, "review": 1536}, "max_review_rounds": 0}
        )
        # One review call for all files.
        options = ServerOptions(workspace=settings.workspace, review_batch_chars=400_000)
        graph = build_graph(runtime.models, defaults=ctx, options=options)
        paths = ", ".join(f"pkg/file_{i}.py" for i in range(FILES))
        request = f"Create a Python package of {FILES} simple modules. Files: {paths}"
        try:
            out = await graph.ainvoke({"request": request, "session_id": "s1"})
        finally:
            await runtime.aclose()
        return out, list(runtime.emulators["coder"].state.engine.records)

    return run(main(), virtual=True)


def test_review_prompt_carries_the_tokens_the_coders_wrote(tmp_path: Path) -> None:
    out, records = _session(tmp_path)
    code = [r for r in records if r.stage == "code"]
    (review,) = [r for r in records if r.stage == "review"]
    assert len(code) == FILES and not out.get("error")
    code_tokens = sum(r.generated_tokens for r in code)
    assert code_tokens >= FILES * 512  # each coder drew at least half of its 1024 cap
    fixed = count_tokens(REVIEW_SYSTEM + out["request"] + dumps_compact(out["plan"]))
    files_part = review.prompt_tokens - fixed
    assert abs(files_part - code_tokens) <= FILES * PER_FILE_SLACK_TOKENS
    # What the files on disk hold is what the coders were charged for.
    on_disk = sum(
        count_tokens((tmp_path / "s1" / f"pkg/file_{i}.py").read_text()) for i in range(FILES)
    )
    assert abs(on_disk - code_tokens) <= FILES * 5
