"""Live progress: one line per session on a terminal, plain readable lines elsewhere."""

from __future__ import annotations

import asyncio
import io

import pytest
from rich.console import Console

from cli.progress import SessionBoard
from graph.sessions import SessionEvent

pytestmark = pytest.mark.integration

EVENTS = [
    SessionEvent("s-a", "stage", stage="plan"),
    SessionEvent("s-b", "stage", stage="plan"),
    SessionEvent("s-a", "stage", stage="code", text="planned 8 files"),
    *(SessionEvent("s-a", "files", stage="code", done=n, total=8) for n in range(1, 6)),
    SessionEvent("s-b", "stage", stage="code", text="planned 2 files"),
]


async def _feed(board: SessionBoard) -> None:
    with board:
        for event in EVENTS:
            board.on_event(event)
            await asyncio.sleep(0.01)


def test_terminal_board_has_one_row_per_session_with_stage_files_and_time() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    board = SessionBoard(console, virtual=True)
    asyncio.run(_feed(board))
    assert board.rows["s-a"].stage == "code" and board.rows["s-a"].done == 5
    text = Console(file=io.StringIO(), width=120, record=True)
    text.print(board.table())
    rows = [line for line in text.export_text().splitlines() if line.startswith("s-")]
    assert len(rows) == 2
    assert "5/8" in rows[0] and "code" in rows[0]
    headers = [column.header for column in board.table().columns]
    assert headers[:5] == ["session", "stage", "files", "elapsed s", "emulated s"]


def test_plain_output_is_one_line_per_stage_and_every_fifth_file() -> None:
    sink = io.StringIO()
    board = SessionBoard(Console(file=sink, width=120), virtual=False)
    asyncio.run(_feed(board))
    lines = sink.getvalue().splitlines()
    assert [line.split(" ·")[0] for line in lines] == [
        "[s-a] plan",
        "[s-b] plan",
        "[s-a] code (planned 8 files)",
        "[s-a] code: 5/8 files",
        "[s-b] code (planned 2 files)",
    ]
    assert all(line.endswith(" s") for line in lines)  # elapsed real seconds


def test_quiet_prints_nothing() -> None:
    sink = io.StringIO()
    asyncio.run(
        _feed(SessionBoard(Console(file=sink, force_terminal=True), virtual=False, quiet=True))
    )
    assert sink.getvalue() == ""
