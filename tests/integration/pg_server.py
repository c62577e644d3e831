"""Test access to the throwaway Postgres server of `bench.services`."""

from __future__ import annotations

from bench.services import PG_INSTALL_HINT as INSTALL_HINT
from bench.services import PostgresServer, pg_bin_dir

__all__ = ["INSTALL_HINT", "PostgresServer", "pg_bin_dir"]
