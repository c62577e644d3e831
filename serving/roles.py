"""The two model roles Tandem serves: one GPU server (or set of replicas) per role."""

from __future__ import annotations

from typing import Literal

Role = Literal["reasoning", "coder"]
ROLES: tuple[Role, ...] = ("reasoning", "coder")
