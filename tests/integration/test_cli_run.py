"""`tandem run` as a user runs it: sessions on the built-in emulator, files and manifests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _tandem(args: list[str], workspace: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env={**clean, "TANDEM_WORKSPACE": str(workspace), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_run_writes_three_sessions(tmp_path: Path) -> None:
    proc = _tandem(["run", "--demo", "--sessions", "3"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sessions = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(sessions) == 3
    for session in sessions:
        manifest = json.loads((session / "manifest.json").read_text())
        assert manifest["status"] in ("ok", "partial")
        assert manifest["files_written"] >= 6
        for path, entry in manifest["files"].items():
            if entry["status"] == "written":
                assert (session / path).is_file()
    assert "session" in proc.stdout and "endpoint" in proc.stdout  # the final table
    for session in sessions:  # live progress, one line per stage of each session
        assert f"[{session.name}] plan" in proc.stdout
        assert re.search(rf"\[{session.name}\] code: \d+/\d+ files", proc.stdout)
    assert "emulated s" in proc.stdout  # virtual seconds are labelled
    assert (tmp_path / "checkpoints.db").exists()


def test_hostile_request_reports_rejected_paths(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    request = "Create ../escape.py, /tmp/tandem-abs.py, a/../../x.py and ok/inside.py"
    proc = _tandem(["run", request], ws)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rejected" in proc.stdout and "../escape.py" in proc.stdout
    (session,) = [p for p in ws.iterdir() if p.is_dir()]
    manifest = json.loads((session / "manifest.json").read_text())
    assert {r["path"] for r in manifest["rejected_paths"]} >= {
        "../escape.py",
        "/tmp/tandem-abs.py",
        "a/../../x.py",
    }
    assert not Path("/tmp/tandem-abs.py").exists() and not (tmp_path / "escape.py").exists()
    assert (session / "ok" / "inside.py").is_file()


def test_resume_of_a_finished_session_says_so(tmp_path: Path) -> None:
    proc = _tandem(["run", "Create a.py and b.py"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (session,) = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    again = _tandem(["resume", session], tmp_path)
    assert again.returncode == 0 and "already finished" in again.stdout
    unknown = _tandem(["resume", "s-nope"], tmp_path)
    assert unknown.returncode == 2 and "no session" in unknown.stderr
