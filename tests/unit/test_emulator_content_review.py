"""Through the real graph on the in-process emulator: a reviewer reads what the coders wrote,
so a 20-file review prompt carries about the sum of the 20 files' tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nodes.llm import dumps_compact
from nodes.review import REVIEW_SYSTEM
from serving.emulator.engine import count_tokens
from tests.emulated import emulated_session, package_request

FILES = 20
# Per file the review prompt adds a `### FILE:` header and a check line, and drops the
# coder's fence language tag: a few dozen characters either way.
PER_FILE_SLACK_TOKENS = 25


def _session(tmp_path: Path) -> tuple[dict[str, Any], list[Any]]:
    context = {"max_tokens": {"plan": 2048, "code": 1024, "review": 1536}, "max_review_rounds": 0}
    # One review call for all files.
    return emulated_session(
        tmp_path, package_request(FILES), context, records_of="coder", review_batch_chars=400_000
    )


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
