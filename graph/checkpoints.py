"""Where runs are checkpointed: Postgres (shared by every worker) or a SQLite file (one host).

`open_checkpointer("postgresql://...")` gives an `AsyncPostgresSaver` on a connection pool,
so sessions in one process do not queue on one connection, and any worker can resume a
session another started. Anything else is a SQLite path, as a single process uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

from langgraph.checkpoint.base import BaseCheckpointSaver

from routing.endpoints import redact_url

POSTGRES_SCHEMES: Final = ("postgresql://", "postgres://")
# Any 64-bit number, the same in every worker: it serialises the schema migrations.
_SETUP_LOCK_ID: Final = 0x74616E64656D  # "tandem"
_SETUP_POLL_S: Final = 0.05


class CheckpointStoreUnavailable(RuntimeError):
    """The checkpoint database could not be opened; the text names it (password redacted)."""


def is_postgres_url(url_or_path: str | Path) -> bool:
    """True for a `postgresql://` (or `postgres://`) connection URL."""
    return isinstance(url_or_path, str) and url_or_path.startswith(POSTGRES_SCHEMES)


@contextlib.asynccontextmanager
async def open_checkpointer(
    url_or_path: str | Path, *, max_connections: int = 16
) -> AsyncIterator[BaseCheckpointSaver[str]]:
    """Open the checkpointer for `url_or_path`, creating its tables on first use.

    Args:
        url_or_path: `postgresql://user:pw@host:port/db` or the path of a SQLite file
            (its directory is created).
        max_connections: Pool size for Postgres.

    Raises:
        CheckpointStoreUnavailable: Postgres refused or did not answer.
    """
    if not is_postgres_url(url_or_path):
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        path = Path(url_or_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        async with AsyncSqliteSaver.from_conn_string(str(path)) as sqlite_saver:
            yield sqlite_saver
        return

    import psycopg
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    url = str(url_or_path)
    pool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_connections,
        open=False,
        # What AsyncPostgresSaver.from_conn_string sets on its single connection.
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
    )
    try:
        await pool.open(wait=True, timeout=10.0)
    except (psycopg.Error, TimeoutError, OSError) as exc:
        await pool.close()
        raise CheckpointStoreUnavailable(
            f"checkpoint store {redact_url(url)} is unavailable: {exc}"
        ) from None
    try:
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        # Workers may start together: one at a time runs the migrations. The others poll
        # for the lock instead of blocking on it: a statement blocked in pg_advisory_lock
        # holds a snapshot, which the holder's CREATE INDEX CONCURRENTLY (run on another
        # pooled connection) waits for, a deadlock Postgres cannot see.
        async with pool.connection() as conn:
            await _take_setup_lock(conn)
            try:
                await saver.setup()
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (_SETUP_LOCK_ID,))
        yield saver
    finally:
        await pool.close()


async def _take_setup_lock(conn: Any) -> None:
    """Take the migrations' advisory lock, asking every `_SETUP_POLL_S` until it is free."""
    while True:
        cursor = await conn.execute("SELECT pg_try_advisory_lock(%s) AS locked", (_SETUP_LOCK_ID,))
        row = await cursor.fetchone()
        if row and row["locked"]:
            return
        await asyncio.sleep(_SETUP_POLL_S)
