"""Who is making an LLM call: the session, stage and role, carried in a context variable.

Nodes open a `call_scope` around each model call; the routing transport reads it to order
admission by session and tags the outgoing request with `x-tandem-*` headers so that servers
(the emulator) and traces can attribute work to sessions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from serving.protocol import FILE_HEADER, SESSION_HEADER, STAGE_HEADER
from serving.roles import ROLES as ROLES
from serving.roles import Role as Role


@dataclass(frozen=True)
class CallInfo:
    """Identity of one LLM call, as the routing layer sees it."""

    session_id: str
    stage: str
    role: Role
    file: str | None = None

    def headers(self) -> dict[str, str]:
        """Headers that tag the outgoing HTTP request (ASCII-safe)."""
        out = {SESSION_HEADER: self.session_id, STAGE_HEADER: self.stage}
        if self.file is not None:
            out[FILE_HEADER] = self.file.encode("ascii", "backslashreplace").decode()
        return out


current_call: ContextVar[CallInfo | None] = ContextVar("tandem_current_call", default=None)


@contextmanager
def call_scope(info: CallInfo) -> Iterator[CallInfo]:
    """Mark the LLM calls made inside the block as belonging to `info`."""
    token = current_call.set(info)
    try:
        yield info
    finally:
        current_call.reset(token)
