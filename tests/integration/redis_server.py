"""Test access to the throwaway redis-server of `bench.services`."""

from __future__ import annotations

from bench.services import REDIS_INSTALL_HINT as INSTALL_HINT
from bench.services import REDIS_SERVER, RedisServer, free_port

__all__ = ["INSTALL_HINT", "REDIS_SERVER", "RedisServer", "free_port"]
