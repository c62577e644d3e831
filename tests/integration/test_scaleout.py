"""`tandem worker` processes sharing a Redis queue, Redis admission and Postgres checkpoints.

A real redis-server and Postgres on loopback (Debian's packages, `make redis postgresql`) and
two emulated vLLM servers over HTTP on the real clock (`bench.scaleout`'s stack, smaller):
two workers run a few sessions and one is killed with SIGKILL while it holds sessions whose
coders have finished files.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bench.scaleout import (
    ROOT,
    Stack,
    check_kill,
    emulated_servers,
    postgres_server,
    redis_server,
    request_text,
    run_sessions,
    scaleout_profiles,
)
from graph.queue import SessionQueue, SessionRequest
from tests.integration.pg_server import pg_bin_dir

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="make redis"),
    pytest.mark.skipif(pg_bin_dir() is None, reason="make postgresql"),
]
LIMIT = 4


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("scaleout")
    with (
        redis_server(workdir) as redis_url,
        postgres_server() as postgres_url,
        emulated_servers(workdir, scaleout_profiles()) as servers,
    ):
        yield Stack(workdir, redis_url, postgres_url, servers, LIMIT)


def _requests(prefix: str, sessions: int, files: int) -> list[SessionRequest]:
    context = {"max_tokens": {"plan": 256, "code": 64, "review": 160}}
    return [
        SessionRequest(session_id=f"{prefix}-{i}", request=request_text(files), context=context)
        for i in range(sessions)
    ]


def test_a_killed_workers_sessions_finish_on_the_other_without_redoing_files(
    stack: Stack,
) -> None:
    run = asyncio.run(
        run_sessions(
            stack,
            "kill",
            _requests("k", sessions=4, files=4),
            workers=2,
            concurrency=4,
            scrape_s=0.1,
            kill_at_s=0.0,
            timeout_s=240,
        )
    )
    assert {o.status for o in run.outcomes.values()} == {"ok"}, run.outcomes
    assert run.kill is not None and run.kill.sessions
    check = check_kill(run)
    # Each session the killed worker held ended on the other, resumed from its checkpoint.
    assert sorted(check.resumed) == run.kill.sessions, check
    survivors = {o.worker for o in run.outcomes.values()}
    assert run.kill.worker_id not in survivors
    # Its coders had finished files; each is on disk and none was coded again.
    assert check.finished >= 1
    assert check.lost == [] and check.redone == []
    for sid in run.kill.sessions:
        manifest = json.loads((run.workspace / sid / "manifest.json").read_text())
        assert manifest["status"] == "ok"
    # The servers' own gauge never went past the shared limit.
    assert all(run.peaks.samples[r] > 0 for r in ("reasoning", "coder"))
    assert max(run.peaks.peak.values()) <= LIMIT, run.peaks


def _worker(stack: Stack, name: str, workspace: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "worker",
            "--queue",
            stack.redis_url,
            "--name",
            name,
            "--concurrency",
            "2",
            *extra,
        ],
        cwd=ROOT,
        env=stack.worker_env(workspace),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _output(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The process's output once it exits; killed (and the test failed) past `timeout_s`."""
    try:
        out, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f"worker still running after {timeout_s:.0f} s:\n{out}") from None
    return out


def test_sigterm_gives_sessions_back_and_another_worker_resumes_them(
    stack: Stack, tmp_path: Path
) -> None:
    workspace = tmp_path / "ws"
    submitted = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli",
            "submit",
            request_text(3),
            "--sessions",
            "2",
            "--queue",
            stack.redis_url,
            "--name",
            "term",
            "--max-tokens",
            "plan=256,code=64",
        ],
        cwd=ROOT,
        env=stack.worker_env(workspace),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert submitted.returncode == 0, submitted.stderr
    session_ids = submitted.stdout.split()
    assert len(session_ids) == 2

    async def wait_for_claims() -> None:
        async with SessionQueue(stack.redis_url, name="term") as queue:
            for _ in range(600):
                if len(await queue.claims()) == 2 and await queue.coded():
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("the worker did not start coding")

    first = _worker(stack, "term", workspace)
    try:
        asyncio.run(wait_for_claims())
    except BaseException:
        first.kill()
        first.communicate()
        raise
    first.send_signal(signal.SIGTERM)
    out = _output(first, 60)
    assert first.returncode == 0, out
    assert "given back: 2" in out
    for sid in session_ids:
        manifest = json.loads((workspace / sid / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"

    second = _worker(stack, "term", workspace, "--until-empty")
    out = _output(second, 180)
    assert second.returncode == 0, out
    assert all(f"resume {sid}" in out for sid in session_ids), out

    async def outcomes() -> dict[str, str]:
        async with SessionQueue(stack.redis_url, name="term") as queue:
            return {sid: o.status for sid, o in (await queue.results()).items() if o.resumed}

    assert asyncio.run(outcomes()) == dict.fromkeys(session_ids, "ok")


def test_submit_refuses_a_bad_request_and_a_worker_rejects_a_forged_one(
    stack: Stack, tmp_path: Path
) -> None:
    env = stack.worker_env(tmp_path / "ws")
    long = subprocess.run(
        [sys.executable, "-m", "cli", "submit", "--queue", stack.redis_url, "x" * 100_001],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert long.returncode == 2 and "100000" in long.stderr.replace(",", "")

    async def forge() -> None:
        # Anything that can write to Redis can put a session on the queue.
        client = aioredis.Redis.from_url(stack.redis_url)
        requests_key, pending_key = SessionQueue(stack.redis_url, name="forged").keys[:2]
        await client.hset(requests_key, "f-1", '{"session_id": "f-1", "request": " "}')
        await client.rpush(pending_key, "f-1")  # type: ignore[misc]
        await client.aclose()

    asyncio.run(forge())
    worker = _worker(stack, "forged", tmp_path / "ws", "--until-empty")
    out = _output(worker, 120)
    assert worker.returncode == 1, out
    assert "ended f-1: rejected" in out and "the request is empty" in out
    assert not (tmp_path / "ws" / "f-1").exists()


async def test_workers_starting_together_on_a_fresh_database_all_open_their_checkpointer() -> None:
    from graph.checkpoints import open_checkpointer

    async def open_one(url: str) -> bool:
        async with open_checkpointer(url, max_connections=4) as saver:
            return saver is not None

    with postgres_server() as url:
        opened = await asyncio.wait_for(asyncio.gather(*(open_one(url) for _ in range(4))), 60)
    assert opened == [True] * 4
