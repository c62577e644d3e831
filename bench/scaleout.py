"""Scale-out benchmark: the same sessions in one worker process, then across several.

`python -m bench.scaleout --json bench/results/scaleout.json` (`make bench-scaleout`) starts,
all on loopback and on the real clock: a throwaway redis-server and Postgres (Debian's
packages; `make redis postgresql`), and two emulated vLLM servers (`tandem emulate`) with
the `scaleout-*` profiles below. Then three runs of `--sessions` sessions, each submitted to
a queue (`tandem submit`'s path) once every worker has registered:

    one       one `tandem worker --concurrency SESSIONS`
    workers   `--workers` `tandem worker --concurrency C` processes
    killed    the same again; `--kill-at` of the way through (a fraction of the first run's
              makespan), once a worker has coded files of the sessions it holds, the worker
              holding the most sessions is killed with SIGKILL

All share Redis admission (`--limit` per replica, the same for all) and Postgres
checkpoints. Throughout, each server's `/metrics` is read every `--scrape-ms` for the
largest `vllm:num_requests_running`: the servers' own count, not Tandem's.

At the kill, the killed worker's sessions and the coder files their checkpoints hold (done
before the kill) are read from Postgres. After the run each of those files must be in its
session's folder (none lost), and no other worker may have coded it again in the same round
(the workers journal each coded file in the queue, `graph.queue`); each of those sessions
must have ended ok on another worker, resumed from its checkpoint.

A makespan runs from the submission to the last session's recorded end. The JSON has the
figures and a `checks` map; the exit code is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from bench.services import REDIS_INSTALL_HINT, PostgresServer, RedisServer, free_port
from graph.queue import SessionOutcome, SessionQueue, SessionRequest
from serving.emulator.profiles import Profile, dump_profile_file, get_profile
from serving.roles import Role

ROOT = Path(__file__).resolve().parents[1]
ROLES: tuple[Role, ...] = ("reasoning", "coder")
MODELS: dict[Role, str] = {"reasoning": "tandem-reasoning", "coder": "tandem-coder"}
RUNNING = "vllm:num_requests_running"
OK_STATUSES = ("ok", "partial")
# A worker is killed once it has coded this many files of the sessions it holds: the first
# of them is then all but surely checkpointed (a file's journal line and its checkpoint
# write are sent at about the same moment).
KILL_AFTER_CODED = 2

# cpu-tiny's engine slowed to ~25 ms a step at the admitted batch: long enough that the
# servers, not the client processes, set the pace on a 2-core machine, short enough that a
# run of 16 sessions takes about a minute.
STEP_BASE_S = 0.02
STEP_PER_SEQ_S = 2e-3
_SOURCE = (
    "cpu-tiny's limits with a slower step (20 ms + 2 ms per decoding sequence) for the "
    "scale-out benchmark on the real clock; not a measured device."
)


def scaleout_profiles() -> dict[Role, Profile]:
    """The two emulated servers of the benchmark (see `STEP_BASE_S`)."""
    bases: dict[Role, str] = {"reasoning": "cpu-tiny-reasoning", "coder": "cpu-tiny"}
    return {
        role: dataclasses.replace(
            get_profile(base),
            name=f"scaleout-{role}",
            base_s=STEP_BASE_S,
            decode_seq_s=STEP_PER_SEQ_S,
            source=_SOURCE,
        )
        for role, base in bases.items()
    }


def request_text(files: int) -> str:
    """A request naming `files` Python files (the emulated planner plans those it names)."""
    names = ", ".join(f"calc/op{i}.py" for i in range(files))
    return f"Build a small Python package `calc` with one operation per file: {names}."


# -- the stack: Redis, Postgres, two emulated servers ---------------------------------------


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout_s:.0f} s")


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on loopback, without persistence; yields its URL.

    Raises:
        RuntimeError: redis-server is not installed (`make redis`) or did not start.
    """
    if shutil.which("redis-server") is None:
        raise RuntimeError(REDIS_INSTALL_HINT)
    server = RedisServer(workdir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway Postgres cluster on loopback (trust auth); yields its URL.

    Raises:
        RuntimeError: Postgres is not installed (`make postgresql`).
    """
    server = PostgresServer()
    try:
        server.start()
        yield server.url
    finally:
        server.stop()


def _python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without TANDEM_* settings, with the repository on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TANDEM_")}
    return {**env, "PYTHONPATH": str(ROOT), **(extra or {})}


@contextlib.contextmanager
def emulated_servers(workdir: Path, profiles: dict[Role, Profile]) -> Iterator[dict[Role, str]]:
    """One `tandem emulate` process per role on loopback; yields each role's base URL."""
    processes: list[subprocess.Popen[bytes]] = []
    urls: dict[Role, str] = {}
    try:
        for role, profile in profiles.items():
            path = workdir / f"{profile.name}.yaml"
            dump_profile_file(profile, path)
            port = free_port()
            log = (workdir / f"emulate-{role}.log").open("wb")
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "cli",
                        "emulate",
                        "--profile",
                        str(path),
                        "--port",
                        str(port),
                        "--served-model-name",
                        MODELS[role],
                        "--log-level",
                        "warning",
                    ],
                    cwd=ROOT,
                    env=_python_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            _wait_port(port, processes[-1], f"tandem emulate ({role})", 60)
            urls[role] = f"http://127.0.0.1:{port}"
        yield urls
    finally:
        for process in processes:
            process.terminate()
        _wait_or_kill(processes, 10)


# -- measuring ------------------------------------------------------------------------------


@dataclass
class RunningPeaks:
    """The largest `vllm:num_requests_running` each server reported, and how often it was read."""

    peak: dict[Role, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    samples: dict[Role, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))
    misses: dict[Role, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))


def running_of(page: str) -> int:
    """The sum of `vllm:num_requests_running` over a /metrics page's series."""
    total = 0.0
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            if sample.name == RUNNING:
                total += sample.value
    return int(total)


async def scrape_peaks(urls: dict[Role, str], peaks: RunningPeaks, interval_s: float) -> None:
    """Read each server's /metrics every `interval_s` into `peaks` until cancelled."""
    async with httpx.AsyncClient(timeout=max(1.0, interval_s * 5)) as client:

        async def read(role: Role) -> None:
            try:
                response = await client.get(f"{urls[role]}/metrics")
                response.raise_for_status()
            except httpx.HTTPError:
                peaks.misses[role] += 1
                return
            peaks.samples[role] += 1
            peaks.peak[role] = max(peaks.peak[role], running_of(response.text))

        while True:
            started = time.monotonic()
            await asyncio.gather(*(read(role) for role in urls))
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))


@dataclass
class Kill:
    """The worker killed mid-run and what its sessions' checkpoints held at that moment."""

    worker_id: str
    at_s: float
    sessions: list[str]
    # session -> {(path, round)} of coder files finished (checkpointed) before the kill
    finished: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    cpu_s: float = 0.0


@dataclass
class RunResult:
    """One run: its makespan, the servers' peaks, the sessions' outcomes, any kill."""

    label: str
    workers: int
    concurrency: int
    makespan_s: float
    peaks: RunningPeaks
    outcomes: dict[str, SessionOutcome]
    coded: list[tuple[str, int, str, str]]
    workspace: Path
    kill: Kill | None = None
    # CPU seconds the worker processes used (the killed one up to its kill)
    worker_cpu_s: float | None = None

    @property
    def sessions_ok(self) -> int:
        """Sessions that ended ok or partial."""
        return sum(1 for o in self.outcomes.values() if o.status in OK_STATUSES)


def _worker_pid(worker_id: str) -> int:
    """The pid inside a `graph.queue.new_worker_id` (host-pid-tag)."""
    return int(worker_id.rsplit("-", 2)[1])


async def finished_files(
    checkpoint_url: str, sessions: Sequence[str]
) -> dict[str, set[tuple[str, int]]]:
    """Per session, the (path, round) of each coder file its checkpoint holds as written:
    in the last checkpoint's state, or in the pending writes of coders done since."""
    from graph.checkpoints import open_checkpointer

    found: dict[str, set[tuple[str, int]]] = {}
    async with open_checkpointer(checkpoint_url, max_connections=2) as saver:
        for sid in sessions:
            files: set[tuple[str, int]] = set()
            saved = await saver.aget_tuple(
                {"configurable": {"thread_id": sid, "checkpoint_ns": ""}}
            )
            if saved is not None:
                state_files = saved.checkpoint["channel_values"].get("files") or {}
                writes = [
                    v for _task, channel, v in saved.pending_writes or [] if channel == "files"
                ]
                for batch in [state_files, *writes]:
                    for path, result in (batch or {}).items():
                        if result.get("status") == "written":
                            files.add((path, int(result.get("round", 0))))
            found[sid] = files
    return found


class Stack:
    """The running stores and servers, and how to start workers against them."""

    def __init__(
        self, workdir: Path, redis_url: str, postgres_url: str, servers: dict[Role, str], limit: int
    ) -> None:
        self.workdir = workdir
        self.redis_url = redis_url
        self.postgres_url = postgres_url
        self.servers = servers
        self.limit = limit

    def worker_env(self, workspace: Path) -> dict[str, str]:
        """The TANDEM_* settings every worker of a run shares."""
        return _python_env(
            {
                "TANDEM_REASONING_URL": f"{self.servers['reasoning']}/v1",
                "TANDEM_CODER_URL": f"{self.servers['coder']}/v1",
                "TANDEM_REASONING_MODEL": MODELS["reasoning"],
                "TANDEM_CODER_MODEL": MODELS["coder"],
                "TANDEM_ADMISSION_URL": self.redis_url,
                "TANDEM_CHECKPOINT_URL": self.postgres_url,
                "TANDEM_WORKSPACE": str(workspace),
                "TANDEM_LIMIT": f"fixed-{self.limit}",
            }
        )

    def start_worker(
        self, label: str, index: int, concurrency: int, workspace: Path
    ) -> subprocess.Popen[bytes]:
        """One `tandem worker` process on queue `label`; its output goes to a log file."""
        log = (self.workdir / f"worker-{label}-{index}.log").open("wb")
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "worker",
                "--queue",
                self.redis_url,
                "--name",
                label,
                "--concurrency",
                str(concurrency),
            ],
            cwd=ROOT,
            env=self.worker_env(workspace),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@contextlib.asynccontextmanager
async def scraping(urls: dict[Role, str], interval_s: float) -> AsyncIterator[RunningPeaks]:
    """Scrape the servers' running gauge while inside; yields the peaks so far."""
    peaks = RunningPeaks()
    task = asyncio.create_task(scrape_peaks(urls, peaks, interval_s))
    try:
        yield peaks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_sessions(
    stack: Stack,
    label: str,
    requests: list[SessionRequest],
    *,
    workers: int,
    concurrency: int,
    scrape_s: float,
    kill_at_s: float | None = None,
    timeout_s: float = 900.0,
    say: Console | None = None,
) -> RunResult:
    """Start `workers` workers on queue `label`, submit `requests`, wait for every outcome.

    With `kill_at_s`, that many seconds after the submission the worker claiming the most
    sessions is killed with SIGKILL, and its sessions' checkpointed files are read.

    Raises:
        RuntimeError: a worker (other than the killed one) exited, or the run timed out.
    """
    workspace = stack.workdir / f"ws-{label}"
    workspace.mkdir(parents=True, exist_ok=True)
    processes = [stack.start_worker(label, i, concurrency, workspace) for i in range(workers)]
    kill: Kill | None = None
    try:
        async with SessionQueue(stack.redis_url, name=label) as queue:
            deadline = time.monotonic() + 120
            while len(await queue.live_workers()) < workers:
                _check_alive(processes, stack.workdir, label)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: workers did not register within 120 s")
                await asyncio.sleep(0.1)
            async with scraping(stack.servers, scrape_s) as peaks:
                started = time.monotonic()
                await queue.submit(requests)
                while True:
                    outcomes = await queue.results()
                    if len(outcomes) >= len(requests):
                        break
                    elapsed = time.monotonic() - started
                    if elapsed > timeout_s:
                        raise RuntimeError(
                            f"{label}: {len(outcomes)}/{len(requests)} sessions ended "
                            f"in {timeout_s:.0f} s"
                        )
                    if kill_at_s is not None and kill is None and elapsed >= kill_at_s:
                        kill = await _kill_busiest(queue, processes, stack.postgres_url, elapsed)
                        if kill is not None and say is not None:
                            say.print(
                                f"  {label}: killed {kill.worker_id} (SIGKILL) at "
                                f"{kill.at_s:.1f} s holding {len(kill.sessions)} session(s)",
                                highlight=False,
                            )
                    _check_alive(processes, stack.workdir, label, kill)
                    await asyncio.sleep(0.1)
                makespan_s = time.monotonic() - started
            coded = await queue.coded()
            cpu = [process_cpu_s(p.pid) for p in processes if p.poll() is None]
    finally:
        _stop(processes)
    known = [c for c in cpu if c is not None]
    cpu_s = sum(known) + (kill.cpu_s if kill else 0.0) if len(known) == len(cpu) else None
    return RunResult(
        label, workers, concurrency, makespan_s, peaks, outcomes, coded, workspace, kill, cpu_s
    )


def process_cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds of a live process (Linux /proc); None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the command: state is field 3; utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _kill_busiest(
    queue: SessionQueue, processes: list[subprocess.Popen[bytes]], postgres_url: str, at_s: float
) -> Kill | None:
    """SIGKILL the worker holding the most sessions among those that have coded at least
    `KILL_AFTER_CODED` files of them; None while no worker has."""
    held: dict[str, set[str]] = {}
    for sid, worker_id in (await queue.claims()).items():
        held.setdefault(worker_id, set()).add(sid)
    coded: dict[str, int] = {}
    for sid, _round, _path, w in await queue.coded():
        if sid in held.get(w, set()):
            coded[w] = coded.get(w, 0) + 1
    coding = [w for w, n in coded.items() if n >= KILL_AFTER_CODED]
    if not coding:
        return None
    worker_id = max(coding, key=lambda w: len(held[w]))
    process = next(p for p in processes if p.pid == _worker_pid(worker_id))
    cpu_s = process_cpu_s(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    # Read again once it is dead: its claims stay until its heartbeat expires, and now
    # nothing it does can change them.
    sessions = sorted(sid for sid, w in (await queue.claims()).items() if w == worker_id)
    kill = Kill(worker_id, at_s, sessions, cpu_s=cpu_s or 0.0)
    kill.finished = await finished_files(postgres_url, kill.sessions)
    return kill


def _check_alive(
    processes: list[subprocess.Popen[bytes]], workdir: Path, label: str, kill: Kill | None = None
) -> None:
    for index, process in enumerate(processes):
        if process.poll() is None or (
            kill is not None and process.pid == _worker_pid(kill.worker_id)
        ):
            continue
        log = workdir / f"worker-{label}-{index}.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{label}: worker {index} exited with {process.returncode}:\n{tail}")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every live worker (each gives its sessions back) and wait for them."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    _wait_or_kill(processes, 30)


def _wait_or_kill(processes: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Wait for each process to end after being asked to; kill one that takes `timeout_s`."""
    for process in processes:
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- checking and reporting -----------------------------------------------------------------


@dataclass
class KillCheck:
    """What became of the killed worker's sessions and their finished files."""

    finished: int = 0
    lost: list[str] = field(default_factory=list)
    redone: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    not_resumed: list[str] = field(default_factory=list)


def check_kill(run: RunResult) -> KillCheck:
    """Each file finished before the kill is on disk and was not coded again by another
    worker in the same round; each session ended ok elsewhere, resumed from its checkpoint."""
    check = KillCheck()
    if run.kill is None:
        return check
    victim = run.kill.worker_id
    recoded = {(sid, rnd, path) for sid, rnd, path, worker in run.coded if worker != victim}
    for sid in run.kill.sessions:
        for path, rnd in sorted(run.kill.finished.get(sid, set())):
            check.finished += 1
            if not (run.workspace / sid / path).is_file():
                check.lost.append(f"{sid}/{path}")
            if (sid, rnd, path) in recoded:
                check.redone.append(f"{sid}/{path} (round {rnd})")
        outcome = run.outcomes.get(sid)
        if (
            outcome is not None
            and outcome.worker != victim
            and outcome.resumed
            and outcome.status in OK_STATUSES
        ):
            check.resumed.append(sid)
        else:
            check.not_resumed.append(sid)
    return check


def report(
    one: RunResult, scaled: RunResult, killed: RunResult, *, limit: int, command: str
) -> dict[str, Any]:
    """The JSON of the benchmark: the figures the issue asks for, and the checks.

    `makespan_workers_s` is the workers' run without a kill; the run with one is
    `makespan_workers_killed_s`. Session counts and server peaks cover all three runs.
    """
    runs = (one, scaled, killed)
    kill = check_kill(killed)
    peaks = {r: max(run.peaks.peak[r] for run in runs) for r in ROLES}
    ratio = scaled.makespan_s / one.makespan_s
    ok = sum(run.sessions_ok for run in runs)
    total = sum(len(run.outcomes) for run in runs)
    checks = {
        "max_server_running_within_limit": all(p <= limit for p in peaks.values()),
        "servers_were_read": all(run.peaks.samples[r] > 0 for run in runs for r in ROLES),
        "makespan_workers_within_10pct": ratio <= 1.10,
        "all_sessions_ok": ok == total,
        "a_worker_was_killed_mid_coding": killed.kill is not None and kill.finished > 0,
        "killed_worker_sessions_all_resumed": killed.kill is not None and not kill.not_resumed,
        "no_finished_file_lost": not kill.lost,
        "no_finished_file_coded_again": not kill.redone,
    }
    return {
        "workers": scaled.workers,
        "sessions_per_run": len(one.outcomes),
        "concurrency_per_worker": scaled.concurrency,
        "limit_per_replica": limit,
        "max_server_running": peaks,
        "makespan_one_process_s": round(one.makespan_s, 2),
        "makespan_workers_s": round(scaled.makespan_s, 2),
        "makespan_ratio": round(ratio, 3),
        "makespan_workers_killed_s": round(killed.makespan_s, 2),
        "makespan_ratio_killed": round(killed.makespan_s / one.makespan_s, 3),
        "sessions_ok": ok,
        "sessions_failed": total - ok,
        "killed_worker_sessions_resumed": len(kill.resumed),
        "killed_worker": None
        if killed.kill is None
        else {
            "worker_id": killed.kill.worker_id,
            "killed_at_s": round(killed.kill.at_s, 2),
            "sessions": killed.kill.sessions,
            "files_finished_before_kill": kill.finished,
            "files_lost": kill.lost,
            "files_coded_again": kill.redone,
            "sessions_not_resumed": kill.not_resumed,
        },
        "runs": {run.label: _run_summary(run) for run in runs},
        "profiles": {r: dataclasses.asdict(p) for r, p in scaleout_profiles().items()},
        "checks": checks,
        "command": command,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _run_summary(run: RunResult) -> dict[str, Any]:
    by_worker: dict[str, int] = {}
    for outcome in run.outcomes.values():
        by_worker[outcome.worker] = by_worker.get(outcome.worker, 0) + 1
    statuses: dict[str, int] = {}
    for outcome in run.outcomes.values():
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    return {
        "workers": run.workers,
        "concurrency_per_worker": run.concurrency,
        "makespan_s": round(run.makespan_s, 2),
        "worker_cpu_s": None if run.worker_cpu_s is None else round(run.worker_cpu_s, 1),
        "statuses": statuses,
        "sessions_by_worker": by_worker,
        "sessions_resumed": sum(1 for o in run.outcomes.values() if o.resumed),
        "coder_files_coded": len(run.coded),
        "max_server_running": dict(run.peaks.peak),
        "metrics_reads": dict(run.peaks.samples),
        "metrics_misses": dict(run.peaks.misses),
    }


# -- the whole benchmark --------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleoutConfig:
    """The benchmark's knobs (see `main`'s options)."""

    sessions: int = 12
    workers: int = 4
    concurrency: int = 5
    limit: int = 8
    files: int = 6
    max_tokens: dict[str, int] = field(
        default_factory=lambda: {"plan": 320, "code": 64, "review": 192}
    )
    kill_at: float = 0.4
    scrape_s: float = 0.1


async def scaleout(
    config: ScaleoutConfig, workdir: Path, *, command: str, say: Console | None = None
) -> dict[str, Any]:
    """Run the benchmark in `workdir` and return its report (see the module docstring)."""
    with (
        redis_server(workdir) as redis_url,
        postgres_server() as postgres_url,
        emulated_servers(workdir, scaleout_profiles()) as servers,
    ):
        stack = Stack(workdir, redis_url, postgres_url, servers, config.limit)
        text = request_text(config.files)
        context = {"max_tokens": config.max_tokens}

        def batch(prefix: str) -> list[SessionRequest]:
            return [
                SessionRequest(session_id=f"{prefix}-{i:03d}", request=text, context=context)
                for i in range(config.sessions)
            ]

        def note(text: str) -> None:
            if say is not None:
                say.print(text, highlight=False)

        note(f"scaleout: {config.sessions} sessions in one worker process")
        one = await run_sessions(
            stack,
            "one",
            batch("one"),
            workers=1,
            concurrency=config.sessions,
            scrape_s=config.scrape_s,
        )
        note(f"  one process: {one.makespan_s:.1f} s; now across {config.workers} workers")
        scaled = await run_sessions(
            stack,
            "workers",
            batch("wk"),
            workers=config.workers,
            concurrency=config.concurrency,
            scrape_s=config.scrape_s,
        )
        note(f"  {config.workers} workers: {scaled.makespan_s:.1f} s; again, killing one")
        killed = await run_sessions(
            stack,
            "killed",
            batch("kill"),
            workers=config.workers,
            concurrency=config.concurrency,
            scrape_s=config.scrape_s,
            kill_at_s=config.kill_at * one.makespan_s,
            say=say,
        )
        note(f"  {config.workers} workers, one killed: {killed.makespan_s:.1f} s")
    return report(one, scaled, killed, limit=config.limit, command=command)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.scaleout`: run the benchmark, print the figures, write the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.scaleout", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--sessions", type=int, default=ScaleoutConfig.sessions)
    parser.add_argument("--workers", type=int, default=ScaleoutConfig.workers)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=ScaleoutConfig.concurrency,
        help="sessions per worker at once",
    )
    parser.add_argument(
        "--limit", type=int, default=ScaleoutConfig.limit, help="fixed admission limit per replica"
    )
    parser.add_argument(
        "--files", type=int, default=ScaleoutConfig.files, help="files each session's request names"
    )
    parser.add_argument(
        "--kill-at", type=float, default=0.4, help="fraction of the one-process makespan"
    )
    parser.add_argument("--scrape-ms", type=int, default=100)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "scaleout.json")
    parser.add_argument(
        "--keep", type=Path, default=None, help="keep logs and outputs in this folder"
    )
    args = parser.parse_args(argv)
    config = ScaleoutConfig(
        sessions=args.sessions,
        workers=args.workers,
        concurrency=args.concurrency,
        limit=args.limit,
        files=args.files,
        kill_at=args.kill_at,
        scrape_s=args.scrape_ms / 1000,
    )
    console = Console()
    command = "python -m bench.scaleout " + " ".join(argv if argv is not None else sys.argv[1:])
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        else:
            workdir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="tandem-scaleout-"))
            )
        result = asyncio.run(scaleout(config, workdir, command=command.strip(), say=console))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print_json(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "workers",
                    "limit_per_replica",
                    "max_server_running",
                    "makespan_one_process_s",
                    "makespan_workers_s",
                    "makespan_ratio",
                    "makespan_workers_killed_s",
                    "sessions_ok",
                    "sessions_failed",
                    "killed_worker_sessions_resumed",
                    "checks",
                )
            }
        )
    )
    console.print(f"wrote {args.json}", highlight=False)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
