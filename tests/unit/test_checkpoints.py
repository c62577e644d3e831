"""`open_checkpointer` picks the saver from its argument (SQLite here; Postgres in integration)."""

from __future__ import annotations

from pathlib import Path

from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from graph.checkpoints import is_postgres_url, open_checkpointer


def test_postgres_urls_are_told_from_paths() -> None:
    assert is_postgres_url("postgresql://u@h/db")
    assert is_postgres_url("postgres://u@h/db")
    assert not is_postgres_url("out/checkpoints.db")
    assert not is_postgres_url(Path("postgresql:/not-a-url"))


async def test_a_path_opens_sqlite_and_creates_its_directory(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "checkpoints.db"
    async with open_checkpointer(db) as saver:
        assert isinstance(saver, AsyncSqliteSaver)
        assert await saver.aget_tuple({"configurable": {"thread_id": "none"}}) is None
    assert db.is_file()
