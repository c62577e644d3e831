"""`tandem run` and `tandem resume` on the shared stores: Redis admission, Postgres checkpoints.

A real redis-server and a real Postgres on loopback (Debian's packages, `make test` installs
them); the built-in emulator serves the models. An unreachable store is a usage error that
names it with its password redacted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.pg_server import PostgresServer, pg_bin_dir
from tests.integration.redis_server import RedisServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="make redis"),
    pytest.mark.skipif(pg_bin_dir() is None, reason="make postgresql"),
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    server = PostgresServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _tandem(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("TANDEM_")}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _redis_keys(url: str, pattern: str) -> list[str]:
    port = url.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(
        ["redis-cli", "-p", port, "--scan", "--pattern", pattern],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


def test_a_run_shares_admission_in_redis_and_checkpoints_in_postgres(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    env = {
        "TANDEM_WORKSPACE": str(tmp_path / "ws"),
        "TANDEM_ADMISSION_URL": redis_url,
        "TANDEM_CHECKPOINT_URL": postgres_url,
        # Shared stores run on the real clock: CPU-sized emulators keep it short.
        "TANDEM_EMULATOR_REASONING_PROFILE": "cpu-tiny-reasoning",
        "TANDEM_EMULATOR_CODER_PROFILE": "cpu-tiny",
    }
    done = _tandem(["run", "--quiet", "Create a.py and b.py", "--sessions", "2"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    manifests = sorted((tmp_path / "ws").glob("s-*/manifest.json"))
    assert len(manifests) == 2
    for path in manifests:
        assert json.loads(path.read_text())["status"] in ("ok", "partial")
    # The budget lived in Redis (one per replica), the checkpoints in Postgres.
    assert _redis_keys(redis_url, "tandem:admission:coder@gpu1:*")
    assert not (tmp_path / "ws" / "checkpoints.db").exists()
    finished = _tandem(["resume", manifests[0].parent.name], env)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "already finished" in finished.stdout


def test_unreachable_stores_are_named_with_the_password_hidden(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {"TANDEM_WORKSPACE": str(tmp_path / "ws")}
    redis_down = _tandem(
        ["run", "x"], {**base, "TANDEM_ADMISSION_URL": f"redis://:s3cret@127.0.0.1:{port}/0"}
    )
    assert redis_down.returncode == 2, redis_down.stdout + redis_down.stderr
    assert f"127.0.0.1:{port}" in redis_down.stderr and "s3cret" not in redis_down.stderr
    assert "Traceback" not in redis_down.stderr
    pg_down = _tandem(
        ["run", "x"],
        {**base, "TANDEM_CHECKPOINT_URL": f"postgresql://u:s3cret@127.0.0.1:{port}/db"},
    )
    assert pg_down.returncode == 2, pg_down.stdout + pg_down.stderr
    assert f"127.0.0.1:{port}" in pg_down.stderr and "s3cret" not in pg_down.stderr
    assert "Traceback" not in pg_down.stderr
    bad = _tandem(["run", "x"], {**base, "TANDEM_ADMISSION_URL": "http://nope"})
    assert bad.returncode == 2 and "TANDEM_ADMISSION_URL" in bad.stderr
    virtual = _tandem(
        ["run", "x", "--clock", "virtual"], {**base, "TANDEM_ADMISSION_URL": "redis://h:1/0"}
    )
    assert virtual.returncode == 2 and "--clock virtual" in virtual.stderr
