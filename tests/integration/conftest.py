"""Real vLLM (CPU build) servers for integration tests, started once per session.

Both servers of the `cpu-tiny` profile start in parallel on free loopback ports (so a
`tandem serve` already running on 18001/18002 does not collide), serving the tiny local
model. Tests that use `vllm_servers` are skipped only when the vLLM venv is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from bench.services import free_port
from serving.launch import (
    DEFAULT_LOG_DIR,
    ServerGroup,
    build_env,
    load_profile,
    start_server,
    wait_healthy,
)
from serving.roles import ROLES, Role
from serving.tiny_model import is_built
from serving.vllm_env import MISSING_HINT, REPO_ROOT, is_installed, venv_python

TINY_MODEL_DIR = REPO_ROOT / "out" / "tiny-model"


@dataclass(frozen=True)
class VllmServers:
    """Where the test servers listen: base URLs (ending in /v1) and served names."""

    base_url: dict[Role, str]
    model: dict[Role, str]
    ready_after_s: dict[str, float]
    group: ServerGroup | None = field(default=None, compare=False, repr=False)

    def pid(self, role: Role) -> int:
        """Process id (and process-group id) of the server of `role`."""
        assert self.group is not None
        return self.group.servers[role].pid

    def kill(self, role: Role) -> None:
        """SIGKILL the whole process group of `role`'s server (API server and engine core)."""
        assert self.group is not None
        server = self.group.servers[role]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(server.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=10)

    async def restart(self, role: Role, timeout_s: float = 300.0) -> float:
        """Start `role`'s server again with the same command line and port; wait until healthy.

        Returns:
            Seconds from start to ready.
        """
        assert self.group is not None
        old = self.group.servers[role]
        group = self.group
        new = start_server(
            old.argv,
            role=role,
            served_name=old.served_name,
            base_url=old.base_url,
            env=_role_env(group, role),
            log_dir=group.log_dir,
        )
        group.servers[role] = new
        return await wait_healthy(new, timeout_s)


def _role_env(group: ServerGroup, role: Role) -> dict[str, str]:
    return build_env(group.profile, role)


@pytest.fixture(scope="session")
def vllm_servers() -> Iterator[VllmServers]:
    """Start the two real vLLM CPU servers (about 35 s on 2 cores) and stop them at the end.

    The profile pins each server's OpenMP worker to its own core (VLLM_CPU_OMP_THREADS_BIND
    per role in cpu-tiny.yaml), so the two engines do not share core 0.
    """
    if not is_installed():
        pytest.skip(MISSING_HINT)
    python = venv_python()
    if not is_built(TINY_MODEL_DIR):
        subprocess.run(
            [str(python), "-m", "serving.tiny_model", "--out", str(TINY_MODEL_DIR)],
            check=True,
            cwd=REPO_ROOT,
        )
    profile = load_profile("cpu-tiny")
    for role in ROLES:
        profile.roles[role] = profile.roles[role].model_copy(update={"port": free_port()})
    group = ServerGroup(profile, python=python, log_dir=DEFAULT_LOG_DIR / "pytest")
    try:
        group.start()
        ready = asyncio.run(group.wait_healthy(timeout_s=300.0))
        yield VllmServers(
            base_url={role: profile.base_url(role) for role in ROLES},
            model={role: profile.server(role).served_name for role in ROLES},
            ready_after_s=ready,
            group=group,
        )
    finally:
        group.stop()
