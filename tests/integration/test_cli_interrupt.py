"""Ctrl-C in `tandem run`: sessions stop, manifests say `interrupted`, resume finishes them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graph.graph import build_graph
from graph.runtime import build_runtime
from graph.sessions import run_many
from graph.settings import load_settings
from nodes.context import ServerOptions
from routing.fanout import FanoutPolicy
from serving.clock import run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _env(workspace: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    return {**clean, "TANDEM_WORKSPACE": str(workspace)}


def test_ctrl_c_writes_interrupted_manifests_prints_resume_and_exits_130(tmp_path: Path) -> None:
    # The real clock on the H100 profiles: planning alone takes tens of seconds, so the
    # signal lands mid-run.
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "--demo", "--sessions", "2", "--clock", "real"],
        cwd=ROOT,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    started: list[str] = []
    while sum("] plan" in line for line in started) < 2:  # both sessions are planning
        line = proc.stdout.readline()
        assert line, "".join(started)
        started.append(line)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    out = "".join(started) + out
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err
    sessions = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(sessions) == 2
    for session in sessions:
        manifest = json.loads((session / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"
        assert f"tandem resume {session.name}" in out
    assert "interrupted" in out  # the summary's status column

    # The checkpoints survived: resuming finishes a session (virtual clock: fast).
    resumed = subprocess.run(
        [sys.executable, "-m", "cli", "resume", sessions[0].name, "--clock", "virtual"],
        cwd=ROOT,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    manifest = json.loads((sessions[0] / "manifest.json").read_text())
    assert manifest["status"] in ("ok", "partial")


def test_stopping_a_run_cancels_calls_and_returns_every_slot(tmp_path: Path) -> None:
    settings = load_settings(workspace=tmp_path)
    runtime = build_runtime(settings)
    context = settings.run_context()
    fanout = FanoutPolicy(max_parallel=context.max_parallel_agents)

    async def main() -> tuple[list[str], dict[str, dict[str, object]]]:
        stop = asyncio.Event()
        # Emulated seconds: mid-way through the coders of the first round.
        asyncio.get_running_loop().call_later(60.0, stop.set)
        try:
            async with runtime.router:
                graph = build_graph(
                    runtime.models,
                    defaults=context,
                    options=ServerOptions(workspace=tmp_path),
                    fanout=fanout,
                )
                results = await run_many(
                    graph,
                    [("s1", "Create a.py, b.py, c.py and d.py"), ("s2", "Create e.py and f.py")],
                    context=context,
                    fanout=fanout,
                    workspace=tmp_path,
                    stop=stop,
                )
                stats = runtime.router.stats()
        finally:
            await runtime.aclose()
        return [r.status for r in results], stats

    statuses, stats = run(main(), virtual=True)
    assert statuses == ["interrupted", "interrupted"]
    assert all(row["in_flight"] == 0 and row["queued"] == 0 for row in stats.values()), stats
    assert sum(int(str(row["cancelled"])) for row in stats.values()) >= 1, stats
    for sid in ("s1", "s2"):
        manifest = json.loads((tmp_path / sid / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"
